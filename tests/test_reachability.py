import math

from workerpool.reachability import Reachability

GRACE, SLOW = 30.0, 10.0


def test_while_the_store_answers_in_time_the_cutoff_is_now():
    reach = Reachability(grace=GRACE, slow=SLOW)
    reach.answered(110.0, 0.01)
    assert reach.cutoff(120.0) == 120.0
    assert reach.span is None


def test_failed_steps_hold_back_leases_expired_since_the_store_last_answered_until_a_lease_after_it_is_back():
    reach = Reachability(grace=GRACE, slow=SLOW)
    reach.answered(110.0, 0.01)
    reach.failed()
    reach.failed()
    assert reach.cutoff(150.0) == 110.0  # still failing
    reach.answered(160.0, 0.01)
    assert reach.span == (110.0, 160.0)
    assert reach.cutoff(170.0) == 110.0  # owners get a lease to renew
    assert reach.cutoff(190.0) == 190.0  # then everything expired is swept
    assert reach.span == (110.0, 160.0)  # and still told apart by the span


def test_a_step_answered_late_counts_as_an_outage():
    # A paused Redis answers once it resumes, within the socket timeout: no failure, only a late answer.
    reach = Reachability(grace=GRACE, slow=SLOW)
    reach.answered(110.0, 0.01)
    reach.answered(135.0, 15.0)
    assert reach.span == (110.0, 135.0)
    assert reach.cutoff(140.0) == 110.0
    reach.answered(145.0, 0.01)  # answering in time again does not end the hold early
    assert reach.cutoff(150.0) == 110.0
    assert reach.cutoff(166.0) == 166.0


def test_a_process_that_starts_during_an_outage_holds_back_every_lease_expired_before_it_reached_the_store():
    # The outage may have begun long before this process started: live owners' leases expired then.
    reach = Reachability(grace=GRACE, slow=SLOW)
    reach.failed()
    assert reach.cutoff(150.0) == -math.inf
    reach.answered(160.0, 0.01)
    assert reach.span == (-math.inf, 160.0)
    assert reach.cutoff(170.0) == -math.inf  # owners get a lease to renew
    assert reach.cutoff(190.0) == 190.0


def test_a_first_step_that_answers_late_holds_back_every_lease_expired_before_it():
    reach = Reachability(grace=GRACE, slow=SLOW)
    reach.answered(135.0, 15.0)
    assert reach.span == (-math.inf, 135.0)
    assert reach.cutoff(140.0) == -math.inf


def test_a_process_whose_first_step_answers_in_time_sweeps_at_once():
    reach = Reachability(grace=GRACE, slow=SLOW)
    reach.answered(100.0, 0.01)
    assert reach.span is None
    assert reach.cutoff(100.0) == 100.0
