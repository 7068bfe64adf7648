--[[
delete: deletes a memory's keys and, if there was anything, publishes a
'clear' of the whole memory on its change channel.

KEYS     the memory hashes first (ARGV[3] of them), then the keys deleted
         with them; with ARGV[4], the last key is a participant set
ARGV[1]  author (may be empty)
ARGV[2]  idle ms: only if none of the hashes changed in that long, by the
         server's clock ('' for no such condition)
ARGV[3]  the number of hashes among KEYS
ARGV[4]  the participant count the client listed ('' for none)

Replies: the number of keys deleted; -1 if a hash was active, -2 if the
participant set no longer has the count listed (nothing is deleted then).
]]

local function delete(KEYS, ARGV)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  -- The idle check runs in the same atomic step as the delete: a write
  -- landing after a listing keeps its memory.
  local idle = tonumber(ARGV[2] or '')
  if idle then
    for i = 1, tonumber(ARGV[3]) do
      local active = tonumber(redis.call('HGET', KEYS[i], 'ta') or '')
      if active and now - active < idle then return -1 end
    end
  end
  -- An agent that joined since the listing would be left out of the delete.
  if ARGV[4] and ARGV[4] ~= '' and redis.call('SCARD', KEYS[#KEYS]) ~= tonumber(ARGV[4]) then return -2 end
  local deleted = 0
  for start = 1, #KEYS, 1000 do
    deleted = deleted + redis.call('DEL', unpack(KEYS, start, math.min(start + 999, #KEYS)))
  end
  if deleted > 0 then
    local now_ms = string.format('%d', now)
    local author = string.format('%d', #ARGV[1]) .. ':' .. ARGV[1]
    local event = {'0', now_ms, '', 'dclear', '0', '', '', '', '', author}
    redis.pcall('PUBLISH', KEYS[1] .. '@FEED_SUFFIX@', table.concat(event, ' '))
  end
  return deleted
end
