-- The first step of a cached call, in one round trip: read the value and, unless it is
-- fresh, try to take the load lock.
-- KEYS: value, lock, waiters. ARGV: token, lock TTL (ms), now (epoch seconds).
-- Reply {value or nil, answer}: 0 = the value looks fresh (no lock asked for), 1 = lock
-- taken, 2 = another process holds it (counted as a waiter when nothing is servable, so
-- the holder's final step wakes this caller).
local value = redis.call('GET', KEYS[1])
local now = tonumber(ARGV[3])
local stale_until = nil
if value then
  -- Writers put the envelope's times after the payload, so its own fields are in the
  -- tail. This is a guess that saves a round trip; the client decides with a parser.
  local tail = string.sub(value, -256)
  local fresh_until = tonumber(string.match(tail, '"fresh_until":%s*(%-?%d+)'))
  stale_until = tonumber(string.match(tail, '"stale_until":%s*(%-?%d+)'))
  if fresh_until == nil or now <= fresh_until then
    return {value, 0}
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {value, 1}
end
if not value or stale_until == nil or now > stale_until then
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return {value, 2}
