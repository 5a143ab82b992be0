"""A task store in Redis, shared by any number of service instances.

Every transition is one Lua script, so it is atomic in Redis whatever other
instances do at the same moment. Keys (``P`` is the prefix with its hash tag,
``{workerpool}`` by default, so a Redis Cluster keeps them in one slot):

- ``P:t:<id>``: a hash per task (times as decimal strings, payload and result as JSON text);
- ``P:new``: queued tasks not yet started, scored by due time (the admission bound is its size);
- ``P:retry``: queued tasks waiting out a retry backoff, scored by due time (queue members are
  ``<sequence>:<id>``, so tasks due at the same time keep their order of arrival);
- ``P:run``: running attempts, scored by lease expiry; ``P:own:<owner>`` the ids one owner runs;
- ``P:all`` and ``P:st:<state>``: every retained id, scored by a sequence number (listing order);
- ``P:fin``: finished ids scored by finish time (retention);
- ``P:created``: the newest ``created_at`` admitted (creation times never run backwards in listing order);
- ``P:entered``: the newest ``started_at`` or ``finished_at`` written (nor do those, listed by state);
- ``P:position-key``: random bytes, what the listings' positions handed out are signed with (``position_key``);
- ``P:signal``: tokens pushed when work becomes claimable; idle workers block on it (``BLPOP``)
  together with ``P:wake:<instance>``, which only this instance pushes to (shutdown).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import secrets
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import DuplicateTask, QueueFull, StoreOutOfMemory, StorePartlyAdmitted, StoreUnavailable, SubmitError
from ..nesting import stored_result
from ..task import State, Task
from .base import (
    LOST_EXPIRED,
    LOST_UNREACHABLE,
    Page,
    Position,
    Renewal,
    StoreStats,
    TaskStore,
    check_position,
    full_queue_delays,
    lost_while_unreachable,
)

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py works without it
    _hiredis_pack = None

log = logging.getLogger(__name__)

_FIELDS = Task._fields
_FLOAT_FIELDS = frozenset({"created_at", "started_at", "finished_at", "next_attempt_at"})
_JSON_FIELDS = frozenset({"payload", "result"})
_INT_FIELDS = frozenset({"max_retries", "attempts"})
# What a listing reads: never the payload, which it does not show, nor the result when it leaves that out.
_LISTED_FIELDS = tuple(name for name in _FIELDS if name != "payload")
_LISTED_BUT_RESULT = tuple(name for name in _LISTED_FIELDS if name != "result")
_STATES = tuple(State)
_STATE_NAMES = tuple(str(state) for state in _STATES)  # as the stats script takes them
_MAX_WAIT = 2.0  # seconds a worker blocks at most before looking again (Redis restarts, lost tokens)
# Tasks one admission script carries at most: a larger batch goes in several, one after another, and a group
# commit merges admissions up to it. Redis runs nothing else while a script runs: admissions merged without a
# bound (four batches of 100,000 in one script) kept it busy past every client's socket timeout, for every
# instance, and one batch of 100,000 alone (9.5 s on a loaded machine) was stored, yet answered as timed out.
GROUP_MAX_TASKS = 1000
_HAND_OVER_TRIES = 10  # runs of an admission's interrupted hand-over at most (see RedisStore._hand_over_to_the_end)
# Redis ends a BLPOP whose timeout passed only at a tick of its timer, hz times a second: up to
# 100 ms late at the default hz 10. A wait for a due time blocks until this long before it, then
# looks for a token every _DUE_POLL_S until the due time.
_BLPOP_LATE_S = 0.1
_DUE_POLL_S = 0.005

# A thread's connection idle longer than this is looked at before its next command (see RedisStore._client):
# Redis's own `timeout` (1 s at least) and proxies close idle connections, which only a read tells.
_IDLE_CHECK_S = 1.0

# Forks this process descends from: a thread's client made under another count belongs to an
# ancestor (see RedisStore._client). Comparing os.getpid() instead cost a system call per command.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)

# What every script shares: forgetting a task, wake-up tokens, the deadline.
_PRELUDE = """
local P = KEYS[1]
local function forget(id)
  local state = redis.call('HGET', P .. ':t:' .. id, 'state')
  redis.call('DEL', P .. ':t:' .. id)
  redis.call('ZREM', P .. ':all', id)
  redis.call('ZREM', P .. ':fin', id)
  if state then redis.call('ZREM', P .. ':st:' .. state, id) end
end
local function signal(n)
  local length
  if n == 1 then  -- one token needs no table
    length = redis.call('LPUSH', P .. ':signal', '1')
  else
    local tokens = {}  -- more than 256 tokens would only wake workers for nothing
    for i = 1, math.min(n, 256) do tokens[i] = '1' end  -- strings: a number costs Redis a %.17g
    length = redis.call('LPUSH', P .. ':signal', unpack(tokens))
  end
  -- Tokens pile up only while every worker is busy; trimming to half keeps the trims rare.
  if length > 256 then redis.call('LTRIM', P .. ':signal', '0', '127') end
end
-- A client gives up on a step after its socket timeout and reports it as not done: a script that
-- only reaches Redis after the client's deadline (Redis paused, or busy with a slow command) must
-- change nothing, and answer an error in case the client still listens. The deadline is the
-- client's wall clock; the hosts' clocks must agree (leases already need that).
-- (A string: the error table is made only when it is returned, {err = LATE}.)
local LATE = 'LATE the step reached Redis after its deadline; nothing was changed'
-- A number from its decimal or hexadecimal text. Arithmetic converts a string with one strtod, where
-- tonumber runs strtod twice (once to check the text, once to convert it): its calls were about 7 % of
-- redis-server's instructions per admission.
local function num(text) return text + 0 end
local function too_late(deadline)
  if deadline == '' then return false end
  local now = redis.call('TIME')
  return num(now[1]) + num(now[2]) / 1000000 > num(deadline)
end
"""

# Redis runs nothing else while a script runs, so a script's work must not grow with how many tasks aged
# out at once (a large batch that finished STATE_TTL_S ago). Tasks one script forgets at most: forgetting
# 1,000 took 12 ms of Redis CPU (a private redis-server, 2 cores, busy), 100 about 1.5 ms.
FORGET_AT_MOST = 100
# Ids past their time a listing passes over in one script at most (see _LIST): about 5 us each.
PASS_AT_MOST = 250

# The bounds as the scripts that evict and list read them (all but the admission, see _STEPS).
_BOUNDS = f"""
local FORGET_AT_MOST, FORGET_AT_MOST_TEXT = {FORGET_AT_MOST}, '{FORGET_AT_MOST}'
local PASS_AT_MOST = {PASS_AT_MOST}
"""

# What the steps of running tasks and the readers share besides, eviction and queueing a retry among
# them (the admission does without: each function a script defines is made anew on every call).
_STEPS = """
-- By age (what finished at or before cutoff), and by count unless max_finished is nil: the count
-- only grows when a task becomes final, and every step that makes one final evicts by count, so
-- other steps need not look. A cutoff passed as a string goes to Redis as it is: a Lua number
-- would be formatted with snprintf's %.17g, which costs Redis more than the command.
-- Returns true when it forgot as many as it may by age in one call: more may be past the cutoff still,
-- and a reader then looks at the finish time of each task it reads (see aged).
local function evict(cutoff, max_finished)
  local old = redis.call('ZRANGEBYSCORE', P .. ':fin', '-inf', cutoff, 'LIMIT', '0', FORGET_AT_MOST_TEXT)
  for _, id in ipairs(old) do
    forget(id)
  end
  local more = #old == FORGET_AT_MOST
  if not max_finished then return more end
  local excess = redis.call('ZCARD', P .. ':fin') - max_finished
  if excess > 0 then
    local last = string.format('%d', math.min(excess, FORGET_AT_MOST) - 1)
    for _, id in ipairs(redis.call('ZRANGE', P .. ':fin', '0', last)) do forget(id) end
  end
  return more
end
-- Whether id's task finished at or before cutoff: retention forgot it, or will (see evict).
local function aged(id, cutoff)
  local finished = redis.call('ZSCORE', P .. ':fin', id)
  return finished and num(finished) <= cutoff
end
-- Numbers go to Redis as strings here, as in the admission (see _ADMIT).
-- Queue members are "<16-digit sequence>:<id>": equal due times then keep their order of arrival.
-- Returns the member, which the caller stores in the task's hash as queue_member.
local function enqueue(zset, due, id)
  local member = string.format('%016d:', redis.call('INCR', P .. ':seq')) .. id
  redis.call('ZADD', P .. zset, due, member)
  return member
end
-- The caller writes the new state into the task's hash with its other fields (one HSET).
local function move_index(id, old, new)
  redis.call('ZREM', P .. ':st:' .. old, id)
  redis.call('ZADD', P .. ':st:' .. new, string.format('%d', redis.call('INCR', P .. ':seq')), id)
end
local function dequeue(id)
  local member = redis.call('HGET', P .. ':t:' .. id, 'queue_member')
  if member then
    redis.call('ZREM', P .. ':new', member)
    redis.call('ZREM', P .. ':retry', member)
    redis.call('HDEL', P .. ':t:' .. id, 'queue_member')
  end
end
-- A step's time is stamped before its script runs, so racing steps (from any instance) may arrive
-- out of stamp order. As creation times at admission, the time a task starts or becomes final is
-- clamped to the newest one stamped so far, so that a listing by state never runs backwards in the
-- times it shows. The time stays the exact string the step was given, or the newer one's. Read once
-- per script, written once per time (an end and the next claim share theirs).
local entered = nil
local function entry_time(now)
  if entered == nil then entered = redis.call('GET', P .. ':entered') or false end
  if entered == now then return now end
  if entered and num(entered) > num(now) then return entered end
  entered = now
  redis.call('SET', P .. ':entered', now)
  return now
end
-- Extra field/value pairs (a result, an error) go into the same HSET as the state.
local function finalize(id, key, old, new, now, ...)
  local at = entry_time(now)
  redis.call('HSET', key, 'state', new, 'finished_at', at, ...)
  redis.call('HDEL', key, 'payload', 'next_attempt_at', 'owner', 'lease_until', 'claimed_after')
  redis.call('ZADD', P .. ':fin', at, id)
  move_index(id, old, new)
