-- nginx limit_req over every line of one request, on Redis's clock, in one atomic step
-- (NGINX-LIMIT-REQ.md, rules 1-12; the same integer arithmetic as zone.rs).
--
-- KEYS[i]  the bucket of line i for this request's key (a hash: e = excess, l = last).
-- ARGV     per line, three numbers: rate (milli-requests per second), burst (x1000),
--          delay (x1000; -1 for nodelay); then, optionally, the time in ms.
-- Returns  {1, hold_ms} when every line admits (each line charged, the largest hold wins),
--          {0, i, wait_ms} when line i (the first to reject) rejects: nothing is written.
--
-- Numbers are Lua doubles: every product below stays under 2^53 for excess up to 10^12
-- (burst up to 10^9), because elapsed time is only multiplied while the bucket is not empty.
-- A bucket expires when it is empty (PEXPIRE), so Redis keeps only buckets with state; an
-- expired bucket and an empty one decide the same (rule 3).
local n = #KEYS
local now
if #ARGV > 3 * n then
  -- a time given by the caller (the crate's tests compare this script with zone.rs on the
  -- same request times); otherwise Redis's own clock, the same for every instance
  now = tonumber(ARGV[3 * n + 1])
else
  -- Redis < 5 replicates scripts verbatim and refuses writes after TIME unless told to
  -- replicate effects; from 7.0 this is a no-op.
  if redis.replicate_commands then redis.replicate_commands() end
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local nxt, last = {}, {}
local rejected, wait = 0, 0
for i = 1, n do
  local rate = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local s = redis.call('HMGET', KEYS[i], 'e', 'l')
  local e, l = 0, now
  if s[1] and s[2] then
    local excess = tonumber(s[1])
    l = tonumber(s[2])
    local ms = now - l
    if ms < 0 then ms = 0 end
    -- rule 2: excess' = max(0, excess - rate * ms / 1000 + 1000), in integers
    if ms < math.ceil((excess + 1000) * 1000 / rate) then
      e = excess + 1000 - math.floor(rate * ms / 1000)
      if e < 0 then e = 0 end
    end
    -- rule 4: reject iff strictly over the burst; the wait is exact to the ms
    if e > burst then
      if rejected == 0 then rejected = i end
      local w = math.ceil((excess + 1000 - burst) * 1000 / rate) - ms
      if w < 1 then w = 1 end
      if w > wait then wait = w end
    end
  end
  nxt[i], last[i] = e, l
end
-- rule 11: a rejection by any line charges no line
if rejected > 0 then
  return {0, rejected, wait}
end
local hold = 0
for i = 1, n do
  local rate = tonumber(ARGV[3 * i - 2])
  local delay = tonumber(ARGV[3 * i])
  local e = nxt[i]
  local l = now
  if last[i] > now then l = last[i] end
  redis.call('HSET', KEYS[i], 'e', string.format('%.0f', e), 'l', string.format('%.0f', l))
  redis.call('PEXPIRE', KEYS[i], (l - now) + math.ceil((e + 1000) * 1000 / rate) + 1)
  -- rules 6 and 12: the hold of an admitted request; the largest one wins
  if delay >= 0 and e > delay then
    local h = math.floor((e - delay) * 1000 / rate)
    if h > hold then hold = h end
  end
end
return {1, hold}
