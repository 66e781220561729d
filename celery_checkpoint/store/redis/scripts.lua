-- Lua scripts of the Redis checkpoint store (celery_checkpoint/store/redis.py).
--
-- Each "--- @name" section is one script. Sections marked "run" act on one run
-- and get the "@run-prelude" section prepended: they take KEYS[1] = the run's
-- hash key ("<prefix>:{<group>}:run:<id>"), ARGV[1] = the run id, ARGV[2] =
-- the group's key base ("<prefix>:{<group>}:"), and derive the run's other keys
-- and its group's index keys from those. Every key a script touches carries
-- the same hash tag, the group's, so each script stays inside one hash slot and
-- runs unchanged on Redis Cluster. Every script does all its reads and checks
-- before its first write, so an error leaves nothing half-applied. Time comes
-- from the server (TIME), never from the caller. A run's hash goes back to
-- Python as the flat array of names and values HGETALL gives, the record as
-- stored (a corrupt one is moved aside byte for byte).
--
-- A run is one hash: the record JSON (field "record"), the control fields that
-- transitions change without rewriting it, and the lease (lease_token,
-- lease_owner, lease_host, lease_claimed, lease_expires). One read gives a
-- script all of it. A lease is the current claim only if its token is above
-- last_token.

--- @prelude
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Microseconds (exact in a double until the year 2255).
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The token of a lease if it is the current claim (above last_token), else nil.
local function current_of(lease_token, last_token)
  if not lease_token then return nil end
  local tok = tonumber(lease_token)
  if tok > tonumber(last_token or '0') then return tok end
  return nil
end

