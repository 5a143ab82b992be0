-- wrk script: bench/enqueue.lua's batches, from a producer that honours Retry-After.
-- usage: wrk ... -s bench/enqueue_retry.lua URL -- /enqueue/batch <run-id> <payload-bytes> <batch-size> <connections-per-thread>
-- When a batch comes back with a task refused for a full queue (a "retry_after" in its entry), each
-- connection of this wrk thread waits that many seconds before its next request, as a producer that
-- follows the answer would. Refused tasks are not sent again: every request carries new ids.

dofile("bench/enqueue.lua")

local base_init = init
local connections = 1  -- of this wrk thread
local paused, pause_ms = 0, 0  -- requests of this thread still to delay, and by how much

function init(args)
   base_init(args)
   connections = tonumber(args[5] or "1")
end

function response(status, headers, body)
   if paused == 0 then
      local seconds = string.match(body, '"retry_after":(%d+)')
      if seconds then
         paused, pause_ms = connections, tonumber(seconds) * 1000
      end
   end
end

function delay()
   if paused > 0 then
      paused = paused - 1
      return pause_ms
   end
   return 0
end
