--[[
The field cache and write buffer every command shares.

Each field of the memory's hash is read from Redis at most once per call:
'cache' holds what the call knows, false for absent. Writes wait for the
end of the call (commit): a script is not rolled back, so corrupt data met
midway must find nothing written yet. Writes that change nothing are
skipped, so an operation that changes nothing leaves the version (and every
replica) alone.

The library is loaded once and its functions run one call at a time, so
this state lives at the library's top level and begin() resets it.
]]
local REF = 193
local JOURNAL_SIZE = @JOURNAL_SIZE@
local TOUCH_LIMIT = @TOUCH_LIMIT@

local K                      -- the memory's hash
local cache                  -- field -> value, false for absent
local touched, ntouched      -- the fields this call changed, once each (for the journal)
local touched_set
local changes                -- every change made, counted (how an operation knows it did something)
local dellist, deleting      -- fields that may need deleting, in order
local setlist, setting       -- fields to write, in order
local writes                 -- bookkeeping: field, value, ... for the final HSET
local wrote                  -- whether the call modified the hash (the server then invalidates it once)

local function begin(key)
  K = key
  cache, touched, ntouched, touched_set, changes = {}, {}, 0, {}, 0
  dellist, deleting, setlist, setting, writes = nil, nil, {}, {}, {}  -- dellist made by the first hdel
  wrote = false
end

local function fmt(n) return string.format('%d', n) end

local function touch(f)
  changes = changes + 1
  if touched_set[f] then return end
  touched_set[f] = true
  ntouched = ntouched + 1
  if ntouched <= TOUCH_LIMIT then touched[ntouched] = f end
end

local function hget(f)
  local v = cache[f]
  if v == nil then
    v = redis.call('HGET', K, f) or false
    cache[f] = v
  end
  return v or nil
end

-- A field that cannot exist yet (a new node, a new slot) or a header: no
-- read first.
local function put(f, v)
  cache[f] = v
  if not setting[f] then setting[f] = true; setlist[#setlist + 1] = f end
  touch(f)
end

local function hset(f, v)
  if hget(f) ~= v then put(f, v) end
end

local function hdel(f)
  if hget(f) then
    cache[f] = false
    if not dellist then dellist, deleting = {}, {} end
    if not deleting[f] then deleting[f] = true; dellist[#dellist + 1] = f end
    touch(f)
  end
end

-- Bookkeeping written with the rest, not named in the journal.
local function note(f, v)
  writes[#writes + 1] = f
  writes[#writes + 1] = v
end

-- Sends what the call changed, as it stands at the end (a field written
-- then deleted by a later operation of the same call is deleted): one HDEL,
-- then one HSET.
local function flush()
  if dellist then
    local dels = {}
    for _, f in ipairs(dellist) do
      if cache[f] == false then dels[#dels + 1] = f end
    end
    for start = 1, #dels, 1000 do
      if redis.call('HDEL', K, unpack(dels, start, math.min(start + 999, #dels))) > 0 then wrote = true end
    end
  end
  for _, f in ipairs(setlist) do
    if cache[f] then writes[#writes + 1] = f; writes[#writes + 1] = cache[f] end
  end
  for start = 1, #writes, 1000 do
    redis.call('HSET', K, unpack(writes, start, math.min(start + 999, #writes)))
    wrote = true
  end
end

local function hfield(n) return 'h' .. n end
local function efield(n, s) return 'e' .. n .. ':' .. s end