--- @run-prelude
local ID, G = ARGV[1], ARGV[2]
local K_RUN = KEYS[1]
local K_ENDED = K_RUN .. '/ended'
local K_PAUSED, K_INFLIGHT = G .. 'paused', G .. 'inflight'
local K_PENDING, K_DEADLINES = G .. 'pending', G .. 'deadlines'
local K_ENDED_AT = G .. 'ended'
local LEASE = {'lease_token', 'lease_owner', 'lease_host', 'lease_claimed', 'lease_expires'}
local function hash(key) return redis.call('HGETALL', key) end
-- Drop a lease from the in-flight index and its host's set; with clear, also
-- its fields (not needed when the run's hash is being deleted or renamed).
local function drop_lease(host, clear)
  if host then redis.call('SREM', G .. 'owners:' .. host, ID) end
  redis.call('ZREM', K_INFLIGHT, ID)
  if clear then redis.call('HDEL', K_RUN, unpack(LEASE)) end
end

--- @save run
-- ARGV: 3 token|''|'create' (only if the run has no record, paused or ended)
--       4 record JSON 5 record last_token 6 paused_at (us) 7 deadline (us)|''
--       8 resume status|''
--       9... the other control fields, name, value, ... (with ended_by last on a re-pause)
local create = ARGV[3] == 'create'
local has_token = ARGV[3] ~= '' and not create
local c = redis.call('HMGET', K_RUN, 'last_token', 'lease_token', 'lease_host')
local exists = c[1] ~= false -- every run hash has last_token
if create then
  if exists then return {'exists', 'paused'} end
  if redis.call('EXISTS', K_ENDED) == 1 then return {'exists', 'ended'} end
end
local prev = tonumber(c[1] or '0')
local current = current_of(c[2], c[1])
local last
local ended_last = false
if has_token then
  if current ~= tonumber(ARGV[3]) then return {'lost'} end
  last = current
else
  if current then return {'inflight', current} end
  -- A new run under the id of an ended one: its tokens go on growing.
  ended_last = redis.call('HGET', K_ENDED, 'last_token')
  last = math.max(tonumber(ARGV[5]), prev, tonumber(ended_last or '0'))
end
if ended_last then
  redis.call('DEL', K_ENDED)
  redis.call('ZREM', K_ENDED_AT, ID)
end
if exists then redis.call('DEL', K_RUN) end
redis.call('HSET', K_RUN, 'record', ARGV[4], 'last_token', last, unpack(ARGV, 9))
redis.call('ZADD', K_PAUSED, ARGV[6], ID)
if ARGV[7] ~= '' then
  redis.call('ZADD', K_DEADLINES, ARGV[7], ID)
elseif exists then
  redis.call('ZREM', K_DEADLINES, ID)
end
if ARGV[8] == 'pending' then
  redis.call('ZADD', K_PENDING, now_us(), ID)
elseif exists then
  redis.call('ZREM', K_PENDING, ID)
end
if c[2] then drop_lease(c[3], false) end -- its fields went with the old hash
return {'ok'}

--- @claim run
-- ARGV: 3 owner JSON 4 owner host 5 lease (ms) 6 pause_seq|''
-- Returns the run's hash as it was before the claim (a flat array), the token,
-- and the lease's start and expiry.
local flat = redis.call('HGETALL', K_RUN)
local c = {}
for i = 1, #flat, 2 do c[flat[i]] = flat[i + 1] end
if not c.record then return {'none'} end
if c.status and c.status ~= 'paused' then return {'none'} end
if ARGV[6] ~= '' and tonumber(c.pause_seq or '1') ~= tonumber(ARGV[6]) then return {'none'} end
if current_of(c.lease_token, c.last_token) then return {'none'} end
local now = now_ms()
local token = tonumber(c.last_token or '0') + 1
local expires = now + tonumber(ARGV[5])
if c.lease_token then drop_lease(c.lease_host, false) end -- superseded; fields overwritten
redis.call('HSET', K_RUN, 'lease_token', token, 'lease_owner', ARGV[3], 'lease_host', ARGV[4],
  'lease_claimed', now, 'lease_expires', expires)
redis.call('ZADD', K_INFLIGHT, expires, ID)
redis.call('SADD', G .. 'owners:' .. ARGV[4], ID)
-- Only a pending request is in the pending index (every script keeps it so).
if c.resume_status == 'pending' then redis.call('ZREM', K_PENDING, ID) end
return {'ok', flat, token, now, expires}

--- @request_resume run
-- ARGV: 3 request id 4 request JSON 5 pause_seq|''
local c = redis.call('HMGET', K_RUN, 'pause_seq', 'step', 'resume_id', 'resume_seq',
  'resume_status', 'last_token', 'lease_token', 'record')
if not c[8] then
  if redis.call('EXISTS', K_ENDED) == 1 then
    return {'ended', hash(K_ENDED)}
  end
  return {'notfound'}
end
local seq = c[1] or '1'
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= tonumber(seq) then
  return {'rejected', seq, c[2] or ''}
end
local pending = c[3] and tonumber(c[4]) == tonumber(seq) -- a request of an earlier pause is void
if pending and c[3] == ARGV[3] then return {'existing', hash(K_RUN)} end
-- In flight with no request of this pause (a timeout or a redelivery claimed it):
-- accepting would be lost when the holder completes.
local current = current_of(c[7], c[6])
if pending and (c[5] == 'pending' or current) then return {'already', c[3]} end
if current then return {'busy', current} end
redis.call('HSET', K_RUN, 'resume', ARGV[4], 'resume_id', ARGV[3], 'resume_seq', seq,
  'resume_status', 'pending')
redis.call('HDEL', K_RUN, 'resume_error')
redis.call('ZADD', K_PENDING, now_us(), ID)
return {'ok', hash(K_RUN)}

--- @heartbeat run
-- ARGV: 3 token 4 lease (ms)
local c = redis.call('HMGET', K_RUN, 'lease_token', 'last_token', 'lease_owner', 'lease_claimed')
if current_of(c[1], c[2]) ~= tonumber(ARGV[3]) then return {'lost'} end
local expires = now_ms() + tonumber(ARGV[4])
redis.call('HSET', K_RUN, 'lease_expires', expires)
redis.call('ZADD', K_INFLIGHT, expires, ID)
return {'ok', c[3], c[4], expires}

--- @complete run
-- ARGV: 3 token|''
local c = redis.call('HMGET', K_RUN, 'last_token', 'ended_by', 'resume_status', 'deadline',
  'lease_token', 'lease_host')
local exists = c[1] ~= false -- every run hash has last_token
local last = tonumber(c[1] or '0')
local current = current_of(c[5], c[1])
if ARGV[3] ~= '' then
  local token = tonumber(ARGV[3])
  if not current then
    if exists then
      if last == token and c[2] == 'repause' then return {'ok'} end
      if last >= token then return {'lost', 'ended_by', c[2] or ''} end
      return {'lost', 'stale'}
    end
    local e = redis.call('HMGET', K_ENDED, 'last_token', 'status')
    if e[1] then
      local ended_last = tonumber(e[1])
      if e[2] == 'completed' and ended_last == token then return {'ok'} end -- idempotent
      if ended_last >= token then return {'lost', 'ended', e[2] or 'cancelled'} end
    end
    return {'ok'}
  end
  if current ~= token then return {'lost', 'stale'} end
elseif not current then
  -- Not in flight: a paused record (a fresh re-pause) stays as it is.
  if c[5] then drop_lease(c[6], true) end
  return {'ok'}
end
if exists then
  -- Keep a tombstone: a late writer with an older token, a redelivered first
  -- execution and a repeated resume must see that the run completed. The
  -- lease fields go along; nothing reads them there.
  redis.call('RENAME', K_RUN, K_ENDED)
  redis.call('HSET', K_ENDED, 'status', 'completed', 'ended_by', 'complete',
    'last_token', current or last)
  redis.call('ZADD', K_ENDED_AT, now_ms(), ID)
  redis.call('ZREM', K_PAUSED, ID)
  -- The indexes hold only runs with a pending request / a deadline.
  if c[3] == 'pending' then redis.call('ZREM', K_PENDING, ID) end
  if c[4] then redis.call('ZREM', K_DEADLINES, ID) end
end
if c[5] then drop_lease(c[6], not exists) end
return {'ok'}

--- @release run
-- ARGV: 3 token 4 '1' to mark the resume request failed 5 '1' if an error follows 6 error
local c = redis.call('HMGET', K_RUN, 'lease_token', 'last_token', 'lease_host', 'resume_id')
if current_of(c[1], c[2]) ~= tonumber(ARGV[3]) then return {'lost'} end
local set = {'last_token', ARGV[3], 'ended_by', 'release'}
local clear = {unpack(LEASE)}
if ARGV[4] == '1' and c[4] then
  set[#set + 1] = 'resume_status'
  set[#set + 1] = 'failed'
  if ARGV[5] == '1' then
    set[#set + 1] = 'resume_error'
    set[#set + 1] = ARGV[6]
  else
    clear[#clear + 1] = 'resume_error'
  end
end
redis.call('HSET', K_RUN, unpack(set))
redis.call('HDEL', K_RUN, unpack(clear))
drop_lease(c[3], false)
return {'ok'}

--- @cancel run
-- ARGV: 3 status 4 '1' if a reason follows 5 reason 6 token|''
local c = redis.call('HMGET', K_RUN, 'lease_token', 'last_token', 'lease_host', 'record')
local body = c[4]
if not body then return {'none'} end
if not pcall(cjson.decode, body) then return {'corrupt', string.len(body)} end
local current = current_of(c[1], c[2])
if ARGV[6] ~= '' and current ~= tonumber(ARGV[6]) then return {'lost'} end
local set = {'ended_by', 'cancel', 'status', ARGV[3]}
if current then
  set[#set + 1] = 'last_token'
  set[#set + 1] = current
end
if ARGV[4] == '1' then
  set[#set + 1] = 'ended_reason'
  set[#set + 1] = ARGV[5]
else
  redis.call('HDEL', K_RUN, 'ended_reason')
end
redis.call('HSET', K_RUN, unpack(set))
redis.call('RENAME', K_RUN, K_ENDED)
redis.call('ZADD', K_ENDED_AT, now_ms(), ID)
redis.call('ZREM', K_PAUSED, ID)
redis.call('ZREM', K_PENDING, ID)
redis.call('ZREM', K_DEADLINES, ID)
if c[1] then drop_lease(c[3], false) end
return {'ok', hash(K_ENDED)}

--- @rearm run
-- ARGV: 3 'expired' or 'dead' 4 the token seen when the owner was found dead|''
--       5 host whose in-flight set listed the run|''
local c = redis.call('HMGET', K_RUN, 'lease_token', 'lease_expires', 'last_token',
  'lease_host', 'resume_status')
if not c[1] then
  redis.call('ZREM', K_INFLIGHT, ID)
  if ARGV[5] ~= '' then redis.call('SREM', G .. 'owners:' .. ARGV[5], ID) end
  return {'none'}
end
local token = current_of(c[1], c[3])
if not token then
  -- re-paused or released: the record is the truth
  drop_lease(c[4], true)
  return {'none'}
end
if ARGV[4] ~= '' and token ~= tonumber(ARGV[4]) then return {'busy'} end
-- An owner found dead is only proof against the token that was seen with it: a
-- lease taken since (no token seen, or another one) may belong to a live worker.
if ARGV[3] == 'dead' and ARGV[4] == '' then return {'busy'} end
if ARGV[3] == 'expired' and now_ms() < tonumber(c[2]) then return {'busy'} end
redis.call('HSET', K_RUN, 'last_token', token, 'ended_by', 'recovery')
redis.call('HINCRBY', K_RUN, 'recoveries', 1)
if c[5] == 'pending' then
  redis.call('ZADD', K_PENDING, 0, ID) -- due for re-sending at once
end
drop_lease(c[4], true)
return {'ok', hash(K_RUN)}

--- @quarantine run
-- ARGV: 3 SHA-1 of the corrupt record (moved only if it is still that record)
-- The key may not even be a hash: TYPE is checked before anything is read.
local kind = redis.call('TYPE', K_RUN)['ok']
local body, host = false, false
if kind == 'hash' then
  local c = redis.call('HMGET', K_RUN, 'record', 'lease_host')
  body, host = c[1], c[2]
elseif kind == 'string' then
  body = redis.call('GET', K_RUN)
end
if kind == 'none' or redis.sha1hex(body or '') ~= ARGV[3] then return {'changed'} end
-- Never overwrite evidence of an earlier corruption: /corrupt, then /corrupt.1, ...
local dst, n = K_RUN .. '/corrupt', 0
while redis.call('EXISTS', dst) == 1 do
  n = n + 1
  dst = K_RUN .. '/corrupt.' .. n
end
redis.call('RENAME', K_RUN, dst)
redis.call('ZREM', K_PAUSED, ID)
redis.call('ZREM', K_PENDING, ID)
redis.call('ZREM', K_DEADLINES, ID)
drop_lease(host, false)
return {'ok', dst}

--- @due_resumes
-- KEYS: 1 a group's pending index (scored by when last sent, server us).
-- ARGV: 1 upper bound (us)|'' (then: now - older_than) 2 older_than (us) 3 limit
--       4 the group's run key prefix ("<prefix>:{<group>}:run:"): the script
--       derives run keys (same hash tag) from the ids it finds.
-- Marks each due request as sent now; returns now, the bound used, how many
-- entries it examined, and the due ids.
local now = now_us()
local bound = now - tonumber(ARGV[2])
if ARGV[1] ~= '' then bound = tonumber(ARGV[1]) end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', bound, 'LIMIT', 0, tonumber(ARGV[3]))
local due = {}
for _, id in ipairs(ids) do
  -- pcall: a key that is not a run hash (corrupt) is dropped from the index, not
  -- an error that would stop the sweep halfway through.
  local c = redis.pcall('HMGET', ARGV[4] .. id, 'resume_status', 'lease_token', 'last_token')
  if c.err then c = {} end
  if c[1] == 'pending' and not current_of(c[2], c[3]) then
    redis.call('ZADD', KEYS[1], now, id)
    due[#due + 1] = id
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return {now, bound, #ids, due}

--- @prune
-- KEYS: 1 a group's ended index (scored by when the run ended, server ms).
-- ARGV: 1 older_than (ms) 2 limit 3 the group's run key prefix.
-- Deletes up to limit ended records older than that; returns how many.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[1]),
  'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[3] .. id .. '/ended')
  redis.call('ZREM', KEYS[1], id)
end
return #ids

--- @stats
-- KEYS: a group's 1 paused 2 inflight 3 pending 4 deadlines. A read: index sizes, and the
-- deadlines passed by the server's clock (us).
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
  redis.call('ZCOUNT', KEYS[4], '-inf', now)}

--- @due
-- KEYS: 1 a sorted set. ARGV: 1 upper score bound|'' (then: server time, in ARGV[2] units)
--       2 'ms' or 'us'. A read: the members scored at or below the bound.
local bound = ARGV[1]
if bound == '' then
  local t = redis.call('TIME')
  if ARGV[2] == 'us' then
    bound = t[1] .. string.format('%06d', tonumber(t[2]))
  else
    bound = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', bound)
