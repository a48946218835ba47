-- The last step of a cached call, in one round trip: write the value (if there is one),
-- release the lock if this caller still holds it, and wake the processes waiting for it.
-- KEYS: value, lock, waiters, done.
-- ARGV: token ('' = no lock held), write? ('1'/'0'), value, TTL (s), wake-list TTL (ms).
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
end
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
local waiting = tonumber(redis.call('GET', KEYS[3]) or '0')
if waiting > 0 then
  redis.call('DEL', KEYS[3])
  for _ = 1, math.min(waiting, 10000) do
    redis.call('RPUSH', KEYS[4], '1')
  end
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
end
return waiting
