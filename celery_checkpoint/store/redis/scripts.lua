-- Lua scripts of the Redis checkpoint store (celery_checkpoint/store/redis.py).
--
-- Each "--- @name" section is one script. Sections marked "run" act on one run
-- and get the "@run-prelude" section prepended: they take KEYS[1] = the run's
-- hash key ("<prefix>:{<group>}:run:<id>"), ARGV[1] = the run id, ARGV[2] =
-- the group's key base ("<prefix>:{<group>}:"), and derive the run's other keys
-- and its group's index keys from those. Sections marked "key" act on one
-- business key and get the "@key-prelude": KEYS[1] = the key's hash
-- ("<prefix>:{<group of the key>}:key:<key>"), ARGV[1] = the key, ARGV[2] = the
-- key's group base. No script touches a key and a run at once: they may live
-- in different hash slots (see "Business keys" in the package docstring). Every key a script touches carries
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
local K_ENDED_AT, K_UNDELIVERED = G .. 'ended', G .. 'undelivered'
local K_NONCES = G .. 'nonces'
-- How long a save may take between binding its key (the key's server's clock)
-- and writing its record (the run's server's clock): an hour, so primaries
-- whose clocks differ by less than that agree; the fences of G:nonces are kept
-- a day, so a save refused by neither is never older than its fence.
local BIND_MS = 3600000
local LEASE = {'lease_token', 'lease_owner', 'lease_host', 'lease_claimed', 'lease_expires'}
local function hash(key) return redis.call('HGETALL', key) end
-- Drop a lease from the in-flight index and its host's set; with clear, also
-- its fields (not needed when the run's hash is being deleted or renamed).
local function drop_lease(host, clear)
  if host then redis.call('SREM', G .. 'owners:' .. host, ID) end
  redis.call('ZREM', K_INFLIGHT, ID)
  if clear then redis.call('HDEL', K_RUN, unpack(LEASE)) end
end

-- Whether the run's live record names key k with nonce n: 'current'. If not, n
-- is fenced (a save still carrying it is refused from now on) and the verdict
-- is 'prev' (the record names k with the binding's previous nonce) or 'gone';
-- written says whether a save with n wrote its record (and took the early
-- answer reserved with n) before the record moved on.
local function key_check(k, n, prev)
  -- pcall: a run key that is not a hash (corrupt) holds no key.
  local c = redis.pcall('HMGET', K_RUN, 'key', 'key_nonce')
  if c.err then c = {} end
  if c[1] == k and c[2] == n then return {'current', '0'} end
  local written = '0'
  if redis.call('ZSCORE', K_NONCES, 'w:' .. n) then written = '1' end
  redis.call('ZADD', K_NONCES, now_ms(), 'f:' .. n)
  if prev ~= '' and c[1] == k and c[2] == prev then return {'prev', written} end
  return {'gone', written}
end

-- A record naming a key is written only under a binding that is not fenced and
-- was made a moment ago (its time, from the key's server, in since_ms).
local function key_refused(nonce, since_ms)
  if redis.call('ZSCORE', K_NONCES, 'f:' .. nonce) then return true end
  return now_ms() - tonumber(since_ms) > BIND_MS
end

--- @key-prelude
local KEY, KG = ARGV[1], ARGV[2]
local K_KEY = KEYS[1]
local K_EARLY, K_UNSETTLED = KG .. 'early', KG .. 'unsettled'
local BINDING = {'run', 'nonce', 'since', 'prev'}
local EARLY = {'early', 'early_id', 'early_exp', 'early_by'}
local function drop_early()
  redis.call('HDEL', K_KEY, unpack(EARLY))
  redis.call('ZREM', K_EARLY, KEY)
end

--- @save run
-- ARGV: 3 token|''|'create' (only if the run has no record, paused or ended)
--       4 record JSON 5 record last_token 6 paused_at (us) 7 deadline (us)|''
--       8 resume status|'' 9 key|'' 10 its binding's nonce|'' 11 the binding's time (ms)|''
--       12 '1' if the record takes the early answer reserved with that nonce
--       13... the other control fields, name, value, ... (with ended_by last on a re-pause)
-- Returns 'ok' and the key and nonce of the record it replaced (false, false if none).
local create = ARGV[3] == 'create'
local has_token = ARGV[3] ~= '' and not create
local c = redis.call('HMGET', K_RUN, 'last_token', 'lease_token', 'lease_host', 'key', 'key_nonce')
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
if ARGV[9] ~= '' and key_refused(ARGV[10], ARGV[11]) then return {'fenced'} end
if ARGV[12] == '1' then redis.call('ZADD', K_NONCES, now_ms(), 'w:' .. ARGV[10]) end
if ended_last then
  redis.call('DEL', K_ENDED)
  redis.call('ZREM', K_ENDED_AT, ID)
  redis.call('ZREM', K_UNDELIVERED, ID)
end
if exists then redis.call('DEL', K_RUN) end
redis.call('HSET', K_RUN, 'record', ARGV[4], 'last_token', last, unpack(ARGV, 13))
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
return {'ok', c[4], c[5]}

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
-- ARGV: 3 request id 4 request JSON 5 pause_seq|'' 6 '1' if the timer's own request
--       7 key|'' 8 nonce|'' (an answer by key: only if the run holds the key under
--       that binding; else 'stale' and the verdict of key_check)
local c = redis.call('HMGET', K_RUN, 'pause_seq', 'step', 'resume_id', 'resume_seq',
  'resume_status', 'last_token', 'lease_token', 'record', 'deadline', 'key', 'key_nonce')
if ARGV[7] ~= '' and (c[10] ~= ARGV[7] or c[11] ~= ARGV[8]) then
  return {'stale', key_check(ARGV[7], ARGV[8], '')}
end
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
-- Past the deadline of an expiring pause only the timer's own request gets in.
-- deadline: the time (us) for a pause that expires, 'r' for one that resumes,
-- '1' from an older version (then the record and the index say).
local deadline = c[9]
if ARGV[6] ~= '1' and deadline and deadline ~= 'r' then
  local at = tonumber(deadline)
  if deadline == '1' then
    local ok, record = pcall(cjson.decode, c[8])
    at = nil
    if ok and type(record) == 'table' and record.on_timeout ~= 'resume' then
      at = tonumber(redis.call('ZSCORE', K_DEADLINES, ID))
    end
  end
  if at and now_us() >= at then return {'expired', c[2] or '', at} end
end
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

--- @key_check run
-- ARGV: 3 key 4 the binding's nonce 5 its previous nonce|''
return key_check(ARGV[3], ARGV[4], ARGV[5])

--- @heartbeat run
-- ARGV: 3 token 4 lease (ms)
local c = redis.call('HMGET', K_RUN, 'lease_token', 'last_token', 'lease_owner', 'lease_claimed')
if current_of(c[1], c[2]) ~= tonumber(ARGV[3]) then return {'lost'} end
local expires = now_ms() + tonumber(ARGV[4])
redis.call('HSET', K_RUN, 'lease_expires', expires)
redis.call('ZADD', K_INFLIGHT, expires, ID)
return {'ok', c[3], c[4], expires}

--- @complete run
-- ARGV: 3 token|'' 4 '1' if a result follows 5 result
-- Returns 'ok' and, when it completed a run naming a key, the key and its nonce.
local c = redis.call('HMGET', K_RUN, 'last_token', 'ended_by', 'resume_status', 'deadline',
  'lease_token', 'lease_host', 'key', 'key_nonce')
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
  local now = now_us()
  redis.call('RENAME', K_RUN, K_ENDED)
  redis.call('HSET', K_ENDED, 'status', 'completed', 'ended_by', 'complete',
    'last_token', current or last, 'ended_at', now)
  redis.call('ZADD', K_ENDED_AT, math.floor(now / 1000), ID)
  if ARGV[4] == '1' then
    -- The result waits in the undelivered index until a worker says Celery has it.
    redis.call('HSET', K_ENDED, 'result', ARGV[5])
    redis.call('ZADD', K_UNDELIVERED, now, ID)
  end
  redis.call('ZREM', K_PAUSED, ID)
  -- The indexes hold only runs with a pending request / a deadline.
  if c[3] == 'pending' then redis.call('ZREM', K_PENDING, ID) end
  if c[4] then redis.call('ZREM', K_DEADLINES, ID) end
end
if c[5] then drop_lease(c[6], not exists) end
if exists and c[7] then return {'ok', c[7], c[8]} end
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
local now = now_us()
local set = {'ended_by', 'cancel', 'status', ARGV[3], 'ended_at', now}
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
redis.call('ZADD', K_ENDED_AT, math.floor(now / 1000), ID)
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

--- @restore run
-- ARGV: 3 'paused' or 'ended' 4 record JSON 5 last_token 6 paused_at (us)
--       7 deadline (us)|'' (paused) 8 resume status|'' 9 ended_at (us) (ended)
--       10 key|'' 11 nonce|'' 12 the binding's time (ms)|'' 13... control fields
-- Writes the record as given only where the run has none at all.
if redis.call('EXISTS', K_RUN) == 1 or redis.call('EXISTS', K_ENDED) == 1 then
  return {'exists'}
end
if ARGV[10] ~= '' and key_refused(ARGV[11], ARGV[12]) then return {'fenced'} end
if ARGV[3] == 'ended' then
  redis.call('HSET', K_ENDED, 'record', ARGV[4], 'last_token', ARGV[5], 'ended_at', ARGV[9],
    unpack(ARGV, 13))
  redis.call('ZADD', K_ENDED_AT, math.floor(tonumber(ARGV[9]) / 1000), ID)
  return {'ok'}
end
redis.call('HSET', K_RUN, 'record', ARGV[4], 'last_token', ARGV[5], unpack(ARGV, 13))
redis.call('ZADD', K_PAUSED, ARGV[6], ID)
if ARGV[7] ~= '' then redis.call('ZADD', K_DEADLINES, ARGV[7], ID) end
if ARGV[8] == 'pending' then redis.call('ZADD', K_PENDING, now_us(), ID) end
return {'ok'}

--- @mark_delivered run
redis.call('ZREM', K_UNDELIVERED, ID)
return {'ok'}

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

--- @due_deliveries
-- KEYS: 1 a group's undelivered index (scored by when completed or last returned,
-- server us). ARGV as due_resumes. Marks each due run as returned now.
local now = now_us()
local bound = now - tonumber(ARGV[2])
if ARGV[1] ~= '' then bound = tonumber(ARGV[1]) end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', bound, 'LIMIT', 0, tonumber(ARGV[3]))
local due = {}
for _, id in ipairs(ids) do
  local c = redis.pcall('HMGET', ARGV[4] .. id .. '/ended', 'status', 'result')
  if c.err then c = {} end
  if c[1] == 'completed' and c[2] then
    redis.call('ZADD', KEYS[1], now, id)
    due[#due + 1] = id
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return {now, bound, #ids, due}

--- @older
-- KEYS: 1 a sorted set scored in server ms. ARGV: 1 age (ms) 2 'list' or 'remove'.
-- The members (or how many were removed) scored over age ms ago.
local bound = now_ms() - tonumber(ARGV[1])
if ARGV[2] == 'remove' then
  return redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', bound)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', bound, 'LIMIT', 0, 500)

--- @prune_early
-- KEYS: 1 a group's index of early answers (scored by expiry, server us).
-- ARGV: 1 limit 2 the group's key hash prefix ("<prefix>:{<group>}:key:") 3 offset
-- Deletes expired early answers no save has reserved (a reserved one is left to
-- the binding that reserved it); returns how many it examined and how many it left.
local now = now_us()
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', tonumber(ARGV[3]),
  tonumber(ARGV[1]))
local left = 0
for _, key in ipairs(keys) do
  local h = ARGV[2] .. key
  local e = redis.call('HMGET', h, 'early_exp', 'early_by')
  if not e[1] then
    redis.call('ZREM', KEYS[1], key)
  elseif e[2] or tonumber(e[1]) > now then
    left = left + 1
  else
    redis.call('HDEL', h, 'early', 'early_id', 'early_exp', 'early_by')
    redis.call('ZREM', KEYS[1], key)
  end
end
return {#keys, left}

--- @key_bind key
-- ARGV: 3 run id 4 a fresh nonce 5 '1' if the pause may take an early answer
--       6 the pause's deadline (us) if it expires then|''
-- 'held' (run, nonce, prev, 1 if unsettled): another run's binding, or one not
-- settled yet, to check first. 'keep' (nonce, now ms): the run holds the key
-- and takes nothing. 'bound' (now ms, early answer|false, prev|''): the key is
-- bound to the run with the fresh nonce, unsettled until its record is written,
-- and the early answer returned is reserved for it.
local b = redis.call('HMGET', K_KEY, 'run', 'nonce', 'since', 'prev', 'early', 'early_exp',
  'early_by')
local now = now_us()
local ms = math.floor(now / 1000)
if b[1] and (b[1] ~= ARGV[3] or b[3]) then
  return {'held', b[1], b[2], b[4] or '', b[3] and 1 or 0}
end
local take = ARGV[5] == '1' and b[5] and not b[7] and tonumber(b[6]) > now
  and (ARGV[6] == '' or now < tonumber(ARGV[6]))
if b[1] and not take then return {'keep', b[2], ms} end
local set = {'run', ARGV[3], 'nonce', ARGV[4], 'since', ms}
local prev = ''
if b[1] then
  prev = b[2]
  set[#set + 1] = 'prev'
  set[#set + 1] = prev
end
if take then
  set[#set + 1] = 'early_by'
  set[#set + 1] = ARGV[4]
end
redis.call('HSET', K_KEY, unpack(set))
redis.call('ZADD', K_UNSETTLED, ms, KEY)
return {'bound', ms, take and b[5] or false, prev}

--- @key_settle key
-- ARGV: 3 run id 4 nonce 5 verdict of key_check: 'current', 'prev' or 'gone'
--       6 '1' if a save with the nonce wrote its record
-- Settles the binding the verdict is about; 'changed' if it is not there any more.
local b = redis.call('HMGET', K_KEY, 'run', 'nonce', 'prev', 'early_by')
if b[1] ~= ARGV[3] or b[2] ~= ARGV[4] then return {'changed'} end
if b[4] == ARGV[4] then
  if ARGV[5] == 'current' or ARGV[6] == '1' then
    drop_early() -- the record took it
  else
    redis.call('HDEL', K_KEY, 'early_by') -- never taken: it waits again
  end
end
if ARGV[5] == 'current' then
  redis.call('HDEL', K_KEY, 'since', 'prev')
elseif ARGV[5] == 'prev' and b[3] then
  redis.call('HSET', K_KEY, 'nonce', b[3])
  redis.call('HDEL', K_KEY, 'since', 'prev')
else
  redis.call('HDEL', K_KEY, unpack(BINDING))
end
redis.call('ZREM', K_UNSETTLED, KEY)
return {'ok'}

--- @key_answer key
-- ARGV: 3 request id 4 request JSON 5 ttl (us)
-- 'bound' (run, nonce, prev, 1 if unsettled): answer that run. Else the early
-- answer: 'kept' (the same request, as stored), 'already' (another one's id),
-- or 'stored'.
local b = redis.call('HMGET', K_KEY, 'run', 'nonce', 'prev', 'since', 'early', 'early_id',
  'early_exp')
if b[1] then return {'bound', b[1], b[2], b[3] or '', b[4] and 1 or 0} end
local now = now_us()
if b[5] and tonumber(b[7]) > now then
  if b[6] == ARGV[3] then return {'kept', b[5]} end
  return {'already', b[6]}
end
local expires = now + tonumber(ARGV[5])
redis.call('HSET', K_KEY, 'early', ARGV[4], 'early_id', ARGV[3], 'early_exp', expires)
redis.call('HDEL', K_KEY, 'early_by')
redis.call('ZADD', K_EARLY, expires, KEY)
return {'stored'}

--- @prune
-- KEYS: 1 a group's ended index (scored by when the run ended, server ms).
-- ARGV: 1 older_than (ms) 2 limit 3 the group's run key prefix 4 its undelivered index.
-- Deletes up to limit ended records older than that; returns how many.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[1]),
  'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[3] .. id .. '/ended')
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', ARGV[4], id)
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
