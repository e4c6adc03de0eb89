-- wrk script for the clproxy benchmark: POST /v1/messages with a ~20 KB Claude-Code-like body.
--
-- The body and the header list come from files written by benchmarks/payload.py (run.py writes
-- them to a temporary directory and passes their paths in the environment):
--   CLPROXY_BENCH_BODY     the request body (JSON)
--   CLPROXY_BENCH_HEADERS  "name: value" lines
-- By hand:  python benchmarks/payload.py /tmp/clp && \
--   CLPROXY_BENCH_BODY=/tmp/clp/body.json CLPROXY_BENCH_HEADERS=/tmp/clp/headers.txt \
--   wrk -t1 -c32 -d10s --latency -s benchmarks/wrk_messages.lua http://127.0.0.1:55669/v1/messages
--
-- done() prints one parseable line, "WRK_JSON {...}", with latencies in microseconds.

local function slurp(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

local body_path = os.getenv("CLPROXY_BENCH_BODY")
local headers_path = os.getenv("CLPROXY_BENCH_HEADERS")
assert(body_path, "set CLPROXY_BENCH_BODY (see the comment at the top of wrk_messages.lua)")
assert(headers_path, "set CLPROXY_BENCH_HEADERS (see the comment at the top of wrk_messages.lua)")

wrk.method = "POST"
wrk.body = slurp(body_path)
for line in slurp(headers_path):gmatch("[^\r\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end

-- non-2xx answers are counted by wrk itself (summary.errors.status); nothing per response here,
-- so the Lua side costs nothing per request.

function done(summary, latency, requests)
  local e = summary.errors
  local p = {}
  for _, q in ipairs({50, 75, 90, 99, 99.9}) do
    p[#p + 1] = string.format('"%s":%d', tostring(q), latency:percentile(q))
  end
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,"percentiles":{%s}}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev, table.concat(p, ",")))
end
