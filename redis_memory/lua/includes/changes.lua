--[[
What changed in the memory's hash (K, see fields.lua) since the version a
replica holds: the reply of the sync function, which the apply function
also gives a writer whose call others' changes came before (see sync.lua
for the reply, and the journal entry's format).
]]
local function changes_since(stamp, incarnation)
  local meta = redis.call('HMGET', K, 'v', 'i')
  local v, inc = meta[1] or '', meta[2]
  if not inc then
    -- Fields without an incarnation: the caller's full read reports them.
    if redis.call('EXISTS', K) == 1 then return {v, '', 'full'} end
    return {'0', '', 'empty'}
  end
  local known = tonumber(string.match(stamp, '^%d+') or '')
  local current = tonumber(string.match(v, '^%d+') or '')
  if inc ~= incarnation or not known or not current or current < known or current - known >= JOURNAL_SIZE then
    return {v, inc, 'full'}
  end
  if known > 0 then
    local e = hget('j' .. fmt(known % JOURNAL_SIZE)) or ''
    if string.sub(e, 1, #stamp + 1) ~= stamp .. ' ' then return {v, inc, 'full'} end
  end
  local fields, seen = {}, {}
  for n = known + 1, current do
    local e = hget('j' .. fmt(n % JOURNAL_SIZE))
    local num, tok
    if e then num, tok = string.match(e, '^(%d+) (%S+) ') end
    if num ~= fmt(n) then return {v, inc, 'full'} end
    local p = #num + #tok + 3
    if string.sub(e, p) == '*' then return {v, inc, 'full'} end
    while p <= #e do
      local len = string.match(e, '^%d+', p)
      local c = len and p + #len
      if not c or string.sub(e, c, c) ~= ':' or c + tonumber(len) > #e then return {v, inc, 'full'} end
      local f = string.sub(e, c + 1, c + tonumber(len))
      if not seen[f] then seen[f] = true; fields[#fields + 1] = f end
      p = c + #f + 1
    end
  end
  local out = {v, inc, 'delta'}
  for start = 1, #fields, 500 do
    local chunk = {}
    for k = start, math.min(start + 499, #fields) do chunk[#chunk + 1] = fields[k] end
    local values = redis.call('HMGET', K, unpack(chunk))
    for k = 1, #chunk do
      out[#out + 1] = chunk[k]
      out[#out + 1] = values[k]
    end
  end
  return out
end
