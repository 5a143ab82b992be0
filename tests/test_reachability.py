import math

from workerpool.reachability import Reachability

GRACE, SLOW, QUIET = 30.0, 10.0, 20.0


def test_while_the_store_answers_in_time_the_cutoff_is_now():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(110.0, 0.01)
    assert reach.cutoff(120.0) == 120.0
    assert reach.span is None


def test_failed_steps_hold_back_leases_expired_since_the_store_last_answered_until_a_lease_after_it_is_back():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
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
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(110.0, 0.01)
    reach.answered(135.0, 15.0)
    assert reach.span == (110.0, 135.0)
    assert reach.cutoff(140.0) == 110.0
    reach.answered(145.0, 0.01)  # answering in time again does not end the hold early
    assert reach.cutoff(150.0) == 110.0
    assert reach.cutoff(166.0) == 166.0


def test_a_process_that_starts_during_an_outage_holds_back_every_lease_expired_before_it_reached_the_store():
    # The outage may have begun long before this process started: live owners' leases expired then.
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.failed()
    assert reach.cutoff(150.0) == -math.inf
    reach.answered(160.0, 0.01)
    assert reach.span == (-math.inf, 160.0)
    assert reach.cutoff(170.0) == -math.inf  # owners get a lease to renew
    assert reach.cutoff(190.0) == 190.0


def test_a_first_step_that_answers_late_holds_back_every_lease_expired_before_it():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(135.0, 15.0)
    assert reach.span == (-math.inf, 135.0)
    assert reach.cutoff(140.0) == -math.inf


def test_a_process_whose_first_step_answers_in_time_sweeps_at_once():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(100.0, 0.01)
    assert reach.span is None
    assert reach.cutoff(100.0) == 100.0


def test_an_outage_within_the_hold_of_another_extends_it_from_the_first_ones_start():
    # The store comes back, then fails a step again (a second busy timeout, a Redis restarting twice): the
    # owners whose leases expired in the first outage had only the short window between to renew.
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(100.0, 0.01)
    reach.failed()
    reach.answered(160.0, 0.01)  # held back until 190
    reach.failed()
    assert reach.cutoff(170.0) == 100.0  # not 160: the first outage's leases are still held back
    reach.answered(175.0, 0.01)
    assert reach.span == (100.0, 175.0)
    assert reach.cutoff(200.0) == 100.0  # a lease after the second outage, not the first
    assert reach.cutoff(205.0) == 205.0


def test_a_late_answer_within_the_hold_extends_it_too():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(100.0, 0.01)
    reach.failed()
    reach.answered(160.0, 0.01)
    reach.answered(180.0, 15.0)  # a paused Redis
    assert reach.span == (100.0, 180.0)
    assert reach.cutoff(200.0) == 100.0


def test_an_outage_after_the_hold_ended_is_an_outage_of_its_own():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(100.0, 0.01)
    reach.failed()
    for now in (160.0, 170.0, 180.0, 190.0, 195.0):  # steps a third of a lease apart or less
        reach.stepping(now)
        reach.answered(now, 0.01)  # the hold ended at 190
    reach.failed()
    assert reach.cutoff(200.0) == 195.0
    reach.answered(210.0, 0.01)
    assert reach.span == (195.0, 210.0)


def test_a_step_that_begins_after_a_pause_of_this_process_holds_back_the_leases_expired_meanwhile():
    # Stopped (SIGSTOP, a paused VM) from 110 to 160: the store may have been out meanwhile, for every other
    # process too, and let live owners' leases expire; this process saw nothing of it, no step failed.
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(110.0, 0.01)
    reach.stepping(160.0)
    assert reach.cutoff(160.0) == 110.0  # owners get a lease to renew
    reach.answered(160.5, 0.01)
    assert reach.cutoff(189.0) == 110.0
    assert reach.cutoff(190.0) == 190.0
    assert reach.span is None  # nobody here saw the store unreachable: leases still expired are lost as usual


def test_a_pause_that_ends_in_a_failed_step_is_held_back_from_before_the_pause():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(110.0, 0.01)
    reach.stepping(160.0)
    reach.failed()
    assert reach.cutoff(170.0) == 110.0
    reach.answered(180.0, 0.01)
    assert reach.span == (110.0, 180.0)
    assert reach.cutoff(209.0) == 110.0
    assert reach.cutoff(210.0) == 210.0


def test_steps_on_the_keepers_schedule_hold_nothing_back():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    for now in (100.0, 110.0, 120.0, 139.9):  # a period apart, the last after a step as slow as allowed
        reach.stepping(now)
        assert reach.cutoff(now) == now
        reach.answered(now, 0.01)


def test_a_pause_within_the_hold_of_an_outage_extends_it_from_the_outages_start():
    reach = Reachability(grace=GRACE, slow=SLOW, quiet=QUIET)
    reach.answered(100.0, 0.01)
    reach.failed()
    reach.answered(160.0, 0.01)  # held back until 190
    reach.stepping(185.0)  # after a pause
    reach.answered(185.0, 0.01)
    assert reach.span == (100.0, 160.0)  # the outage seen, not the pause
    assert reach.cutoff(214.0) == 100.0
    assert reach.cutoff(215.0) == 215.0
