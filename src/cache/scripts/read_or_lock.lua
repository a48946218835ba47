-- The first step of a cached call, in one round trip: read the value and, unless it is
-- fresh, try to take the load lock.
-- KEYS: value, lock, waiters. ARGV: token, lock TTL (ms), now (epoch seconds).
-- Reply {value or nil, answer}: 0 = the value looks fresh (no lock asked for), 1 = lock
-- taken, 2 = another process holds it (counted as a waiter when nothing is servable, so
-- the holder's final step wakes this caller).

-- Writers put the envelope's times after the payload, so its own fields are in the tail.
-- This reading is a guess that saves a round trip; the client decides with a parser.
-- Plain `find` from the tail, not a pattern over the value: this runs on every hit.
local function stamp(value, field)
  local from = #value - 200
  if from < 1 then from = 1 end
  local at = string.find(value, field, from, true)
  if not at then return nil end
  return tonumber(string.match(value, '^%s*(%-?%d+)', at + #field))
end

local value = redis.call('GET', KEYS[1])
local now = tonumber(ARGV[3])
if value then
  local fresh_until = stamp(value, '"fresh_until":')
  if fresh_until == nil or now <= fresh_until then
    return {value, 0}
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {value, 1}
end
local stale_until = value and stamp(value, '"stale_until":')
if not stale_until or now > stale_until then
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return {value, 2}
