-- Lua scripts of the Redis checkpoint store (celery_checkpoint/store/redis.py).
--
-- Each "--- @name" section is one script. Sections marked "run" act on one run
-- and get the "@run-prelude" section prepended: they take KEYS[1] = the run's
-- record key ("<prefix>run:{<id>}"), ARGV[1] = the run id, ARGV[2] = the key
-- prefix, and derive the run's other keys (same hash tag) and the global index
-- keys from those -- one declared key keeps each call small; see the module
-- docstring for what that means for Redis Cluster. Every script does all its
-- reads and checks before its first write, so an error leaves nothing
-- half-applied. Time comes from the server (TIME), never from the caller.
-- Control fields go back to Python as one JSON string (cjson.encode of a flat
-- array of strings), which parses much faster than a nested reply.

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

-- The token of the lease if it belongs to the current claim, else nil. A lease
-- whose token is not above the record's last_token was superseded.
local function live_token(run, ctl, lease)
  local tok = redis.call('HGET', lease, 'token')
  if not tok then return nil end
  tok = tonumber(tok)
  if redis.call('EXISTS', run) == 1
      and tok <= tonumber(redis.call('HGET', ctl, 'last_token') or '0') then
    return nil
  end
  return tok
end

--- @run-prelude
local ID, P = ARGV[1], ARGV[2]
local K_RUN = KEYS[1]
local K_CTL, K_LEASE = K_RUN .. ':ctl', K_RUN .. ':lease'
local K_ENDED, K_ENDED_CTL = K_RUN .. ':ended', K_RUN .. ':ended:ctl'
local K_PAUSED, K_INFLIGHT = P .. 'paused', P .. 'inflight'
local K_PENDING, K_DEADLINES = P .. 'pending', P .. 'deadlines'
local function live() return live_token(K_RUN, K_CTL, K_LEASE) end
local function ctl_json(key) return cjson.encode(redis.call('HGETALL', key)) end
-- The token and host of the run's lease, or nil.
local function lease_of()
  local l = redis.call('HMGET', K_LEASE, 'token', 'host')
  if not l[1] then return nil, nil end
  return tonumber(l[1]), l[2]
end
-- Whether the record exists, and its last_token.
local function record_of()
  if redis.call('EXISTS', K_RUN) == 0 then return false, 0 end
  return true, tonumber(redis.call('HGET', K_CTL, 'last_token') or '0')
end
-- A lease is the current claim only if its token is above the record's last_token.
local function current_of(tok, exists, last)
  if tok and (not exists or tok > last) then return tok end
  return nil
end
-- Drop a lease from its hash, the in-flight index and its host's set.
local function drop_lease(host)
  if host then redis.call('SREM', P .. 'owners:' .. host, ID) end
  redis.call('DEL', K_LEASE)
  redis.call('ZREM', K_INFLIGHT, ID)
end
local function end_lease()
  local tok, host = lease_of()
  if tok then drop_lease(host) end
end

--- @save run
-- ARGV: 3 token|'' 4 record JSON 5 record last_token 6 paused_at (us)
--       7 deadline (us)|'' 8 resume status|''
--       9 JSON array of the other control fields, name, value, ... (all strings)
local has_token = ARGV[3] ~= ''
local tok, host = lease_of()
local exists, prev = record_of()
local current = current_of(tok, exists, prev)
local last
if has_token then
  if current ~= tonumber(ARGV[3]) then return {'lost'} end
  last = current
else
  if current then return {'inflight', current} end
  -- A new run under the id of an ended one: its tokens go on growing.
  local ended_last = tonumber(redis.call('HGET', K_ENDED_CTL, 'last_token') or '0')
  last = math.max(tonumber(ARGV[5]), prev, ended_last)
end
redis.call('SET', K_RUN, ARGV[4])
if not has_token then redis.call('DEL', K_ENDED, K_ENDED_CTL) end
if exists then redis.call('DEL', K_CTL) end
redis.call('HSET', K_CTL, 'last_token', last, unpack(cjson.decode(ARGV[9])))
if has_token then redis.call('HSET', K_CTL, 'ended_by', 'repause') end
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
if tok then drop_lease(host) end
return {'ok'}

--- @claim run
-- ARGV: 3 owner JSON 4 owner host 5 lease (ms) 6 pause_seq|''
local body = redis.call('GET', K_RUN)
if not body then return {'none'} end
local c = redis.call('HMGET', K_CTL, 'status', 'pause_seq', 'last_token', 'resume_status')
if c[1] and c[1] ~= 'paused' then return {'none'} end
if ARGV[6] ~= '' and tonumber(c[2] or '1') ~= tonumber(ARGV[6]) then return {'none'} end
local last = tonumber(c[3] or '0')
local tok, host = lease_of()
if current_of(tok, true, last) then return {'none'} end
if redis.call('EXISTS', K_ENDED) == 1 then return {'none'} end
local now = now_ms()
local token = last + 1
local expires = now + tonumber(ARGV[5])
if tok then drop_lease(host) end -- superseded
redis.call('HSET', K_LEASE, 'token', token, 'owner', ARGV[3], 'host', ARGV[4],
  'claimed', now, 'expires', expires)
