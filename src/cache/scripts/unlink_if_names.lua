-- Removes a registry record only while it still names the expected ID: the other half of
-- a pair a re-mapping replaced, unless another writer has reused the record meanwhile.
-- KEYS: record. ARGV: field, expected ID.
local raw = redis.call('GET', KEYS[1])
if not raw then
  return 0
end
local ok, record = pcall(cjson.decode, raw)
if ok and type(record) == 'table' and record[ARGV[1]] == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
