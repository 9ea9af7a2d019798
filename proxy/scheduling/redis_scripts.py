"""The Lua scripts of the shared ledger (`redis_ledger`): each runs atomically in Redis.

Every time is the Redis server's (`TIME`, in ms), never a proxy's clock, so proxies
whose clocks disagree still agree on when a lease expires. The lease scripts take
any number of limit keys (with one cap each for `TAKE`): a new kind of limit is one
more key, not a new script.
"""

# KEYS: the peers' sorted set, then the limits' sorted sets (the global one first); ARGV: lease
# ms, member, this proxy's id, then one cap per limit. Returns {outcome, slots now taken in the
# first limit}: outcome 0 when taken, the 1-based index of the first limit that is full, or -1
# when this proxy is not registered: Redis restarted (or was flushed) since, so the counts miss
# this proxy's running requests until it writes them back. A member already held is taken:
# the client retries a call whose connection broke, and the first run may have taken it.
TAKE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) then return {-1, 0} end
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return {0, redis.call('ZCARD', KEYS[2])} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[i + 2]) then return {i - 1, redis.call('ZCARD', KEYS[2])} end
end
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[1]), ARGV[2])
end
return {0, redis.call('ZCARD', KEYS[2])}
"""
# KEYS: the limits' sorted sets (the global one first); ARGV: member, room channel, this
# proxy's id. Returns the slots still taken in the first limit.
GIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return redis.call('ZCARD', KEYS[1])
"""
# KEYS: the limits' sorted sets; ARGV: lease ms, member. Extends the lease, writing it
# again where it is gone (reaped, or Redis restarted): the request runs, so the ledger
# must count it. Returns how many of the sets had lost it.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = 0
for _, key in ipairs(KEYS) do
  gone = gone + redis.call('ZADD', key, now + tonumber(ARGV[1]), ARGV[2])
end
return gone
"""
# KEYS: peers' sorted set, peers' limits hash; ARGV: id, lease ms, limits JSON ("" to leave).
# Returns 1 if this proxy was not registered (new, or Redis forgot it), else 0; then the
# limits of every proxy alive, as id, JSON, id, JSON...
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = 0
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {added}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id) or '')
end
return out
"""
# KEYS: the limits' sorted sets. Returns the live count of each.
COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  table.insert(out, redis.call('ZCARD', key))
end
return out
"""