redis.call('ZADD', K_INFLIGHT, expires, ID)
redis.call('SADD', P .. 'owners:' .. ARGV[4], ID)
-- Only a pending request is in the pending index (every script keeps it so).
if c[4] == 'pending' then redis.call('ZREM', K_PENDING, ID) end
return {'ok', body, ctl_json(K_CTL), token, now, expires}

--- @request_resume run
-- ARGV: 3 request id 4 request JSON 5 pause_seq|''
if redis.call('EXISTS', K_RUN) == 0 then
  if redis.call('EXISTS', K_ENDED) == 1 then
    return {'ended', ctl_json(K_ENDED_CTL)}
  end
  return {'notfound'}
end
local c = redis.call('HMGET', K_CTL, 'pause_seq', 'step', 'resume_id', 'resume_seq',
  'resume_status', 'last_token')
local seq = c[1] or '1'
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= tonumber(seq) then
  return {'rejected', seq, c[2] or ''}
end
local pending = c[3] and tonumber(c[4]) == tonumber(seq) -- a request of an earlier pause is void
if pending and c[3] == ARGV[3] then return {'existing', ctl_json(K_CTL)} end
-- In flight with no request of this pause (a timeout or a redelivery claimed it):
-- accepting would be lost when the holder completes.
local current = current_of(lease_of(), true, tonumber(c[6] or '0'))
if pending and (c[5] == 'pending' or current) then return {'already', c[3]} end
if current then return {'busy', current} end
redis.call('HSET', K_CTL, 'resume', ARGV[4], 'resume_id', ARGV[3], 'resume_seq', seq,
  'resume_status', 'pending')
redis.call('HDEL', K_CTL, 'resume_error')
redis.call('ZADD', K_PENDING, now_us(), ID)
return {'ok', ctl_json(K_CTL)}

--- @heartbeat run
-- ARGV: 3 token 4 lease (ms)
if live() ~= tonumber(ARGV[3]) then return {'lost'} end
local expires = now_ms() + tonumber(ARGV[4])
redis.call('HSET', K_LEASE, 'expires', expires)
redis.call('ZADD', K_INFLIGHT, expires, ID)
return {'ok', ctl_json(K_LEASE)}

--- @complete run
-- ARGV: 3 token|''
local tok, host = lease_of()
local exists = redis.call('EXISTS', K_RUN) == 1
local c = exists and redis.call('HMGET', K_CTL, 'last_token', 'ended_by', 'resume_status',
  'deadline') or {}
local last = tonumber(c[1] or '0')
local current = current_of(tok, exists, last)
if ARGV[3] ~= '' then
  local token = tonumber(ARGV[3])
  if not current then
    if exists then
      if last == token and c[2] == 'repause' then return {'ok'} end
      if last >= token then return {'lost', 'ended_by', c[2] or ''} end
      return {'lost', 'stale'}
    end
    local e = redis.call('HMGET', K_ENDED_CTL, 'last_token', 'status')
    if redis.call('EXISTS', K_ENDED) == 1 then
      local ended_last = tonumber(e[1] or '0')
      if e[2] == 'completed' and ended_last == token then return {'ok'} end -- idempotent
      if ended_last >= token then return {'lost', 'ended', e[2] or 'cancelled'} end
    end
    return {'ok'}
  end
  if current ~= token then return {'lost', 'stale'} end
elseif not current then
  -- Not in flight: a paused record (a fresh re-pause) stays as it is.
  if tok then drop_lease(host) end
  return {'ok'}
end
if exists then
  -- Keep a tombstone: a late writer with an older token, a redelivered first
  -- execution and a repeated resume must see that the run completed.
  redis.call('RENAME', K_RUN, K_ENDED)
  redis.call('DEL', K_ENDED_CTL)
  if redis.call('EXISTS', K_CTL) == 1 then redis.call('RENAME', K_CTL, K_ENDED_CTL) end
  redis.call('HSET', K_ENDED_CTL, 'status', 'completed', 'ended_by', 'complete',
    'last_token', current or last)
  redis.call('ZREM', K_PAUSED, ID)
  -- The indexes hold only runs with a pending request / a deadline.
  if c[3] == 'pending' then redis.call('ZREM', K_PENDING, ID) end
  if c[4] then redis.call('ZREM', K_DEADLINES, ID) end
end
if tok then drop_lease(host) end
return {'ok'}

--- @release run
-- ARGV: 3 token 4 '1' to mark the resume request failed 5 '1' if an error follows 6 error
if redis.call('EXISTS', K_RUN) == 0 then return {'lost'} end
if live() ~= tonumber(ARGV[3]) then return {'lost'} end
redis.call('HSET', K_CTL, 'last_token', ARGV[3], 'ended_by', 'release')
if ARGV[4] == '1' and redis.call('HEXISTS', K_CTL, 'resume_id') == 1 then
  redis.call('HSET', K_CTL, 'resume_status', 'failed')
  if ARGV[5] == '1' then
    redis.call('HSET', K_CTL, 'resume_error', ARGV[6])
  else
    redis.call('HDEL', K_CTL, 'resume_error')
  end
