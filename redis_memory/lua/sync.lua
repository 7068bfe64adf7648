--[[
sync: what changed in a memory since the version a replica holds.

KEYS[1]  the memory's hash

ARGV[1]  the replica's version stamp ('<count> <token>', or '0')
ARGV[2]  the replica's incarnation

Replies: {version stamp now, incarnation now, kind, field, value, ...}:
kind 'delta' with the current value (nil: deleted) of every field the
journal says changed since, 'full' when the journal no longer covers the gap
or does not hold that version (the server was rolled back) and the caller
must read it all, 'empty' when the memory does not exist.

A journal entry is '<count> <token> ' then '<len>:<field>' for each field it
touched, or '*' for too many to list; one that does not parse is answered
'full' too.
]]
-- @include fields
-- @include changes

local function sync(KEYS, ARGV)
  begin(KEYS[1])
  return changes_since(ARGV[1], ARGV[2])
end
