-- wrk script: POST a task with a unique id on every request, then print one JSON summary line.
-- usage: wrk ... -s bench/enqueue.lua URL -- <path> <run-id> [payload-bytes] [batch-size]
-- Ids are <run-id>-<thread>-<n>: unique across wrk threads, and across runs given a fresh run-id.
-- With a batch size, every request is {"tasks": [...]} holding that many tasks (POST /enqueue/batch).

local threads = {}
local counter = 1

function setup(thread)
   thread:set("thread_id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   path = args[1] or "/enqueue"
   run_id = args[2] or tostring(os.time())
   payload = string.rep("x", tonumber(args[3] or "64"))
   prefix = '{"id":"' .. run_id .. "-" .. thread_id .. "-"
   suffix = '","payload":"' .. payload .. '","max_retries":3}'
   batch_size = tonumber(args[4] or "0")
   n = 0
   wrk.headers["Content-Type"] = "application/json"
end

local function next_task()
   n = n + 1
   return prefix .. n .. suffix
end

function request()
   if batch_size == 0 then
      return wrk.format("POST", path, nil, next_task())
   end
   local tasks = {}
   for i = 1, batch_size do
      tasks[i] = next_task()
   end
   return wrk.format("POST", path, nil, '{"tasks":[' .. table.concat(tasks, ",") .. "]}")
end

function done(summary, latency, requests)
   local seconds = summary.duration / 1e6
   io.write(string.format(
      'WRK_JSON {"requests":%d,"seconds":%.6f,"rps":%.3f,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
      '"max_us":%d,"non_2xx_3xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
      summary.requests, seconds, summary.requests / seconds,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
      summary.errors.timeout))
end