end
end_lease()
return {'ok'}

--- @cancel run
-- ARGV: 3 status 4 '1' if a reason follows 5 reason 6 token|''
local body = redis.call('GET', K_RUN)
if not body then return {'none'} end
if not pcall(cjson.decode, body) then return {'corrupt', string.len(body)} end
local current = live()
if ARGV[6] ~= '' and current ~= tonumber(ARGV[6]) then return {'lost'} end
if current then redis.call('HSET', K_CTL, 'last_token', current) end
redis.call('HSET', K_CTL, 'ended_by', 'cancel', 'status', ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSET', K_CTL, 'ended_reason', ARGV[5])
else
  redis.call('HDEL', K_CTL, 'ended_reason')
end
redis.call('RENAME', K_RUN, K_ENDED)
redis.call('RENAME', K_CTL, K_ENDED_CTL)
redis.call('ZREM', K_PAUSED, ID)
redis.call('ZREM', K_PENDING, ID)
redis.call('ZREM', K_DEADLINES, ID)
end_lease()
return {'ok', body, ctl_json(K_ENDED_CTL)}

--- @rearm run
-- ARGV: 3 'expired' or 'dead' 4 the token seen when the owner was found dead|''
--       5 host whose in-flight set listed the run|''
local lease = redis.call('HMGET', K_LEASE, 'token', 'expires')
if not lease[1] then
  redis.call('ZREM', K_INFLIGHT, ID)
  if ARGV[5] ~= '' then redis.call('SREM', P .. 'owners:' .. ARGV[5], ID) end
  return {'none'}
end
local token = tonumber(lease[1])
if redis.call('EXISTS', K_RUN) == 0
    or token <= tonumber(redis.call('HGET', K_CTL, 'last_token') or '0') then
  -- completed, or re-paused/released: the record (or its absence) is the truth
  end_lease()
  return {'none'}
end
if ARGV[4] ~= '' and token ~= tonumber(ARGV[4]) then return {'busy'} end
-- An owner found dead is only proof against the token that was seen with it: a
-- lease taken since (no token seen, or another one) may belong to a live worker.
if ARGV[3] == 'dead' and ARGV[4] == '' then return {'busy'} end
if ARGV[3] == 'expired' and now_ms() < tonumber(lease[2]) then return {'busy'} end
redis.call('HSET', K_CTL, 'last_token', token, 'ended_by', 'recovery')
redis.call('HINCRBY', K_CTL, 'recoveries', 1)
if redis.call('HGET', K_CTL, 'resume_status') == 'pending' then
  redis.call('ZADD', K_PENDING, 0, ID) -- due for re-sending at once
end
end_lease()
return {'ok', redis.call('GET', K_RUN), ctl_json(K_CTL)}

--- @quarantine run
-- ARGV: 3 SHA-1 of the corrupt record (moved only if it is still that record)
local body = redis.call('GET', K_RUN)
if not body or redis.sha1hex(body) ~= ARGV[3] then return {'changed'} end
redis.call('RENAME', K_RUN, K_RUN .. ':corrupt')
if redis.call('EXISTS', K_CTL) == 1 then
  redis.call('RENAME', K_CTL, K_RUN .. ':corrupt:ctl')
else
  redis.call('DEL', K_RUN .. ':corrupt:ctl')
end
redis.call('ZREM', K_PAUSED, ID)
redis.call('ZREM', K_PENDING, ID)
redis.call('ZREM', K_DEADLINES, ID)
end_lease()
return {'ok'}

--- @due_resumes
-- KEYS: 1 pending index (scored by when last sent, server us).
-- ARGV: 1 upper bound (us)|'' (then: now - older_than) 2 older_than (us) 3 limit
--       4 run key prefix ("<prefix>:run:"): the script derives run keys from the
--       ids it finds.
-- Marks each due request as sent now; returns now, the bound used, how many
-- entries it examined, and the due ids.
local now = now_us()
local bound = now - tonumber(ARGV[2])
if ARGV[1] ~= '' then bound = tonumber(ARGV[1]) end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', bound, 'LIMIT', 0, tonumber(ARGV[3]))
local due = {}
for _, id in ipairs(ids) do
  local run = ARGV[4] .. '{' .. id .. '}'
  local ctl = run .. ':ctl'
  if redis.call('EXISTS', run) == 1 and redis.call('HGET', ctl, 'resume_status') == 'pending'
      and not live_token(run, ctl, run .. ':lease') then
    redis.call('ZADD', KEYS[1], now, id)
    due[#due + 1] = id
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return {now, bound, #ids, due}

--- @stats
-- KEYS: 1 paused 2 inflight 3 pending 4 deadlines. A read: index sizes, and the
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