end
-- The earliest due time of a queued task (Redis formats scores exactly), or false.
local function first_due()
  local first = false
  for _, name in ipairs({':new', ':retry'}) do
    local head = redis.call('ZRANGE', P .. name, '0', '0', 'WITHSCORES')
    if #head > 0 and (not first or num(head[2]) < num(first)) then first = head[2] end
  end
  return first
end
-- Due retries first, then the oldest due new task; when none is due, the earliest due time (or false).
-- after: '<id>:<attempt>' of the attempt whose end the same step recorded, or the claim's own tag ('~<n>'),
-- kept on the claimed task while it runs, so that the step asked again finds it (see claimed_before).
local function claim(now, owner, lease_until, after)
  for _ = 1, 100 do
    local zset = P .. ':retry'
    local members = redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', '0', '1')
    if #members == 0 then
      zset = P .. ':new'
      members = redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', '0', '1')
    end
    if #members == 0 then
      -- Nothing is due now, so the tokens left tell of work already taken: without them the next
      -- idle worker blocks at once instead of waking for nothing. Work admitted later pushes anew.
      -- A token taken here may be that of work due by the time the worker waits (delayed, a retry,
      -- or admitted after this step's time was stamped): the due time returned bounds that wait.
      redis.call('DEL', P .. ':signal')
      return first_due()
    end
    local id = string.sub(members[1], 18)
    local key = P .. ':t:' .. id
    redis.call('ZREM', zset, members[1])
    -- A queued task's hash holds its state, and no claimed_after (an end removes it): five new fields
    -- mean there was no hash, which Redis evicted (a maxmemory-policy other than noeviction). Its
    -- leftovers go; the next task is taken.
    local added = redis.call('HSET', key, 'state', 'running', 'started_at', entry_time(now), 'owner', owner,
      'lease_until', lease_until, 'claimed_after', after)
    if added == 5 then
      redis.call('DEL', key)
      redis.call('ZREM', P .. ':all', id)
      redis.call('ZREM', P .. ':st:queued', id)
    else
      redis.call('HINCRBY', key, 'attempts', '1')
      redis.call('HDEL', key, 'next_attempt_at', 'queue_member', 'ended')
      move_index(id, 'queued', 'running')
      redis.call('ZADD', P .. ':run', lease_until, id)
      redis.call('SADD', P .. ':own:' .. owner, id)
      return redis.call('HGETALL', key)
    end
  end
  return now  -- a hundred evicted tasks skipped: the caller looks again at once
end
-- The task that a step claimed with the tag after (see claim) for owner, if it is still that owner's and
-- running: its id and key; else nil.
local function claimed_with(owner, after)
  for _, id in ipairs(redis.call('SMEMBERS', P .. ':own:' .. owner)) do
    local key = P .. ':t:' .. id
    if redis.call('HGET', key, 'claimed_after') == after then return id, key end
  end
end
-- The task claimed_with finds, its lease renewed to lease_until; else false. Only for a step asked again
-- after a try whose reply was lost: that try may have claimed a task that no thread of the owner runs.
local function claimed_before(owner, after, lease_until)
  local id, key = claimed_with(owner, after)
  if not id then return false end
  redis.call('HSET', key, 'lease_until', lease_until)
  redis.call('ZADD', P .. ':run', lease_until, id)
  return redis.call('HGETALL', key)
end
-- The running task id (its hash: key), which owner claimed, put back in its queue unrun, its attempt not
-- counted. A new task goes back to its place (its member as admitted: its sequence number is its score in
-- P:all), due at its creation; a retry falls due now; one whose cancel was requested meanwhile is
-- cancelled, as a queued one is.
local function put_back_task(id, key, owner, now, ttl, max_finished)
  redis.call('ZREM', P .. ':run', id)
  redis.call('SREM', P .. ':own:' .. owner, id)
  local attempts = redis.call('HINCRBY', key, 'attempts', '-1')
  if attempts == 0 then redis.call('HDEL', key, 'attempts', 'started_at') end  -- as admitted: no attempts, no start
  if redis.call('HGET', key, 'cancel_requested') == '1' then
    finalize(id, key, 'running', 'cancelled', now)
    evict(num(now) - num(ttl), num(max_finished))
    return
  end
  local member
  if attempts == 0 then
    redis.call('HDEL', key, 'owner', 'lease_until', 'claimed_after')
    local seq = redis.call('ZSCORE', P .. ':all', id)
    local created = redis.call('HGET', key, 'created_at')
    if seq then
      member = string.format('%016d:', num(seq)) .. id
      redis.call('ZADD', P .. ':new', created, member)
    else  -- its entry in P:all evicted (a maxmemory-policy other than noeviction): behind those created with it
      member = enqueue(':new', created, id)
    end
    redis.call('HSET', key, 'state', 'queued', 'queue_member', member)
  else
    redis.call('HDEL', key, 'owner', 'lease_until', 'claimed_after')
    member = enqueue(':retry', now, id)
    redis.call('HSET', key, 'state', 'queued', 'next_attempt_at', now, 'queue_member', member)
  end
  move_index(id, 'running', 'queued')
  signal(1)
end
-- The task claimed_with finds, put back (see put_back_task). Only for an end asked again without a claim (its
-- instance drains and claims nothing): the lost try may have claimed a task that no thread of the owner will
-- run, which would hold the drain until its deadline, then fail as abandoned without having run.
local function put_back(owner, after, now, ttl, max_finished)
  local id, key = claimed_with(owner, after)
  if id then put_back_task(id, key, owner, now, ttl, max_finished) end
end
-- A compare-and-set on (state, attempt, owner), with created (its created_at as stored, or '') on the task
-- being the one created then (not a new one with its id), and with expired_before on the lease having expired.
-- With own, the end its owner records (not one a recovery or an abandon writes for it) marks the task
-- 'ended' with the attempt, until the next claim: with again (the step asked again after a try whose
-- reply was lost, which Redis may have run), a task so marked answers as it is now, rather than false,
-- which would say the end was not recorded.
local function finish(id, attempt, owner, now, ttl, max_finished, has_error, err, result, retry_at, expired_before,
    created, again, own)
  local key = P .. ':t:' .. id
  local cur = redis.call('HMGET', key, 'state', 'attempts', 'owner', 'cancel_requested', 'lease_until', 'created_at')
  if created ~= '' and cur[6] ~= created then return false end
  if cur[1] ~= 'running' or cur[2] ~= attempt or cur[3] ~= owner then
    if again and cur[2] == attempt and redis.call('HGET', key, 'ended') == attempt then
      return redis.call('HGETALL', key)
    end
    return false
  end
  if expired_before ~= '' and num(cur[5] or '0') > num(expired_before) then return false end
  local ended = own and attempt or ''
  redis.call('ZREM', P .. ':run', id)
  redis.call('SREM', P .. ':own:' .. owner, id)
  if has_error == '0' then
    finalize(id, key, 'running', 'done', now, 'ended', ended, 'result', result)
  elseif cur[4] ~= '1' and retry_at ~= '' then
    local member = enqueue(':retry', retry_at, id)  -- the exact decimal text, which Redis reads
    redis.call('HSET', key, 'state', 'queued', 'last_error', err, 'next_attempt_at', retry_at, 'queue_member', member,
      'ended', ended)
    redis.call('HDEL', key, 'owner', 'lease_until', 'claimed_after')
    move_index(id, 'running', 'queued')
    signal(1)
    return redis.call('HGETALL', key)
  else
    finalize(id, key, 'running', cur[4] == '1' and 'cancelled' or 'failed', now, 'ended', ended, 'last_error', err)
  end
  evict(num(now) - num(ttl), num(max_finished))
  return redis.call('HGETALL', key)
end
"""

# ARGV: capacity (the same in every call: packed once, see RedisStore), the cutoff of eviction by age,
# the deadline, the number of tasks, then per task (see _task_args): its id, its created_at as stored
# (decimal), the same in hexadecimal, its next_attempt_at as stored or '', its max_retries, its payload
# as JSON text (null too), its request_id or '' (none), the count n of entries that follow, and n
# entries: the names and values of its fields that are neither these nor at their defaults for a new
# task (n is 0 for every task the service submits). The names of the usual fields are the script's own
# strings: every argument costs Redis a string made for Lua and a slot of ARGV, more than a table entry.
# A new task's state is queued; attempts 0 and cancel_requested false are not stored (a missing field
# reads as its default everywhere, and a claim's HINCRBY starts from 0).
# A task's due time is its next_attempt_at, else its created_at, as stored. Lua (with the C
# library's strtod) reads a decimal time with multiple-precision arithmetic, and Redis formats a Lua
# number it is given with snprintf: both cost Redis more than the commands. So the script reads times
# only in hexadecimal, gives Redis its numbers as strings, and stores the decimal text as it came. What
# Redis itself reads (a score, a ZRANGEBYSCORE bound) is decimal: Redis 8.0 to 8.6 parse a range bound
# with a reader of decimal numbers only, and would refuse a hexadecimal one.
# Eviction by age is not the admission's: readers evict before they read, and so does every step that
# makes a task final. An admission only has to see that an id it is given belongs to a task old enough
# to be forgotten (a forgotten id may be submitted again): it forgets that one task, then admits.
_ADMIT = """
if too_late(ARGV[3]) then return {err = LATE} end
local capacity = num(ARGV[1])
local cutoff = ARGV[2]
-- True if id's task finished at or before the cutoff (eviction by age would have forgotten it), now forgotten.
local function aged_out(id)
  local finished = redis.call('ZSCORE', P .. ':fin', id)
  if finished and num(finished) <= num(cutoff) then
    forget(id)
    return true
  end
  return false
end
local waiting = redis.call('ZCARD', P .. ':new')
-- Submitters stamp created_at before this script, so racing submits (from any instance) may
-- arrive out of stamp order: clamp to the newest admitted one's, so that creation times never
-- run backwards in listing order. Times stay the exact strings the submitters wrote.
local last = redis.call('GET', P .. ':created')
local last_at = last and num(last)  -- the one decimal read per call
local out, admitted = {}, 0
local left = num(ARGV[4])  -- tasks not yet looked at
local next_seq, last_seq = 1, 0  -- sequence numbers reserved by this call and not used yet
local i = 5
while i <= #ARGV do
  local id, created, next_at, extra = ARGV[i], ARGV[i + 1], ARGV[i + 3], ARGV[i + 7]
  local at, first = num(ARGV[i + 2]), i + 8
  i = first + (extra == '0' and 0 or num(extra))
  local key = P .. ':t:' .. id
  if waiting >= capacity then  -- a full store only looks
    out[#out + 1] = (redis.call('EXISTS', key) == 1 and not aged_out(id)) and 'duplicate' or 'full'
  else
    if next_seq > last_seq then  -- one INCRBY for the tasks left rather than an INCR per task
      last_seq = redis.call('INCRBY', P .. ':seq', string.format('%d', left))
      next_seq = last_seq - left + 1
    end
    -- One formatting per task: the zero-padded sequence is the listing score (Redis reads it as
    -- decimal) and the head of the queue member, as enqueue (_STEPS) makes it.
    local seq = string.format('%016d', next_seq)
    -- Every retained task's id is in P:all (admission adds both it and the hash, forget removes
    -- both): adding the id there unless present is the duplicate check.
    if redis.call('ZADD', P .. ':all', 'NX', seq, id) == 0
        and not (aged_out(id) and redis.call('ZADD', P .. ':all', 'NX', seq, id) == 1) then
      out[#out + 1] = 'duplicate'
    else
      if last_at and at < last_at then created, at = last, last_at end
      last, last_at = created, at
      redis.call('ZADD', P .. ':st:queued', seq, id)
      local member = seq .. ':' .. id
      redis.call('ZADD', P .. ':new', next_at == '' and created or next_at, member)  -- its due time
      local payload, request_id = ARGV[first - 3], ARGV[first - 2]
      if next_at == '' and payload ~= '' and request_id ~= '' and first == i then
        -- A task as the service submits it: its fields go to HSET without a table (every table a
        -- script makes is garbage that Redis's Lua then collects, at a cost of its own).
        redis.call('HSET', key, 'id', id, 'created_at', created, 'queue_member', member, 'state', 'queued',
          'max_retries', ARGV[first - 4], 'payload', payload, 'request_id', request_id)
      else
        local fields = {'id', id, 'created_at', created, 'queue_member', member, 'state', 'queued',
          'max_retries', ARGV[first - 4]}
        if next_at ~= '' then fields[#fields + 1] = 'next_attempt_at'; fields[#fields + 1] = next_at end
        if payload ~= '' then fields[#fields + 1] = 'payload'; fields[#fields + 1] = payload end
        if request_id ~= '' then fields[#fields + 1] = 'request_id'; fields[#fields + 1] = request_id end
        for j = first, i - 1 do fields[#fields + 1] = ARGV[j] end
        redis.call('HSET', key, unpack(fields))
      end
      next_seq = next_seq + 1
      waiting = waiting + 1
      admitted = admitted + 1
      out[#out + 1] = created
    end
  end
  left = left - 1
end
if admitted > 0 then
  redis.call('SET', P .. ':created', last)
  signal(admitted)
end
return out
"""

# ARGV: now, owner, lease_until, deadline, the claim's tag, and '1' when it is asked again (see RedisStore.claim).
_CLAIM = """
if too_late(ARGV[4]) then return {err = LATE} end
if ARGV[6] == '1' then
  local before = claimed_before(ARGV[2], ARGV[5], ARGV[3])
  if before then return before end
end
return claim(ARGV[1], ARGV[2], ARGV[3], ARGV[5])
"""

# ARGV: owner, the tag of a claim whose reply was lost (see RedisStore.claim), now, ttl, max_finished, deadline.
# Puts back the task that claim took, if it took one (see put_back).
_PUT_BACK = """
if too_late(ARGV[6]) then return {err = LATE} end
put_back(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return 0
"""

# ARGV: id, attempt, owner, now, ttl, max_finished, deadline. Puts the task back if owner still runs that attempt
# (see RedisStore.put_back); returns it, or false.
_PUT_BACK_CLAIM = """
if too_late(ARGV[7]) then return {err = LATE} end
local key = P .. ':t:' .. ARGV[1]
local cur = redis.call('HMGET', key, 'state', 'attempts', 'owner')
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] or cur[3] ~= ARGV[3] then return false end
put_back_task(ARGV[1], key, ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return redis.call('HGETALL', key)
"""

# ARGV: id, attempt, owner, now, ttl, max_finished, has_error, error, result, retry_at, expired_before,
# created_at as stored or '' (see finish), deadline, and '1' when the end is asked again (see
# RedisStore._again) or '0' when it is written for the attempt's owner (see RedisStore._end_for_owner).
# Asked again, it also puts back the task its lost try may have claimed, if that try was a finish_and_claim
# (see put_back).
_FINISH = """
if too_late(ARGV[13]) then return {err = LATE} end
local a = ARGV
local ended = finish(a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[14] == '1',
  a[14] ~= '0')
if a[14] == '1' then put_back(a[3], a[1] .. ':' .. a[2], a[4], a[5], a[6]) end
return ended
"""

# ARGV: those of _FINISH up to the deadline, lease_until, and '1' when asked again. Returns {the ended task or
# false, the claimed one or false}. Asked again, the task a try whose reply was lost claimed (its owner's, and
# running, with no thread of that owner's to run it; claimed whether or not that try's end counted) is the one
# answered, its lease renewed: claiming another would leave it to run out its lease, then count an attempt that
# never ran as lost.
_FINISH_AND_CLAIM = """
if too_late(ARGV[13]) then return {err = LATE} end
local a = ARGV
local after = a[1] .. ':' .. a[2]
if a[15] ~= '1' then
  return {finish(a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], false, true),
    claim(a[4], a[3], a[14], after)}
end
local ended = finish(a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], true, true)
return {ended, claimed_before(a[3], after, a[14]) or claim(a[4], a[3], a[14], after)}
"""

# ARGV: owner, lease_until, ids... Returns {lost ids, cancel-requested ids}.
_RENEW = """
local lost, cancel = {}, {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local cur = redis.call('HMGET', P .. ':t:' .. id, 'state', 'owner', 'cancel_requested')
  if cur[1] ~= 'running' or cur[2] ~= ARGV[1] then
    lost[#lost + 1] = id
  else
    redis.call('HSET', P .. ':t:' .. id, 'lease_until', ARGV[2])
    redis.call('ZADD', P .. ':run', ARGV[2], id)
    if cur[3] == '1' then cancel[#cancel + 1] = id end
  end
end
return {lost, cancel}
"""

# ARGV: ids. Returns those whose cancel was requested; reads only.
_CANCEL_REQUESTED = """
local flagged = {}
for i = 1, #ARGV do
  if redis.call('HGET', P .. ':t:' .. ARGV[i], 'cancel_requested') == '1' then flagged[#flagged + 1] = ARGV[i] end
end
return flagged
"""

# ARGV: id, now, ttl, max_finished, deadline. Returns {1 if this call changed the task else 0, its
# fields}, or false for an unknown id. It evicts first, as readers do: a task past its retention is unknown
# here too (as to GET), never answered as already final.
_CANCEL = """
if too_late(ARGV[5]) then return {err = LATE} end
local id, now = ARGV[1], ARGV[2]
local cutoff = num(now) - num(ARGV[3])
if evict(cutoff, num(ARGV[4])) and aged(id, cutoff) then return false end
local key = P .. ':t:' .. id
local state = redis.call('HGET', key, 'state')
if not state then return false end
local changed, snapshot = 1, nil
if state == 'queued' then
  dequeue(id)
  finalize(id, key, 'queued', 'cancelled', now)
  snapshot = redis.call('HGETALL', key)  -- before eviction, which may forget this very task
  evict(cutoff, num(ARGV[4]))
elseif state == 'running' and redis.call('HGET', key, 'cancel_requested') ~= '1' then
  redis.call('HSET', key, 'cancel_requested', '1')
else
  changed = 0
end
return {changed, snapshot or redis.call('HGETALL', key)}
"""

# ARGV: now, ttl, max_finished, id. Readers evict first, so a forgotten task is never seen; one that eviction
# had no room for in this call is not shown either.
_GET = """
local cutoff = num(ARGV[1]) - num(ARGV[2])
if evict(cutoff, num(ARGV[3])) and aged(ARGV[4], cutoff) then return {} end
return redis.call('HGETALL', P .. ':t:' .. ARGV[4])
"""

# ARGV: id. Removes the task's hash and every trace of its id when the hash is missing or lacks the id every
# admission writes (Redis evicted it, and a step wrote to it since); 1 if there was something to remove
# (a task that finished and was forgotten since its lease was read left nothing), else 0.
_DROP_LEFTOVER = """
local id = ARGV[1]
local key = P .. ':t:' .. id
if redis.call('HEXISTS', key, 'id') == 1 then return 0 end
local owner = redis.call('HGET', key, 'owner')
local found = redis.call('DEL', key) + redis.call('ZREM', P .. ':run', id)
for _, index in ipairs({':all', ':fin', ':st:queued', ':st:running', ':st:done', ':st:failed', ':st:cancelled'}) do
  redis.call('ZREM', P .. index, id)
end
if owner then redis.call('SREM', P .. ':own:' .. owner, id) end
return found > 0 and 1 or 0
"""

# ARGV: now, ttl, max_finished, state or '', limit, below, then the fields to read (none: all of them).
# Returns {below, scores, tasks}: the tasks newest first, from those listed below the score below ('+inf' at
# first, else '(' and a score), each task's score in its index, and where the listing goes on, or '' when it
# is complete. A place in an index is a score, read on from by score (ZREVRANGEBYSCORE with an exclusive
# bound), never by rank: each score is a number of P:seq's own (INCR), so it names one entry, and tasks
# entering the index meanwhile take higher scores and shift nothing below it, whatever other scripts do in
# between.
# When eviction left tasks past their time (more aged at once than it forgets in one call), the walk passes
# over them and reads on down the index until the page is full, so that a page is never short of a task
# that is retained (after a mass expiry, a task admitted before the expired ones is listed below them all).
# It passes over PASS_AT_MOST of them at most: then it answers the page so far and where to go on, and the
# caller runs it again from there, so that no one script keeps Redis from other clients for longer than
# that (99,000 ids passed over in one script kept it busy for 170-230 ms).
_LIST = """
local cutoff = num(ARGV[1]) - num(ARGV[2])
local more = evict(cutoff, num(ARGV[3]))
local index = ARGV[4] == '' and (P .. ':all') or (P .. ':st:' .. ARGV[4])
local limit = num(ARGV[5])
local below = ARGV[6]
local fields = {unpack(ARGV, 7)}
-- Without tasks left past their time, the first ids hold the page (short only of leftovers Redis evicted);
-- with them, each id read is listed or passed over, so the range ends with the page full or PASS_AT_MOST
-- passed over.
local want = more and (limit + PASS_AT_MOST) or limit
local ids = redis.call('ZREVRANGEBYSCORE', index, below, '-inf', 'WITHSCORES', 'LIMIT', '0', string.format('%d', want))
local out, scores = {}, {}
for i = 1, #ids, 2 do
  local id = ids[i]
  if not (more and aged(id, cutoff)) then
    local key = P .. ':t:' .. id
    local task
    if #fields == 0 then
      task = redis.call('HGETALL', key)
    else
      task = {}
      for j, value in ipairs(redis.call('HMGET', key, unpack(fields))) do
        if value then task[#task + 1] = fields[j]; task[#task + 1] = value end
      end
    end
    if #task > 0 then
      out[#out + 1] = task
      scores[#out] = ids[i + 1]
    end
    if #out == limit then return {'', scores, out} end
  end
end
if not more or #ids < 2 * want then return {'', scores, out} end
return {'(' .. ids[#ids], scores, out}
"""

# ARGV: now, ttl, max_finished, then the state names. Returns how many finished tasks are still past their
# time (eviction had no room for them in this call, see evict), then counts per state, waiting, due, retries
# pending. The caller runs it again, with the same now, until none is left (see RedisStore._figures): counting
# them out by state instead would cost a walk of every one.
_STATS = """
local now = ARGV[1]
local cutoff = num(now) - num(ARGV[2])
local out = {0}
if evict(cutoff, num(ARGV[3])) then out[1] = redis.call('ZCOUNT', P .. ':fin', '-inf', cutoff) end
for i = 4, #ARGV do out[#out + 1] = redis.call('ZCARD', P .. ':st:' .. ARGV[i]) end
out[#out + 1] = redis.call('ZCARD', P .. ':new')
out[#out + 1] = redis.call('ZCOUNT', P .. ':new', '-inf', now) + redis.call('ZCOUNT', P .. ':retry', '-inf', now)
out[#out + 1] = redis.call('ZCOUNT', P .. ':retry', '(' .. now, '+inf')
return out
"""

# ARGV: now, ttl, max_finished. Evicts (see evict); returns how many finished tasks are still past their time.
_FORGET = """
local cutoff = num(ARGV[1]) - num(ARGV[2])
if evict(cutoff, num(ARGV[3])) then return redis.call('ZCOUNT', P .. ':fin', '-inf', cutoff) end
return 0
"""

# ARGV: now. What a full queue's refusal tells: how many new tasks are not due yet, how many wait,
# and the earliest due time of a new task, or nothing (a retry's holds no place and frees none).
_QUEUE_DELAYS = """
local new = P .. ':new'
local head = redis.call('ZRANGE', new, '0', '0', 'WITHSCORES')
return {redis.call('ZCOUNT', new, '(' .. ARGV[1], '+inf'), redis.call('ZCARD', new), head[2] or false}
"""

# The commands the store sends itself, with arguments as acl_check_cmd reads them (KEY: one of the store's
# keys); those its scripts run are read from the scripts (see _commands_checked).
_SENT_COMMANDS = (
    ("EVALSHA", "0", "1", "KEY"),
    ("SCRIPT", "LOAD", "return 1"),
    ("BLPOP", "KEY", "0"),
    ("LPOP", "KEY"),
    ("RPUSH", "KEY", "1"),
    ("EXPIRE", "KEY", "60"),
    ("MULTI",),
    ("EXEC",),
    ("ZRANGEBYSCORE", "KEY", "-inf", "+inf"),
    ("HMGET", "KEY", "owner"),
    ("SMEMBERS", "KEY"),
    ("SCARD", "KEY"),
)


def _commands_checked(scripts: Iterable[str]) -> str:
    """A Lua table of the commands the store sends and its ``scripts`` run, each with the arguments
    acl_check_cmd is given (a script's command: one of the store's keys)."""
    run = sorted({name for script in scripts for name in re.findall(r"redis\.call\('([A-Z]+)'", script)})
    commands = [*_SENT_COMMANDS, *((name, "KEY") for name in run if name not in {c[0] for c in _SENT_COMMANDS})]
    return "{" + ", ".join("{" + ", ".join("key" if a == "KEY" else f"'{a}'" for a in c) + "}" for c in commands) + "}"


# Whether Redis lets the store's ACL user run every command the store needs, then a write Redis refuses when
# it cannot take one (maxmemory reached, a read-only replica). Redis keeps what a script wrote before a command
# it refuses: a user refused one command (HSET, HDEL) would fail each step part-way and leave it half done (an
# id admitted without its task, answered 409 and counted queued for ever; a task running without a lease,
# never recovered). So the start and /healthz look first. acl_check_cmd runs nothing; Redis 6 has none.
_HEALTH = """
if redis.acl_check_cmd then
  local refused = {}
  for _, command in ipairs(NEEDED) do
    if not redis.acl_check_cmd(unpack(command)) then
      refused[#refused + 1] = command[1] == 'SCRIPT' and 'SCRIPT LOAD' or command[1]
    end
  end
  if #refused > 0 then
    return {err = 'NOPERM this user has no permissions to run ' .. table.concat(refused, ', ')
      .. ', which the store needs'}
  end
end
redis.call('SET', P .. ':health', ARGV[1], 'PX', 60000)
return 1
"""

# The earliest due time of a queued task (Redis formats scores exactly), or nothing.
_FIRST_DUE = """
return first_due()
"""


class _KernelTimeoutConnection(redis.Connection):
    """A TCP connection whose socket timeout the kernel keeps (SO_RCVTIMEO, SO_SNDTIMEO).

    On a socket with a Python timeout, CPython polls before every send and
    every receive, and gives up the interpreter lock around the poll as well
    as around the call: two system calls and two hand-offs of the lock per
    round trip that a blocking socket does without. The kernel's timeouts
    bound each send and receive as the Python timeout did; when one passes,
    the call fails with EAGAIN, which redis-py reports as a ConnectionError
    and answers by dropping the connection, as it does after a timeout, so a
    late reply is never read as the next command's (see _unavailable for how the
    store reports it). ``socket_timeout`` stays in the pool's options (the
    store's deadline is derived from it).
    """

    def __init__(self, *, socket_timeout: float | None = None, **options: Any) -> None:
        super().__init__(socket_timeout=None, **options)
        self._kernel_timeout = socket_timeout

    def _connect(self) -> socket.socket:
        sock = super()._connect()  # blocking from here on: its timeout is None (see __init__)
        if self._kernel_timeout is not None:
            seconds = int(self._kernel_timeout)
            microseconds = min(999_999, round((self._kernel_timeout - seconds) * 1_000_000))
            # 0 would mean no timeout at all to the kernel: a positive timeout rounds up to 1 µs at least.
            timeval = struct.pack("@ll", seconds, microseconds or (0 if seconds else 1))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        return sock


# What an ACL user of the store must be allowed to run, said when Redis refuses one of them (docs/redis.md too).
_ACL_COMMANDS = (
    "EVALSHA, SCRIPT LOAD, BLPOP, LPOP, RPUSH, EXPIRE, MULTI, EXEC, ZRANGEBYSCORE, HMGET, SMEMBERS and SCARD, and in "
    "its scripts "
    "TIME and the string, hash, list, set and sorted-set commands: +@all -@dangerous allows them all"
)


def _unavailable(exc: redis.RedisError, prefix: str) -> StoreUnavailable:
    """The store's error for a failed command; ``prefix`` is the store's key prefix, hash tag included.

    A send or receive past the kernel's timeout (see _KernelTimeoutConnection)
    fails with EAGAIN, which redis-py reports as a ConnectionError: it is told
    here as the timeout it is. Only failures pay for the look, not every call.
    """
    if isinstance(exc, redis.ConnectionError) and isinstance(exc.__context__, BlockingIOError):
        return StoreUnavailable(f"redis: Timeout (no answer within the socket timeout): {exc}")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):  # maxmemory, which this command's own size counts toward
        return StoreOutOfMemory(f"redis: {exc}")
    refusal = str(exc)
    if isinstance(exc, redis.ResponseError) and (
        "no permissions to run" in refusal or "The user executing the script can't run" in refusal
    ):  # Redis names the command only when the store sends it itself: say which ones it uses
        return StoreUnavailable(f"redis: {exc} (an ACL user of the store needs the commands {_ACL_COMMANDS})")
    if isinstance(exc, redis.ResponseError) and (
        "no permissions to access" in refusal or "The user executing the script can't access" in refusal
    ):  # Redis names no key: say which the store uses
        return StoreUnavailable(
            f"redis: {exc} (an ACL user of the store needs its keys: the pattern ~{prefix}*, which covers {prefix} "
            f"itself and every {prefix}:... key)"
        )
    if isinstance(exc, redis.exceptions.AskError):  # MovedError too: a Redis Cluster node that does not serve the slot
        node = f"{exc.host}:{exc.port}"
        if isinstance(exc, redis.exceptions.MovedError):
            where = f"are served by the cluster node {node}, not by the server STORE names"
        else:
            where = f"are being migrated to the cluster node {node}; once they are"
        return StoreUnavailable(
            f"redis: the store's keys (hash slot {exc.slot_id}) {where}: point STORE at that node (the store talks "
            "to that one node and follows no redirection: when a reshard or a failover moves the slot, restart it "
            "with the URL of the node that serves it)"
        )
    if isinstance(exc, redis.ResponseError) and "SELECT is not allowed in cluster mode" in refusal:
        return StoreUnavailable(f"redis: {exc} (a cluster node has database 0 only: end STORE with /0)")
    return StoreUnavailable(f"redis: {exc}")


def _drop_if_closed(connection: redis.Connection) -> None:
    """Disconnect ``connection`` if the server closed it (or it holds a reply nobody asked for): one
    non-blocking read. The next command then connects anew, as redis-py's pool does at each check-out.
    A connection not connected is left alone: its next command connects (and reports an outage)."""
    if connection._sock is None:
        return
    try:
        if not connection.can_read(timeout=0):
            return
    except (redis.ConnectionError, OSError):
        pass  # closed by the server: "Connection closed by server"
    connection.disconnect()


# What redis-py's pool takes for "no cap" (its own default is 100; 0 or None mean that default).
_NO_CONNECTION_CAP = 2**31


def connect(url: str, *, password: str | None = None, timeout: float = 5.0) -> redis.Redis:
    """A client for ``url`` (``redis://`` or ``rediss://``) that never retries a command by itself.

    redis-py retries a command after a timeout by default. A script that timed
    out may still have run, so running it again could admit a stored task a
    second time (and answer 409 for it) or claim a second task: the store
    reports the error instead (StoreUnavailable), and a lease or the caller's
    own retry settles what happened. Over plain TCP the kernel keeps the socket
    timeout (see _KernelTimeoutConnection); TLS keeps Python's.

    The pool has no cap on its connections: each thread keeps one (see
    RedisStore._client), and a pool past its cap (redis-py's default is 100)
    refuses the next thread's command with "Too many connections" instead of
    waiting. How many threads there are is the process's settings' business.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
        "max_connections": _NO_CONNECTION_CAP,
    }
    if url.startswith("redis://"):
        options["connection_class"] = _KernelTimeoutConnection
    if password is not None:
        options["password"] = password
    return redis.Redis.from_url(url, **options)


def password_unneeded(client: redis.Redis, key: str) -> bool:
    """Whether ``client`` authenticates to a server that answers a connection without credentials as well,
    reading ``key`` (one of the store's keys).

    A Redis without ``requirepass`` (its default user ``nopass``) accepts any
    password for that user (redis-py authenticates with ``HELLO 3 AUTH``), so
    a password in the URL or ``REDIS_PASSWORD`` protects nothing and nothing
    says so. One connection without credentials tells: answered, the password
    is not needed. False when the client sends no password, when the server
    asks for one (``NOAUTH``), when its default user may not read ``key``
    (an ACL ``default`` user left only ``PING``: the password guards the
    store), or when the server cannot be reached.
    """
    pool = client.connection_pool
    settings = pool.connection_kwargs
    if not (settings.get("password") or settings.get("credential_provider")):
        return False
    anonymous = {k: v for k, v in settings.items() if k not in ("username", "password", "credential_provider")}
    connection = pool.connection_class(**anonymous)
    try:
        connection.connect()
        connection.send_command("EXISTS", key)
        connection.read_response()
    except redis.RedisError:
        return False
    finally:
        connection.disconnect()
    return True


# json.dumps with any option builds a new encoder on every call: a third of an admission's encoding.
_json_text: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":")).encode


def _float_text(value: Any) -> str:
    return repr(float(value))


# How each field that is not plain str() becomes the text of its hash entry.
_ENCODERS: dict[str, Callable[[Any], str]] = {
    "payload": _json_text,
    "result": _json_text,
    "cancel_requested": lambda value: "1" if value else "0",
    **{name: _float_text for name in _FLOAT_FIELDS},
}


def _task_args(task: Task) -> list[str]:
    """The task as the admission script takes it (see _ADMIT): its id, its created_at in decimal and in
    hexadecimal, its next_attempt_at or '', its max_retries, its payload as JSON (``null`` for None), its request_id or
    '', then the count and the entries of its fields that are not at a new task's defaults.

    Field by field rather than a loop over them all: the loop's lookups cost more than the fields.
    """
    (task_id, payload, max_retries, state, attempts, last_error, created_at, started_at, finished_at, due,
     request_id, result, cancel_requested) = task  # fmt: skip
    rest: list[str] = []
    if state != "queued":
        rest += ("state", str(state))
    if attempts:
        rest += ("attempts", str(attempts))
    if cancel_requested:
        rest += ("cancel_requested", "1")
    if request_id == "":  # '' in its place means none
        rest += ("request_id", "")
    if last_error is not None or started_at is not None or finished_at is not None or result is not None:
        for name, value in (("last_error", last_error), ("started_at", started_at), ("finished_at", finished_at),
                            ("result", result)):  # fmt: skip
            if value is not None:
                rest += (name, _ENCODERS[name](value) if name in _ENCODERS else str(value))
    created_at = float(created_at)
    return [task_id, repr(created_at), created_at.hex(), "" if due is None else _float_text(due), str(max_retries),
            _json_text(payload), "" if request_id is None else str(request_id),
            str(len(rest)), *rest]  # fmt: skip


_AGAIN = ((), ("1",))  # a step's last argument, by whether it is asked again
_FOR_OWNER = ("0",)  # the finish script's last argument for an end written for the attempt's owner


def _decode(flat: Sequence[bytes] | dict[bytes, bytes]) -> Task | None:
    """A task from HGETALL's answer: a flat list from a script, a dict from redis-py.

    None for what is left of a task whose hash Redis evicted (a maxmemory-policy other than
    noeviction) and that a step then wrote to: a hash without the fields every admission writes.
    """
    pairs = flat.items() if isinstance(flat, dict) else zip(flat[::2], flat[1::2])
    raw = {name.decode(): value.decode() for name, value in pairs}
    values: dict[str, Any] = {}
    for name in _FIELDS:
        text = raw.get(name)
        if text is None:
            continue
        if name in _JSON_FIELDS:
            values[name] = stored_result(text) if name == "result" else json.loads(text)
        elif name in _FLOAT_FIELDS:
            values[name] = float(text)
        elif name in _INT_FIELDS:
            values[name] = int(text)
        elif name == "cancel_requested":
            values[name] = text == "1"
        elif name == "state":
            values[name] = State(text)
        else:
            values[name] = text
    if "id" not in values or "max_retries" not in values:
        return None
    values.setdefault("payload", "")  # dropped once the task is final
    return Task(**values)


class _Admission:
    """One admit call's tasks, waiting for the round trip that carries them (see RedisStore.admit)."""

    __slots__ = ("tasks", "args", "count", "ready", "lead", "batch", "sent", "verdicts", "error", "waking")

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = tasks
        # Encoded by the caller, before it joins the queue: a task that cannot be encoded fails its own
        # call alone, not the admissions of the other threads that the same round trip carries.
        texts = [text for task in tasks for text in _task_args(task)]
        self.args, self.count = _pack_texts(texts), len(texts)  # packed for the script's call
        self.ready = threading.Lock()  # held until the verdicts are in or this call is to send
        self.ready.acquire()
        self.lead = False  # holds the turn to send (set under the store's _admissions_lock)
        self.batch: list[_Admission] = []  # the admissions this one took to send, itself first
        self.sent = False  # its batch went out (or was about to): it may be stored
        self.verdicts: Sequence[bytes] | None = None
        self.error: BaseException | None = None
        self.waking: list[_Admission] | None = None  # those its hand-over has still to wake (see _hand_over)


class RedisStore(TaskStore):
    """Tasks in one Redis database under ``prefix``, shared by every instance that uses them."""

    shared: ClassVar[bool] = True

    def __init__(
        self,
        client: redis.Redis,
        *,
        capacity: int,
        ttl: float,
        max_finished: int,
        prefix: str = "workerpool",
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or ttl <= 0 or max_finished < 1:
            raise ValueError("capacity and max_finished must be >= 1 and ttl > 0")
        self.capacity = capacity
        self._ttl = ttl
        self._max_finished = max_finished
        self._clock = clock
        self._monotonic = monotonic
        self._redis = client
        # Each thread's own client (see _client), and what its last step leaves to its next: the next due
        # time (_claimed), a claim or an end whose reply was lost, to be asked again (claim, _again).
        self._local = threading.local()
        # Scripts that change tasks carry a deadline a little before the client's socket timeout.
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._deadline_s = None if timeout is None else max(timeout - 1.0, timeout / 2)
        self._keys = [f"{{{prefix}}}"]
        self._prefix = self._keys[0]
        self._wake_key = f"{self._prefix}:wake:{uuid.uuid4().hex}"
        # Guards _admissions and _admitting: the admissions waiting for the next round trip, and
        # whether one is in flight (see admit).
        self._admissions_lock = threading.Lock()
        self._admissions: list[_Admission] = []
        self._admitting = False
        self._waiters_lock = threading.Lock()  # guards _waiters: how many threads block in wait_for_work
        self._waiters = 0
        # Connection-level failures seen by any thread (see _client): a plain counter, bumped without a
        # lock, since any change of it, not its exact value, makes the other threads connect anew.
        self._outages = 0
        self._claims = itertools.count()  # tags each claim, for the claim asked again (see claim); atomic in CPython
        # Guards _woken, set for good by wake() (the pool is stopping): a wait polling for a due time
        # ends when it is set, and a wait that begins after it returns at once.
        self._woken_changed = threading.Condition(threading.Lock())
        self._woken = False
        scripts = {
            "admit": _ADMIT,
            "claim": _CLAIM,
            "finish": _FINISH,
            "finish_and_claim": _FINISH_AND_CLAIM,
            "put_back": _PUT_BACK,
            "put_back_claim": _PUT_BACK_CLAIM,
            "renew": _RENEW,
            "cancel": _CANCEL,
            "cancel_requested": _CANCEL_REQUESTED,
            "get": _GET,
            "list": _LIST,
            "stats": _STATS,
            "forget": _FORGET,
            "first_due": _FIRST_DUE,
            "queue_delays": _QUEUE_DELAYS,
            "drop_leftover": _DROP_LEFTOVER,
            "health": "",  # below: it checks the commands every other script runs
        }
        checked = _commands_checked([_PRELUDE, _STEPS, *scripts.values(), _HEALTH])
        scripts["health"] = f"local key = P .. ':health'\nlocal NEEDED = {checked}\n" + _HEALTH
        self._scripts = {
            name: client.register_script(_PRELUDE + ("" if name == "admit" else _BOUNDS + _STEPS) + body)
            for name, body in scripts.items()
        }
        self._heads = {name: (_head(script.sha, self._keys[0]), 0) for name, script in self._scripts.items()}
        # The admission's first argument is the same in every call: packed once.
        fixed = (capacity,)
        self._heads["admit"] = (self._heads["admit"][0] + _pack_args(fixed), len(fixed))

    def evicting_policy(self) -> str | None:
        """The server's ``maxmemory-policy`` if it may evict task hashes (``allkeys-*``: they have no expiry).

        None for ``noeviction`` and the ``volatile-*`` policies. StoreUnavailable when the server does not
        tell: INFO is in Redis's ``@dangerous`` category, which an ACL user is often denied, and "unknown"
        must not pass for "safe".
        """
        try:
            info = self._client().info("memory")
        except redis.exceptions.NoPermissionError as exc:  # not the store's keys: _unavailable's hint would mislead
            raise StoreUnavailable(f"redis: {exc}; INFO is in the @dangerous category: grant the user +info") from exc
        except redis.RedisError as exc:
            raise self._failed(exc) from exc
        policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
        return policy if isinstance(policy, str) and policy.startswith("allkeys-") else None

    def primary(self) -> str | None:
        """The address (host:port) of the primary this server replicates, or None: a primary, or a server that
        does not tell (INFO refused to an ACL user, which evicting_policy reports)."""
        try:
            info = self._client().info("replication")
        except redis.exceptions.NoPermissionError:
            return None
        except redis.RedisError as exc:
            raise self._failed(exc) from exc
        if not isinstance(info, dict) or info.get("role") != "slave":
            return None
        return f"{info.get('master_host')}:{info.get('master_port')}"

    def password_unneeded(self) -> bool:
        """Whether the server would answer this store without the password it is given (see ``password_unneeded``)."""
        return password_unneeded(self._redis, self._prefix)

    def _client(self) -> redis.Redis:
        """This thread's client, holding one connection of the pool for good.

        Taking a connection from the pool for every command costs a lock and
        three system calls (a non-blocking read that checks the connection is
        clean); a thread runs one command at a time, so its own connection
        needs no check. A timeout or any failure mid-command disconnects it
        (redis-py does), so a late reply is never read as the next one's; the
        next command connects again. Forked children make their own.

        A connection that has sat idle while Redis failed (stopped, restarted,
        unreachable) may be dead without knowing it, and its next command
        would fail although Redis is back: once any thread's command has
        failed on the connection level, each thread connects anew before its
        next command (``_outages``).

        Redis (its ``timeout``) or a proxy between closes a connection that
        sits idle, and a command sent on it fails although Redis is well: a
        connection idle for _IDLE_CHECK_S is looked at first (one
        non-blocking read), and replaced if it was closed. Nothing was sent on
        it, so nothing is lost or done twice, and it is no outage.
        """
        local = self._local
        now = self._monotonic()
        if local.__dict__.get("forks") != _forks:
            local.connected = False  # its client connects as it is made: a refusal there is not an outage
            local.client = redis.Redis(connection_pool=self._redis.connection_pool, single_connection_client=True)
            local.forks = _forks
            local.outages = self._outages
        elif local.outages != self._outages:
            local.outages = self._outages
            local.client.connection.disconnect()  # the next command connects again
        elif now - local.used_at > _IDLE_CHECK_S:
            _drop_if_closed(local.client.connection)
        local.used_at = now
        local.connected = local.client.connection._sock is not None  # read by _failed
        return local.client

    def _failed(self, exc: redis.RedisError) -> StoreUnavailable:
        """``exc`` as StoreUnavailable; a connection-level failure tells every thread to connect anew.

        Only a failure on a connection that was up when the command began: one
        refused as it connects (Redis at ``maxclients``, a refused password)
        says nothing of the other threads' connections, and dropping them would
        have each connect anew and be refused in turn.
        """
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and self._local.__dict__.get("connected"):
            self._outages += 1
        return _unavailable(exc, self._prefix)

    def _run(self, script: str, *args: object, packed: tuple[bytes, int] = (b"", 0)) -> Any:
        """Run one script on this thread's connection: one write, one reply.

        The command is packed here and sent on the connection directly: redis-py's
        general path (argument encoding by type, its retry and observability
        wrappers, the connection lock) cost more client CPU than the script's
        round trip itself. The connection's own send and read still disconnect
        on a timeout or an error, so a late reply is never read as the next one.
        ``packed``: more arguments, already packed (see _pack_texts), and how many.
        """
        head, fixed = self._heads[script]
        command = (_pack(head, args, fixed=fixed, packed=packed),)
        try:
            conn = self._client().connection  # a new thread's client connects here
            try:
                conn.send_packed_command(command)
                return conn.read_response()
            except redis.exceptions.NoScriptError:  # a restarted or flushed Redis: the script did not run
                self._client().script_load(self._scripts[script].script)
                conn.send_packed_command(command)
                return conn.read_response()
        except redis.RedisError as exc:
            raise self._failed(exc) from exc

    def _deadline(self) -> str:
        """When a script sent now must no longer change anything (the client will have given up).

        In hexadecimal (``float.hex``): exact, and several times cheaper to write
        than ``repr``'s shortest decimal; the scripts only compare it (Lua
        reads it with the C library's ``strtod``, see ``num``).
        """
        return "" if self._deadline_s is None else (time.time() + self._deadline_s).hex()

    def _call(self, method: str, *args: object, **options: object) -> Any:
        try:
            return getattr(self._client(), method)(*args, **options)
        except redis.RedisError as exc:
            raise self._failed(exc) from exc

    # -- transitions -----------------------------------------------------

    def admit(self, tasks: Sequence[Task]) -> list[Task | SubmitError]:
        """Admit ``tasks`` in one script, together with those of other threads waiting meanwhile; more than
        GROUP_MAX_TASKS of them in several, one after another.

        While one thread's admission is on its way to Redis, the admissions of
        other threads queue up; when it returns, the first of them sends those
        that queued in one script (group commit), up to GROUP_MAX_TASKS tasks in
        all (see _send). Each thread sends one round trip per GROUP_MAX_TASKS
        tasks and waits for the ones before it, and the script treats the tasks
        one after another in order of arrival, exactly as separate calls would.
        Under load this turns several round trips, and the fixed part of the
        script (the deadline check, eviction, the bound, the wake-up tokens),
        into one. A batch split in parts that fails after its first part raises
        StorePartlyAdmitted with the outcomes of the parts before: those stand.
        """
        # Every part encoded before the first is sent: a task that cannot be encoded fails the call, storing none.
        parts = [_Admission(tasks[start : start + GROUP_MAX_TASKS]) for start in range(0, len(tasks), GROUP_MAX_TASKS)]
        results: list[Task | SubmitError] = []
        for part in parts or [_Admission(tasks)]:  # no tasks: one empty script all the same, which loads it
            try:
                results += self._admit_part(part)
            except StoreUnavailable as exc:
                if not results:
                    raise
                raise StorePartlyAdmitted(
                    f"{exc} (the first {len(results)} of {len(tasks)} tasks were admitted)", results
                ) from exc
        return results

    def _admit_part(self, mine: _Admission) -> list[Task | SubmitError]:
        """Admit the tasks of ``mine`` in one script, together with the admissions queued meanwhile (see admit)."""
        tasks = mine.tasks
        error: BaseException | None = None
        # Joining the queue and everything after it is inside the try: an exception that lands
        # anywhere (a signal's KeyboardInterrupt on the main thread) still hands the turn on in the
        # finally, which reads who holds it from the admissions' state, not from where the code stopped.
        try:
            if not self._join(mine):
                mine.ready.acquire()  # released with our verdicts, or when it is our turn to send
                if not mine.lead:
                    return self._results(tasks, mine.verdicts, mine.error)
            verdicts = self._send(mine)
            start = 0
            for admission in mine.batch:
                admission.verdicts = verdicts[start : start + len(admission.tasks)]
                start += len(admission.tasks)
        except BaseException as exc:
            error = exc
            raise
        finally:
            # The hand-over must run to its end, or the admissions behind this one wait for ever.
            try:
                self._hand_over(mine, error)
            except BaseException:  # interrupted (a KeyboardInterrupt lands wherever the main thread is)
                self._hand_over_to_the_end(mine, error)
                raise
        return self._results(tasks, mine.verdicts, None)

    def _join(self, mine: _Admission) -> bool:
        """Queue ``mine`` for the next round trip; True if it is to send at once (none in flight)."""
        with self._admissions_lock:
            self._admissions.append(mine)
            if not self._admitting:
                self._admitting = mine.lead = True
            return mine.lead

    def _send(self, mine: _Admission) -> Sequence[bytes]:
        """Send the admissions queued so far, ``mine`` first, in one script: their verdicts in order.

        It takes them in order of arrival while they hold GROUP_MAX_TASKS tasks in all (``mine`` in any case:
        admit splits larger batches): the others stay at the head of the queue, for the next turn.
        """
        with self._admissions_lock:
            queued, taken, tasks = self._admissions, 0, 0
            while taken < len(queued) and (taken == 0 or tasks + len(queued[taken].tasks) <= GROUP_MAX_TASKS):
                tasks += len(queued[taken].tasks)
                taken += 1
            mine.batch, self._admissions = queued[:taken], queued[taken:]
        batch = mine.batch
        packed = (b"".join([admission.args for admission in batch]), sum(admission.count for admission in batch))
        mine.sent = True  # from here on the batch may be stored, whatever happens next
        # The cutoff of eviction by age in hexadecimal: only the script reads it (see _ADMIT).
        return self._run("admit", (float(self._clock()) - self._ttl).hex(), self._deadline(), tasks, packed=packed)

    def _hand_over(self, mine: _Admission, error: BaseException | None) -> None:
        """Answer the admissions ``mine`` carried and pass the turn to send on, if ``mine`` holds it.

        An admission that leaves before sending (an exception while it waited, or
        just after its turn came) takes only itself out: the admissions of its
        batch go back to the head of the queue, in order, for the next turn, as
        if it had never queued; its own tasks were never sent.

        Stopped anywhere by an exception, it may be called again and goes on from
        there (see admit): under the lock it changes nothing but what a second
        run would change the same way until one assignment passes the turn on,
        and the admissions to wake wait in ``mine.waking``, each taken off once woken.
        """
        with self._admissions_lock:
            if mine in self._admissions:
                self._admissions.remove(mine)
            if mine.lead:
                others = mine.batch[1:]  # (its batch begins with itself)
                queue = self._admissions if mine.sent else others + self._admissions
                answered = others if mine.sent else []
                for admission in answered:
                    if admission.verdicts is None and admission.error is None:  # cut short: maybe stored
                        admission.error = error or RuntimeError("the admission was interrupted")
                following = queue[0] if queue else None
                if following is not None:
                    following.lead = True
                waking = answered if following is None else [following, *answered]
                self._admissions, self._admitting, mine.waking, mine.lead = queue, bool(queue), waking, False
        waking = mine.waking
        while waking:
            with contextlib.suppress(RuntimeError):  # woken already, by a run of this stopped before the pop
                waking[-1].ready.release()
            waking.pop()

    def _hand_over_to_the_end(self, mine: _Admission, error: BaseException | None) -> None:
        """Run ``_hand_over`` again, from where an exception stopped it, until it ends; a further exception is
        dropped (the first one is the caller's to raise). A few tries: one that fails every time (a bug) is
        not retried for ever."""
        last: BaseException | None = None
        for _ in range(_HAND_OVER_TRIES):
            try:
                self._hand_over(mine, error)
                return
            except BaseException as exc:  # noqa: BLE001  (another interruption: the hand-over goes on all the same)
                last = exc
        log.error(
            "an admission's hand-over failed %d times and was given up: admissions it carried may never be "
            "answered and later admissions in this process may wait for ever (restart the process)",
            _HAND_OVER_TRIES, exc_info=last,
        )  # fmt: skip

    def _results(
        self, tasks: Sequence[Task], verdicts: Sequence[bytes] | None, error: BaseException | None
    ) -> list[Task | SubmitError]:
        # The round trip that carried these tasks failed. A StoreUnavailable stored none of them if Redis
        # refused or the deadline passed, but a connection lost after the script ran lost only the
        # reply; any other error may have come after Redis stored them too.
        if error is not None:
            if isinstance(error, StoreUnavailable):
                kind = StoreOutOfMemory if isinstance(error, StoreOutOfMemory) else StoreUnavailable
                raise kind(str(error)) from error
            raise RuntimeError(f"the admission that carried these tasks failed: {error!r}") from error
        results: list[Task | SubmitError] = []
        # Read at the first refusal: (delayed, due_in, waiting).
        full: tuple[int | None, float | None, int | None] | None = None
        for task, verdict in zip(tasks, verdicts or ()):
            if verdict == b"duplicate":
                results.append(DuplicateTask(task.id))
            elif verdict == b"full":
                full = full or self._queue_delays()
                results.append(QueueFull(self.capacity, delayed=full[0], due_in=full[1], waiting=full[2]))
            else:  # admitted: the verdict is its created_at, possibly clamped (see the script)
                created_at = float(verdict)
                results.append(task if created_at == task.created_at else task._replace(created_at=created_at))
        return results

    def _queue_delays(self) -> tuple[int | None, float | None, int | None]:
        """``QueueFull``'s ``delayed``, ``due_in`` and ``waiting``: one more round trip, on a refusal only (not
        told if it fails, or if a place freed since the refusal).

        Read after the admission that refused, not in its script: the
        admission is not given the time, and every admission would pay for it.
        The waiting count is the store's, not this instance's bound: an instance
        with a larger bound (during a rolling change of QUEUE_SIZE) may have
        admitted more.
        """
        now = self._clock()
        try:
            delayed, waiting, first_due = self._run("queue_delays", now)
        except StoreUnavailable:
            return None, None, None
        if waiting < self.capacity:
            # A place freed since the refusal (a worker started a task, a cancel): what is read now says
            # nothing of the full queue, and its first delayed task would tell a client to wait for nothing.
            return None, None, None
        delays = full_queue_delays(
            delayed=delayed, waiting=waiting, first_due=None if first_due is None else float(first_due), now=now
        )
        return *delays, waiting

    def claim(self, owner: str, lease_until: float) -> Task | None:
        """See ``TaskStore.claim``. A claim that failed on the client may have run in Redis (its reply lost
        past the socket timeout): this thread's next claim asks again with its tag, and is answered the task
        it took, if it took one, rather than leaving that one to run out its lease unrun (see ``_again``)."""
        local = self._local.__dict__
        uncertain = local.pop("uncertain_claim", None)
        again = uncertain is not None and uncertain[0] == owner
        tag = uncertain[1] if again else f"~{next(self._claims)}"
        try:
            reply = self._run("claim", self._clock(), owner, lease_until, self._deadline(), tag, *_AGAIN[again])
        except StoreUnavailable:
            local["uncertain_claim"] = (owner, tag)
            raise
        return self._claimed(reply)

    def put_back_lost_claim(self, owner: str) -> None:
        """See ``TaskStore.put_back_lost_claim``: the claim this thread would have asked again (see ``claim``)."""
        uncertain = self._local.__dict__.pop("uncertain_claim", None)
        if uncertain is not None and uncertain[0] == owner:
            self._run("put_back", owner, uncertain[1], self._clock(), self._ttl, self._max_finished, self._deadline())

    def put_back(self, task_id: str, attempt: int, owner: str) -> Task | None:
        flat = self._run(
            "put_back_claim", task_id, attempt, owner, self._clock(), self._ttl, self._max_finished, self._deadline()
        )
        return _decode(flat) if flat else None

    def _claimed(self, reply: Any) -> Task | None:
        """The task a claim took; when it took none, the next due time it read is kept for this thread's wait."""
        if isinstance(reply, list):
            return _decode(reply)
        self._local.next_due = None if reply is None else float(reply)
        return None

    def seconds_until_due(self) -> float | None:
        first = self._run("first_due")
        return None if first is None else max(0.0, float(first) - self._clock())

    def wait_for_work(self, timeout: float | None) -> None:
        timeout = _MAX_WAIT if timeout is None else min(max(timeout, 0.0), _MAX_WAIT)
        # The claim that found nothing took the tokens, including any of work due by now (see the
        # claim script): wait no longer than until the earliest due time it read.
        next_due = self._local.__dict__.pop("next_due", None)
        until_due = math.inf if next_due is None else max(0.0, next_due - self._clock())
        timeout = min(timeout, until_due)
        if timeout == 0:
            return
        with self._waiters_lock:
            self._waiters += 1
        try:
            # Read once this waiter is counted: a wake() that did not count it had set the flag before,
            # and one that counts it pushes a token for it (or ends the poll for a due time).
            if self._woken:
                return
            if timeout == until_due:
                self._wait_until_due(timeout)
            else:
                self._blpop(timeout)
        except redis.RedisError as exc:
            self._failed(exc)  # the other threads' idle connections may have died too (see _client)
            time.sleep(min(timeout, 0.5))  # Redis is down: do not spin; the caller's claim reports it
        finally:
            with self._waiters_lock:
                self._waiters -= 1

    def _blpop(self, timeout: float) -> bool:
        """Block until a token comes (True) or ``timeout`` passes, as Redis counts it (see _BLPOP_LATE_S)."""
        # BLPOP takes whole milliseconds from Redis 6 on; 0 would block forever.
        keys = [f"{self._prefix}:signal", self._wake_key]
        return self._client().blpop(keys, timeout=max(timeout, 0.001)) is not None

    def _wait_until_due(self, timeout: float) -> None:
        """Wait for a token, or ``timeout`` seconds: until a task falls due, on time whatever Redis's hz.

        Blocks in BLPOP until _BLPOP_LATE_S before the due time, then takes a
        token with LPOP every _DUE_POLL_S: work queued meanwhile still ends the
        wait (at most _DUE_POLL_S late), and so does ``wake``.
        """
        deadline = time.monotonic() + timeout
        if timeout > _BLPOP_LATE_S and self._blpop(timeout - _BLPOP_LATE_S):
            return
        signal = f"{self._prefix}:signal"
        while self._client().lpop(signal) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with self._woken_changed:
                if self._woken_changed.wait_for(lambda: self._woken, min(left, _DUE_POLL_S)):
                    return

    def wake(self) -> None:
        """Release every waiting worker; later waits return at once too (the pool is stopping)."""
        with self._woken_changed:
            self._woken = True
            self._woken_changed.notify_all()
        with self._waiters_lock:
            waiters = self._waiters
        if waiters:
            try:
                pipe = self._redis.pipeline()
                pipe.rpush(self._wake_key, *([1] * waiters))
                pipe.expire(self._wake_key, 60)
                pipe.execute()
            except redis.RedisError:
                pass  # the waiters' own timeout ends their wait

    def finish(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        *,
        error: str | None = None,
        result: Any = None,
        retry_at: float | None = None,
        created_at: float | None = None,
    ) -> Task | None:
        args = self._finish_args(task_id, attempt, owner, error, result, retry_at, None, created_at)
        try:
            flat = self._run("finish", *args, *self._again(task_id, attempt, owner))
        except StoreUnavailable:
            self._local.uncertain_end = (task_id, attempt, owner)
            raise
        return _decode(flat) if flat else None

    def _end_for_owner(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        *,
        error: str,
        retry_at: float | None = None,
        expired_before: float | None = None,
    ) -> Task | None:
        """End an attempt for its owner, as a recovery or an abandon does: a step of its own, which is not
        asked again, and which its owner's end asked again does not take for its own (see finish in _STEPS)."""
        args = self._finish_args(task_id, attempt, owner, error, None, retry_at, expired_before, None)
        flat = self._run("finish", *args, *_FOR_OWNER)
        return _decode(flat) if flat else None

    def finish_and_claim(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        *,
        error: str | None = None,
        result: Any = None,
        retry_at: float | None = None,
        lease_until: float,
        created_at: float | None = None,
    ) -> tuple[Task | None, Task | None]:
        # One script, one round trip: the end and the next claim are one atomic step in Redis.
        args = self._finish_args(task_id, attempt, owner, error, result, retry_at, None, created_at)
        try:
            ended, claimed = self._run("finish_and_claim", *args, lease_until, *self._again(task_id, attempt, owner))
        except StoreUnavailable:
            self._local.uncertain_end = (task_id, attempt, owner)
            raise
        return (_decode(ended) if ended else None), self._claimed(claimed)

    def _again(self, task_id: str, attempt: int, owner: str) -> tuple[str, ...]:
        """The argument that says an attempt's end is asked again (``("1",)``): this thread's last step that
        was to record it failed (the failing step sets ``uncertain_end``); else none.

        A step that fails on the client (its reply later than the socket timeout, the connection
        dropped) may have run in Redis all the same: the end recorded, and with finish_and_claim the
        next task claimed. Written again without a word, the end found its task ended already and
        answered false (the pool logged the result dropped and counted no end), and the task claimed
        ran out its lease unrun, then counted as lost. Asked again, the script answers what that step
        did (see finish and _FINISH_AND_CLAIM).
        """
        again = self._local.__dict__.get("uncertain_end") == (task_id, attempt, owner)
        if again:
            self._local.uncertain_end = None
        return _AGAIN[again]

    def _finish_args(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        error: str | None,
        result: Any,
        retry_at: float | None,
        expired_before: float | None,
        created_at: float | None,
    ) -> tuple[object, ...]:
        # created_at as the admission stored it: repr() of the float it decodes to gives the same text.
        return (
            task_id,
            attempt,
            owner,
            self._clock(),
            self._ttl,
            self._max_finished,
            "0" if error is None else "1",
            error or "",
            _json_text(result),
            "" if retry_at is None else retry_at,
            "" if expired_before is None else expired_before,
            "" if created_at is None else repr(created_at),
            self._deadline(),
        )

    def renew(self, owner: str, task_ids: Iterable[str], lease_until: float) -> Renewal:
        ids = list(task_ids)
        if not ids:
            return Renewal(lost=frozenset(), cancel_requested=frozenset())
        lost, cancel = self._run("renew", owner, lease_until, *ids)
        return Renewal(lost=frozenset(i.decode() for i in lost), cancel_requested=frozenset(i.decode() for i in cancel))

    def cancel_requested(self, task_ids: Iterable[str]) -> frozenset[str]:
        ids = list(task_ids)
        if not ids:
            return frozenset()
        return frozenset(i.decode() for i in self._run("cancel_requested", *ids))

    def cancel(self, task_id: str) -> tuple[Task | None, bool]:
        reply = self._run("cancel", task_id, self._clock(), self._ttl, self._max_finished, self._deadline())
        if not reply:
            return None, False
        changed, flat = reply
        task = _decode(flat)
        return task, task is not None and changed == 1

    def recover(
        self,
        retry_at: Callable[[Task], float | None],
        *,
        before: float | None = None,
        unreachable: tuple[float, float] | None = None,
    ) -> list[Task]:
        now = self._clock()
        cutoff = now if before is None else min(now, before)
        expired = self._call("zrangebyscore", f"{self._prefix}:run", "-inf", cutoff)
        recovered = []
        for raw_id in expired:
            task = self.get(raw_id.decode())
            if task is None:
                self._drop_leftover(raw_id.decode())
                continue
            if task.state is not State.RUNNING:
                continue
            owner, lease_until = self._call("hmget", f"{self._prefix}:t:{task.id}", "owner", "lease_until")
            if owner is None:
                continue
            lost_unreachable = lease_until is not None and lost_while_unreachable(float(lease_until), unreachable)
            after = self._end_for_owner(
                task.id,
                task.attempts,
                owner.decode(),
                error=LOST_UNREACHABLE if lost_unreachable else LOST_EXPIRED,
                retry_at=retry_at(task),
                expired_before=cutoff,  # a lease renewed since the read above is not ended
            )
            if after is not None:
                recovered.append(after)
        return recovered

    def _drop_leftover(self, task_id: str) -> None:
        """Remove what is left of a task whose hash Redis evicted (see _decode), if that is what it is."""
        if self._run("drop_leftover", task_id):
            log.warning(
                "task %s: Redis evicted its data (maxmemory-policy is not noeviction): what was left of it is"
                " removed, and the task is lost",
                task_id,
            )

    def abandon(self, reason: str, *, owner: str) -> list[Task]:
        abandoned = []
        for raw_id in self._call("smembers", f"{self._prefix}:own:{owner}"):
            task = self.get(raw_id.decode())
            if task is None:
                continue
            after = self._end_for_owner(task.id, task.attempts, owner, error=reason)
            if after is not None:
                abandoned.append(after)
        return abandoned

    # -- reading ---------------------------------------------------------

    def _retention(self) -> tuple[float, float, int]:
        return self._clock(), self._ttl, self._max_finished

    def get(self, task_id: str) -> Task | None:
        flat = self._run("get", *self._retention(), task_id)
        return _decode(flat) if flat else None

    def list(self, state: State | None = None, limit: int = 100, *, results: bool = True) -> list[Task]:
        return [task for _, task in self._listed(state, limit, results, "+inf")]

    def _listed(self, state: State | None, limit: int, results: bool, below: str) -> list[tuple[bytes, Task]]:
        """Up to ``limit`` tasks below the score ``below`` in the listing's index (see _LIST), each with its score.

        One script per PASS_AT_MOST tasks left past their time; one in all without them.
        """
        fields = _LISTED_FIELDS if results else _LISTED_BUT_RESULT
        index = "" if state is None else str(state)
        listed: list[tuple[bytes, Task]] = []
        resume: str | bytes = below
        while resume and len(listed) < limit:
            resume, scores, flats = self._run("list", *self._retention(), index, limit - len(listed), resume, *fields)
            listed.extend((score, task) for score, task in zip(scores, map(_decode, flats)) if task is not None)
        return listed

    def page(
        self, state: State | None = None, limit: int = 100, *, results: bool = True, after: Position | None = None
    ) -> Page:
        """A page of ``list``: positions are ``(score,)``, the score of the last task's entry in its index."""
        below = "+inf" if after is None else f"({check_position(after, 1)[0]}"
        listed = self._listed(state, limit + 1, results, below)  # one more tells whether more follow
        more = len(listed) > limit > 0
        del listed[limit:]
        return Page([task for _, task in listed], (int(listed[-1][0]),) if more else None)

    def position_key(self) -> bytes:
        """``P:position-key``, made by the first instance that needs it, and read each time (one round trip).

        Not kept in the process: once Redis lost it (restarted without persistence, or emptied), the
        instances would each sign with the key they read first, and refuse one another's cursors.
        """
        name = f"{self._prefix}:position-key"
        while (key := self._call("get", name)) is None:  # made by the first instance to ask
            self._call("set", name, secrets.token_bytes(16), nx=True)
        return bytes(key)

    def stats(self) -> StoreStats:
        figures = self._figures()
        counts = dict(zip(_STATES, figures))
        waiting, due, retries_pending = figures[len(_STATES) :]
        return StoreStats(counts=counts, waiting=waiting, due=due, retries_pending=retries_pending)

    def _figures(self) -> list[int]:
        """The stats script's figures, none of a task past its time by the store's clock now.

        One script forgets FORGET_AT_MOST of them at most and tells how many are left: it runs again, with
        the same time, until none is (as many more as it takes: a finished task keeps its finish time, so
        no other task falls past that time meanwhile; one more in case another instance's clock lags).
        """
        now, ttl, max_finished = self._retention()
        left, *figures = self._run("stats", now, ttl, max_finished, *_STATE_NAMES)
        for _ in range(-(-left // FORGET_AT_MOST) + 1 if left else 0):
            left, *figures = self._run("stats", now, ttl, max_finished, *_STATE_NAMES)
            if not left:
                break
        return figures

    def forget_expired(self) -> bool:
        """Forget FORGET_AT_MOST of the finished tasks past their time at most, in one script; whether any is left."""
        return self._run("forget", *self._retention()) > 0

    def unfinished(self, owner: str | None = None) -> int:
        if owner is None:
            stats = self.stats()
            return stats.counts[State.QUEUED] + stats.counts[State.RUNNING]
        return self._call("scard", f"{self._prefix}:own:{owner}")

    def health(self) -> str | None:
        """Why Redis refuses a write now (unreachable, maxmemory reached, a read-only replica), or None."""
        try:
            self.check_writes()
        except StoreUnavailable as exc:
            return str(exc)
        return None

    def check_writes(self) -> None:
        """Make one small write of the store's own: StoreUnavailable if Redis refuses it (a read-only replica, an
        ACL user without write rights, unreachable), StoreOutOfMemory if Redis is at maxmemory."""
        self._run("health", self._clock())

    def close(self) -> None:
        self._redis.close()


def _head(sha: str, key: str) -> bytes:
    """``EVALSHA sha 1 key`` in the Redis protocol, without the leading argument count."""
    return b"$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n1\r\n$%d\r\n%s\r\n" % (sha.encode(), len(key.encode()), key.encode())


def _pack(head: bytes, args: Sequence[object], *, fixed: int = 0, packed: tuple[bytes, int] = (b"", 0)) -> bytes:
    """The command ``head`` starts (see _head; ``fixed`` arguments already packed after it) with ``args``,
    then the ``packed`` arguments (bytes, and how many), as one buffer for one write.

    Floats go as exact decimal strings (``repr``): Redis would format them with its own precision.
    """
    tail, count = packed
    return b"%s%s%s%s" % (b"*%d\r\n" % (4 + fixed + len(args) + count), head, _pack_args(args), tail)


def _pack_texts(texts: Sequence[str]) -> bytes:
    """Strings packed as _pack_args packs them; by hiredis in C when it is installed (in
    less than half the time)."""
    if _hiredis_pack is None or not texts:
        data = [text.encode() for text in texts]
        return b"".join([b"$%d\r\n%s\r\n" % (len(item), item) for item in data])
    command = _hiredis_pack(tuple(texts))  # a whole command: its count of arguments first
    return command[command.index(b"\r\n") + 2 :]


def _pack_args(args: Sequence[object]) -> bytes:
    parts = []
    for value in args:
        kind = type(value)
        if kind is str:
            data = value.encode()
        elif kind is float:
            data = repr(value).encode() if math.isfinite(value) else (b"inf" if value > 0 else b"-inf")
        elif kind is int:
            data = b"%d" % value
        elif kind is bytes:
            data = value
        else:
            raise TypeError(f"cannot send {kind.__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
