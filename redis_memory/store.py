"""Key layout, the server-side scripts, and every Redis command the library sends.

One memory is one Redis hash, ``<prefix>:<kind>:{<escaped id>}``. Its fields:

=============  ============================================================
``i``          incarnation: a random token set when the hash is created
``v``          version: ``<count> <token>``, the count +1 per applied operation,
               the token that of the operation (so a rolled-back server's
               later versions never pass for the ones it lost)
``c``          node-id counter; the root dict is node ``0``
``h<nid>``     node header: ``l <lo> <hi> <mod> <birth>``,
               ``d <len> <next> <mod> <birth>`` or ``s <len> 0 <mod> <birth>``;
               the birth is the token of the operation that created the node
``e<nid>:<s>`` list element at slot ``s`` (a decimal integer)
``e<nid>:<k>`` dict entry for the msgpack-encoded key ``k``: ``<seq>:<value>``;
               set element ``k``: an empty value
``j<n>``       journal ring: the stamp of version ``n`` and the fields it touched
``w<writer>``  a writer's last applied seq, when it was last indexed, result
``tc``         when the memory was created (ms since the epoch)
``ta``         when it last changed (ms since the epoch)
=============  ============================================================

A second key, ``<hash key>:w``, is a sorted set of writers by the time
they last wrote. Operation ids are remembered for :data:`OP_ID_RETENTION`
seconds after a writer's last write; older writer fields are pruned, a few
at a time, by the writes of others.

A value is msgpack bytes, or ``\\xc1<nid>`` (a byte msgpack never emits) for
a reference to a child node, or ``\\xc1<nid>=<msgpack map>`` for a list
item's dict of scalars stored whole (node ``nid`` without fields of its own,
until a ``promote`` gives it some; see :mod:`redis_memory.ops`).

List slots run from ``lo`` to ``hi - 1``; an append writes slot ``hi``, an
insert at the front slot ``lo - 1``, so both ends are O(1). Dict entries carry an insertion sequence number so the
insertion order of Python dicts survives.

Corrupt data (a field that does not follow this layout) is reported as
:class:`~redis_memory.errors.CorruptData` naming the key and field, by a
read and by the apply script, which then writes nothing. A hash with fields
but no ``i`` is corrupt, never created over. A node whose header is corrupt
(unparseable, or a dict's or set's count that is not its number of entries)
is removed whole with the attribute holding it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import redis

from .connection import Channel, Client, channel, resp_command
from .errors import ConnectionFailed, CorruptData, NotReplicated, ServerRefused
from .ops import Args, Plan

REF = 0xC1
#: A node header (see above); the apply script's read_header follows the same rule.
HEADER = re.compile(rb"([lds]) (-?[0-9]+) (-?[0-9]+) (-?[0-9]+)(?: (\S*))?")
JOURNAL_SIZE = 128
TOUCH_LIMIT = 1000
#: Seconds an operation id is remembered after its writer's last write: the
#: longest outage after which a resent operation is still recognised.
OP_ID_RETENTION = 7 * 24 * 3600
#: A writer's entry in the writer index is refreshed at most this often.
_INDEX_EVERY = 60
ANY_INCARNATION = b"*"
#: How long a write waits for its replicas by default, with wait_for_replicas (seconds).
REPLICA_TIMEOUT = 1.0
#: The change channel of a memory is its key plus this (same hash tag).
FEED_SUFFIX = ":changes"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def escape_id(identifier: str) -> str:
    """Percent-encode everything but ``[A-Za-z0-9-_.~]``: injective, no ``{}:*`` left."""
    if not isinstance(identifier, str) or not identifier:
        raise ValueError(f"a memory id must be a non-empty str, not {identifier!r}")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in identifier.encode("utf-8"))


def memory_key(prefix: str, kind: str, identifier: str) -> str:
    """The hash key of one memory; the braces make the id its Cluster hash tag."""
    return f"{escape_id(prefix)}:{escape_id(kind)}:{{{escape_id(identifier)}}}"


_PRELUDE = """
local K = KEYS[1]
local REF = 193
local JOURNAL_SIZE = %(journal)d
local TOUCH_LIMIT = %(touch_limit)d
local touched, ntouched = {}, 0
local function fmt(n) return string.format('%%d', n) end
local function touch(f)
  ntouched = ntouched + 1
  if ntouched <= TOUCH_LIMIT then touched[ntouched] = f end
end
-- Each field is read from Redis at most once per run (a field read while
-- checking is not read again while applying): 'cache' holds what this run
-- knows, false for absent. Deletions are collected and sent as one HDEL
-- before the final HSET.
local cache, doomed, dellist = {}, {}, {}
local function hget(f)
  local v = cache[f]
  if v == nil then
    v = redis.call('HGET', K, f) or false
    cache[f] = v
  end
  return v or nil
end
-- Writes that change nothing are skipped, so an operation that changes
-- nothing leaves the version (and every replica) alone. The others are
-- sent at the end, with the deletions: a script is not rolled back, so
-- corrupt data met midway must find nothing written yet.
local setlist, setting = {}, {}
local function hset(f, v)
  if hget(f) ~= v then
    cache[f] = v
    doomed[f] = nil
    if not setting[f] then setting[f] = true; setlist[#setlist + 1] = f end
    touch(f)
  end
end
local function hdel(f)
  if hget(f) then
    cache[f] = false
    if not doomed[f] then doomed[f] = true; dellist[#dellist + 1] = f end
    touch(f)
  end
end
local function flush_deletes()
  local dels = {}
  for _, f in ipairs(dellist) do
    if doomed[f] then dels[#dels + 1] = f end
  end
  for start = 1, #dels, 1000 do
    redis.call('HDEL', K, unpack(dels, start, math.min(start + 999, #dels)))
  end
end
local function hfield(n) return 'h' .. n end
-- Fields that cannot exist yet (a new node, a new slot) and headers are
-- collected here and written by one HSET at the end.
local writes = {}
local function put(f, v)
  writes[#writes + 1] = f
  writes[#writes + 1] = v
  cache[f] = v
  touch(f)
end
local function efield(n, s) return 'e' .. n .. ':' .. s end
"""

# Applies one operation. KEYS: the hash, the writer index, then any keys
# that share the memory's expiry (a session's participant set). ARGV: writer,
# seq, the operation's token (unique to it: the new version's token, the
# birth of the nodes it creates, the incarnation if it creates the memory),
# expected incarnation ('*' for any, or none), op name, nid, expiry in ms
# (0: none), author (may be empty), the birth of node nid as the client
# knows it (checked unless nid is the root); the number
# of arguments that follow for every node the op may remove (per node: nid,
# change count, key count, keys; change count -1 for a node whose header is
# corrupt, with all its entry fields, as read from the server), or -1 for
# the script to read them from the hash; then the op's own arguments (see ops.py).
# Replies: status, version stamp after, incarnation, result (the first new
# node id), stamp before, then what a delete removed. Malformed stored data
# is answered 'corrupt' with the key, the field (empty for a key of another
# type) and why: the client raises CorruptData.
# An applied change is published on the memory's change channel (see
# feed.py for the message).
# Every check runs before the first write: a script is not rolled back.
_APPLY = (_PRELUDE + """
local writer, seq, token = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local wfield = 'w' .. writer
local meta = redis.call('HMGET', K, 'i', 'v', 'c', wfield)
-- The version is '<count> <token of the operation that made it>': a server
-- rolled back to an older state and written again reaches the same counts
-- with other tokens, so no replica mistakes one state for another.
local before = meta[2] or ''
local incarnation, version, counter = meta[1], tonumber(string.match(before, '^%%d+') or '0'), tonumber(meta[3] or '0')
local nid, op = ARGV[6], ARGV[5]
local stamp_now = before

local function reply(status, result, ...)
  return {status, stamp_now, incarnation or '', result or '', before, ...}
end
-- Malformed stored data is answered with the key and field, for the
-- client to raise CorruptData; never met by a Lua error.
local function corrupt(field, why, key)
  return reply('corrupt', '', key or K, field, why)
end

local stamp = 0
if incarnation and meta[4] then
  local lseq, lstamp, lres = string.match(meta[4], '^(%%d+) (%%d+) (%%d*)$')
  if lseq and tonumber(lseq) >= seq then return reply('dup', lres) end
  stamp = tonumber(lstamp or '0')
end
if ARGV[4] ~= '*' and ARGV[4] ~= (incarnation or '') then return reply('gone') end
-- A memory that does not exist yet is created by this operation's final
-- write, never before everything is checked.
local creating = not incarnation
if creating then
  -- Fields without an incarnation are a damaged memory, not a new one:
  -- creating over them would mix old nodes with new ones.
  if redis.call('EXISTS', K) == 1 then return corrupt('i', 'a memory with fields but no incarnation') end
  incarnation = token
  version, counter = 0, 0
end
-- The writer index is touched once a minute per writer (below); a key of
-- another type there is found now, before anything is written.
local clock = redis.call('TIME')
local now = tonumber(clock[1])
local index_due = now - stamp >= %(index_every)d
if index_due then
  local kind = redis.call('TYPE', KEYS[2])
  kind = type(kind) == 'table' and kind.ok or kind
  if kind ~= 'zset' and kind ~= 'none' then
    return corrupt('', 'holds another kind of Redis value than redis_memory keeps there', KEYS[2])
  end
end

-- The header of node n, or nil if there is none; nil and true if it is
-- corrupt (the same rule as store.HEADER).
local function read_header(n)
  local h = hget(hfield(n))
  if not h and creating and n == '0' then h = 'd 0 1 0' end
  if not h then return nil end
  -- A node's birth is the token of the operation that created it: after a
  -- rollback the same id may name another node, of another birth.
  local kind, a, b, c, birth = string.match(h, '^([lds]) (%%-?%%d+) (%%-?%%d+) (%%-?%%d+) (%%S*)$')
  if not kind then
    kind, a, b, c = string.match(h, '^([lds]) (%%-?%%d+) (%%-?%%d+) (%%-?%%d+)$')
    birth = ''  -- the root's header has none
  end
  if not kind then return nil, true end
  a, b = tonumber(a), tonumber(b)
  if kind == 'l' and b < a then return nil, true end
  return {kind = kind, a = a, b = b, c = tonumber(c), birth = birth}
end
-- A list cannot hold more slots than the hash has fields: a header that
-- claims so is corrupt, and walking its range would hold the server up.
-- Checked (HLEN, O(1)) only before a walk of a long list.
local function overlong(h)
  return h.kind == 'l' and h.b - h.a > 1000 and h.b - h.a > redis.call('HLEN', K)
end
local function write_header(n, h)
  local birth = (h.birth ~= '' and ' ' .. h.birth) or ''
  put(hfield(n), h.kind .. ' ' .. fmt(h.a) .. ' ' .. fmt(h.b) .. ' ' .. fmt(h.c) .. birth)
end
local function is_ref(p) return string.byte(p, 1) == REF end
-- A list item's dict stored whole: REF, its nid, '=', its msgpack map. It
-- has no fields of its own, so dropping it is dropping the field holding it.
local function is_whole(p) return string.find(p, '=', 2, true) ~= nil end
local function ref_nid(p) return string.match(p, '^.([^=]*)') end
-- What follows the '<seq>:' of a dict entry; '' for a corrupt one without it.
local function dict_payload(raw)
  local colon = string.find(raw, ':', 1, true)
  return colon and string.sub(raw, colon + 1) or ''
end

local ttl = tonumber(ARGV[7])
-- Sliding expiry: every write, even one that changes nothing, restarts the
-- clock of every key of the memory, in the same atomic step.
-- Keys after the first two are shared with other memories (a session's
-- participant set): their expiry is only ever extended, never shortened
-- (nor set on one that has none).
local function refresh_ttl()
  if ttl > 0 then
    redis.call('PEXPIRE', K, ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
    for i = 3, #KEYS do
      local left = redis.call('PTTL', KEYS[i])
      if left >= 0 and left < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
  end
end

-- The removal plan: for each container the op may remove, the change
-- count this client saw it at and (for a dict) its keys. A container
-- changed since is not removed: the client's copy of it, which a pop
-- returns, would be stale. A count of -1 asks the script to read the plan
-- from the hash itself (HGETALL, O(size)): for a client whose view keeps
-- losing the race against busy writers, or cannot decode what it removes.
local known, known_mod = {}, {}
local pos = 11
local nplan = tonumber(ARGV[10])
local drops_end = pos + math.max(nplan, 0)
if nplan < 0 then
  local all = redis.call('HGETALL', K)
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    cache[f] = v
    local tag = string.sub(f, 1, 1)
    if tag == 'h' then
      local n = string.sub(f, 2)
      known[n] = known[n] or {}
    elseif tag == 'e' then
      local c = string.find(f, ':', 2, true)
      if c then
        local n = string.sub(f, 2, c - 1)
        known[n] = known[n] or {}
        table.insert(known[n], string.sub(f, c + 1))
      end
    end
  end
  for n, keys in pairs(known) do
    if not cache['h' .. n] then
      known[n] = nil  -- entries of no node: nothing to drop
    else
      -- A header that does not parse or does not count its entries is
      -- corrupt: the node is removed as listed (see broken below).
      local h, bad = read_header(n)
      if bad or (h.kind ~= 'l' and #keys ~= h.a) then known_mod[n] = -1 else known_mod[n] = h.c end
    end
  end
end
while pos < drops_end do
  local dn, mod, cnt = ARGV[pos], tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
  local keys = {}
  for j = 1, cnt do keys[j] = ARGV[pos + 2 + j] end
  known[dn], known_mod[dn] = keys, mod
  pos = pos + 3 + cnt
end
local function arg()
  pos = pos + 1
  return ARGV[pos - 1]
end

-- A node whose header is corrupt (unparseable, or a count that is not
-- its dict's or set's number of entries) is removed as the client read it
-- from the server: change count -1 and the names of all its entry fields.
local function broken(n, h, bad)
  if known_mod[n] ~= -1 then return false end
  return bad or (h.kind ~= 'l' and #known[n] ~= h.a)
end
local function child_of(n, raw)
  if string.sub(hget(hfield(n)), 1, 1) == 'l' then return raw end
  return dict_payload(raw)
end

-- True when every dict node under payload p is fully listed in 'known',
-- so that drop(p) removes every field the subtree has.
-- Each node is checked and dropped once, and neither the root nor the node
-- being changed is ever followed into: only corrupt data references a node
-- twice or an ancestor, and it must stay removable.
local checked, dropped = {}, {}
local function can_drop(p, own)
  if not is_ref(p) or is_whole(p) then return true end
  local n = string.sub(p, 2)
  if checked[n] or (not own and (n == '0' or n == nid)) then return true end
  checked[n] = true
  local h, bad = read_header(n)
  if not h and not bad then return true end
  if h and overlong(h) then h, bad = nil, true end
  local keys = known[n]
  if broken(n, h, bad) then
    for _, k in ipairs(keys) do
      local raw = hget(efield(n, k))
      if not raw or not can_drop(child_of(n, raw)) then return false end
    end
    return true
  end
  if bad then return false end
  if not keys or known_mod[n] ~= h.c then return false end
  if h.kind == 'l' then
    for s = h.a, h.b - 1 do
      local raw = hget(efield(n, fmt(s)))
      if raw and not can_drop(raw) then return false end
    end
    return true
  end
  if #keys ~= h.a then return false end
  for _, k in ipairs(keys) do
    local raw = hget(efield(n, k))
    if not raw or not can_drop(dict_payload(raw)) then return false end
  end
  return true
end
local function drop(p)
  if not is_ref(p) or is_whole(p) then return end
  local n = string.sub(p, 2)
  if dropped[n] or n == '0' or n == nid then return end
  dropped[n] = true
  local h, bad = read_header(n)
  if not h and not bad then return end
  if h and overlong(h) then h, bad = nil, true end
  if broken(n, h, bad) then
    for _, k in ipairs(known[n]) do
      local f = efield(n, k)
      drop(child_of(n, hget(f))); hdel(f)
    end
  elseif h.kind == 'l' then
    for s = h.a, h.b - 1 do
      local f = efield(n, fmt(s))
      local raw = hget(f)
      if raw then drop(raw); hdel(f) end
    end
  else
    for _, k in ipairs(known[n]) do
      local f = efield(n, k)
      drop(dict_payload(hget(f)))
      hdel(f)
    end
  end
  hdel(hfield(n))
end

local first_nid = nil
-- Corrupt data met while applying is answered after the op: every write
-- waits for the end, so nothing is written then.
local damage, damage_why = nil, nil
local function damaged(field, why)
  if not damage then damage, damage_why = field, why end
end
-- What each kept child of a list replace held (a dict stored whole keeps its map).
local kept_raw = {}
local function build()
  local t = arg()
  if t == 's' then return arg() end
  if t == 'r' then
    local n = arg()
    return kept_raw[n] or (string.char(REF) .. n)
  end
  if not counter then damaged('c', 'not a node counter'); counter = 0 end
  counter = counter + 1
  first_nid = first_nid or counter
  local n = fmt(counter)
  -- An id in use means the counter went back (damaged): never merge into that node.
  if hget(hfield(n)) then damaged('c', 'node id ' .. n .. ' is in use') end
  if t == 'f' then return string.char(REF) .. n .. '=' .. arg() end
  local count = tonumber(arg())
  if t == 't' then
    for _ = 1, count do put(efield(n, arg()), '') end
    put(hfield(n), 's ' .. fmt(count) .. ' 0 0 ' .. token)
  elseif t == 'l' then
    for s = 0, count - 1 do put(efield(n, fmt(s)), build()) end
    put(hfield(n), 'l 0 ' .. fmt(count) .. ' 0 ' .. token)
  else
    local keys = {}
    for s = 1, count do keys[s] = arg() end
    for s = 1, count do put(efield(n, keys[s]), fmt(s) .. ':' .. build()) end
    put(hfield(n), 'd ' .. fmt(count) .. ' ' .. fmt(count + 1) .. ' 0 ' .. token)
  end
  return string.char(REF) .. n
end
local function move(n, from, to)
  local v = hget(efield(n, fmt(from)))
  if not v then damaged(efield(n, fmt(from)), 'missing list element'); return end
  hset(efield(n, fmt(to)), v)
end

local h, bad = read_header(nid)
if bad then return corrupt(hfield(nid), 'not a node header') end
if not h or (nid ~= '0' and h.birth ~= ARGV[9]) then return reply('gone') end
local want = string.sub(op, 1, 1)
if want ~= 'd' and want ~= 's' then want = 'l' end
if h.kind ~= want then return reply('gone') end
-- Where the item a client saw at 'slot' (stored as 'seen') is now: there,
-- or wherever others' inserts and deletes in the middle moved it (O(n),
-- rare); nil if the list no longer holds it. No 'seen': the slot as named.
-- Among equal items, the one nearest the slot named (others' inserts and
-- deletes move an item a slot or a few). A message stored whole that
-- others gave fields of its own since is the same node under its reference.
local function locate(slot, seen)
  local promoted = string.byte(seen, 1) == REF and string.match(seen, '^(.[^=]+)=') or nil
  local function holds(s)
    if seen == '' then return true end
    local v = hget(efield(nid, fmt(s)))
    return v == seen or (promoted ~= nil and v == promoted)
  end
  if slot >= h.a and slot < h.b and holds(slot) then return slot end
  if seen == '' or overlong(h) then return nil end
  for d = 1, h.b - h.a do
    if slot - d >= h.a and slot - d < h.b and holds(slot - d) then return slot - d end
    if slot + d >= h.a and slot + d < h.b and holds(slot + d) then return slot + d end
  end
  return nil
end
local extra = {}
-- What the change event says beyond the op: the dict keys it changed, or
-- the list index (at the time of the change) and the number of items.
local event_keys, event_index, event_count, event_trim = {}, '', '', ''

if op == 'dset' or op == 'dsetdefault' then
  local count = tonumber(arg())
  local keys = {}
  for i = 1, count do keys[i] = arg() end
  for i = 1, count do
    local raw = hget(efield(nid, keys[i]))
    if raw and op == 'dsetdefault' then
      -- What is there, and its birth if it is a node (for what was queued for the default).
      local p = dict_payload(raw)
      local there = is_ref(p) and read_header(string.sub(p, 2))
      return reply('exists', '', p, there and there.birth or '')
    end
    if raw and not can_drop(dict_payload(raw)) then return reply('stale') end
  end
  for i = 1, count do
    local f = efield(nid, keys[i])
    local raw = hget(f)
    local s
    if raw then
      -- A corrupt entry without its sequence number goes last.
      s = string.match(raw, '^(%%d+):')
      if not s then s = fmt(h.b); h.b = h.b + 1 end
      drop(dict_payload(raw))
    else
      s = fmt(h.b); h.b = h.b + 1; h.a = h.a + 1
    end
    local before = ntouched
    hset(f, s .. ':' .. build())
    -- Only keys whose entry changed are named in the change event.
    if ntouched > before then event_keys[#event_keys + 1] = keys[i] end
  end
elseif op == 'ddel' then
  local count = tonumber(arg())
  local keys = {}
  event_keys = keys
  for i = 1, count do
    keys[i] = arg()
    local raw = hget(efield(nid, keys[i]))
    if not raw then return reply('missing') end
    if not can_drop(dict_payload(raw)) then return reply('stale') end
  end
  for i = 1, count do
    local f = efield(nid, keys[i])
    local p = dict_payload(hget(f))
    extra[#extra + 1] = p
    drop(p); hdel(f); h.a = h.a - 1
  end
elseif op == 'dclear' then
  if not can_drop(string.char(REF) .. nid, true) then return reply('stale') end
  for _, k in ipairs(known[nid]) do
    local f = efield(nid, k)
    drop(dict_payload(hget(f))); hdel(f)
  end
  h.a = 0
elseif op == 'lappend' then
  local count, keep = tonumber(arg()), tonumber(arg())
  -- A bounded list keeps its newest 'keep' items: as many are dropped from
  -- the front as the append adds beyond that (the client sends no more than
  -- 'keep' values).
  local trim = 0
  if keep > 0 then trim = math.max(0, math.min(h.b - h.a, h.b - h.a + count - keep)) end
  for s = h.a, h.a + trim - 1 do
    if not can_drop(hget(efield(nid, fmt(s))) or '') then return reply('stale') end
  end
  for s = h.a, h.a + trim - 1 do
    local f = efield(nid, fmt(s))
    drop(hget(f) or ''); hdel(f)
  end
  h.a = h.a + trim
  event_index, event_count, event_trim = fmt(h.b - h.a), fmt(count), fmt(trim)
  for _ = 1, count do put(efield(nid, fmt(h.b)), build()); h.b = h.b + 1 end
elseif op == 'linsert' then
  -- 'front' and 'back' are the list's ends on the server, whatever the
  -- client saw; a number is a slot inside the list.
  local where, seen = arg(), arg()
  local slot = tonumber(where)
  if slot and seen ~= '' then
    -- Before the item the client saw there, wherever it is now; if it is
    -- gone, at the slot the client named: an insert is never lost.
    slot = locate(slot, seen) or slot
  end
  local target
  if where == 'front' or (slot and slot <= h.a) then
    h.a = h.a - 1; target = h.a
  elseif where == 'back' or slot >= h.b then
    target = h.b; h.b = h.b + 1
  elseif slot - h.a < h.b - slot then
    for s = h.a, slot - 1 do move(nid, s, s - 1) end
    h.a = h.a - 1; target = slot - 1
  else
    for s = h.b - 1, slot, -1 do move(nid, s, s + 1) end
    h.b = h.b + 1; target = slot
  end
  event_index, event_count = fmt(target - h.a), '1'
  put(efield(nid, fmt(target)), build())
elseif op == 'lset' or op == 'ldel' then
  local named, seen = tonumber(arg()), arg()
  local slot = locate(named, seen)
  if not slot then return reply(seen == '' and 'index' or 'missing') end
  event_index, event_count = fmt(slot - h.a), '1'
  local f = efield(nid, fmt(slot))
  local old = hget(f) or ''
  if not can_drop(old) then return reply('stale') end
  drop(old)
  extra[1] = old
  if op == 'lset' then
    hset(f, build())
  elseif slot - h.a < h.b - 1 - slot then
    for s = slot, h.a + 1, -1 do move(nid, s - 1, s) end
    hdel(efield(nid, fmt(h.a))); h.a = h.a + 1
  else
    for s = slot, h.b - 2 do move(nid, s + 1, s) end
    hdel(efield(nid, fmt(h.b - 1))); h.b = h.b - 1
  end
elseif op == 'lreplace' then
  if overlong(h) then return corrupt(hfield(nid), 'a list longer than the hash') end
  if tonumber(arg()) ~= h.c then return reply('stale') end
  local nkept = tonumber(arg())
  local kept, seen = {}, {}
  for _ = 1, nkept do kept[arg()] = true end
  local function kept_child(raw) return is_ref(raw) and kept[ref_nid(raw)] and ref_nid(raw) end
  for s = h.a, h.b - 1 do
    local raw = hget(efield(nid, fmt(s))) or ''
    local child = kept_child(raw)
    if child then seen[child] = true; kept_raw[child] = raw
    elseif not can_drop(raw) then return reply('stale') end
  end
  for child in pairs(kept) do
    if not seen[child] then return reply('stale') end
  end
  for s = h.a, h.b - 1 do
    local f = efield(nid, fmt(s))
    local raw = hget(f) or ''
    if not kept_child(raw) then drop(raw) end
    hdel(f)
  end
  local count = tonumber(arg())
  h.b = h.a
  for _ = 1, count do put(efield(nid, fmt(h.b)), build()); h.b = h.b + 1 end
elseif op == 'schange' then
  -- Set elements are fields with empty values, named by their encoded key.
  local mod, strict = tonumber(arg()), arg() == '1'
  if mod >= 0 and mod ~= h.c then return reply('stale') end
  local adds, removes = {}, {}
  for i = 1, tonumber(arg()) do adds[i] = arg() end
  for i = 1, tonumber(arg()) do removes[i] = arg() end
  if strict then
    for _, e in ipairs(removes) do
      if not hget(efield(nid, e)) then return reply('missing') end
    end
  end
  for _, e in ipairs(removes) do
    local f = efield(nid, e)
    if hget(f) then hdel(f); h.a = h.a - 1 end
  end
  for _, e in ipairs(adds) do
    local f = efield(nid, e)
    if not hget(f) then hset(f, ''); h.a = h.a + 1 end
  end
elseif op == 'promote' then
  -- The dict stored whole in this list (node x, seen at 'slot') gets a
  -- header and entries, as a dict node has, and the slot a plain reference.
  -- Nothing to do if it already has them; 'gone' if it is no longer here.
  -- A dict stored whole never changes, so the client names it by its id and
  -- its stored bytes: after a rollback the same id may be another message.
  local x, slot = arg(), tonumber(arg())
  local whole = string.char(REF) .. x .. '=' .. arg()
  if not read_header(x) then
    local function holds(s)
      return hget(efield(nid, fmt(s))) == whole
    end
    if slot < h.a or slot >= h.b or not holds(slot) then
      -- Others moved it since this client looked: O(n), and rare.
      if overlong(h) then return corrupt(hfield(nid), 'a list longer than the hash') end
      slot = nil
      for s = h.a, h.b - 1 do
        if holds(s) then slot = s; break end
      end
      if not slot then return reply('gone') end
    end
    hset(efield(nid, fmt(slot)), string.char(REF) .. x)
    local count = tonumber(arg())
    local keys = {}
    for i = 1, count do keys[i] = arg() end
    for i = 1, count do put(efield(x, keys[i]), fmt(i) .. ':' .. arg()) end
    put(hfield(x), 'd ' .. fmt(count) .. ' ' .. fmt(count + 1) .. ' 0 ' .. token)
  end
else
  return redis.error_reply('redis_memory: unknown operation ' .. op)
end
if damage then return corrupt(damage, damage_why) end

if ntouched == 0 then refresh_ttl(); return reply('same') end
-- A promotion changes how an item is stored, not what the list holds:
-- the list's change count (which a list replace checks) stays.
if op ~= 'promote' then
  h.c = h.c + 1
  write_header(nid, h)
end
version = version + 1
local entry
stamp_now = fmt(version) .. ' ' .. token
if ntouched > TOUCH_LIMIT then
  entry = stamp_now .. ' *'
else
  local parts = {stamp_now, ' '}
  for i = 1, ntouched do
    local f = touched[i]
    parts[#parts + 1] = fmt(#f) .. ':' .. f
  end
  entry = table.concat(parts)
end
local result = first_nid and fmt(first_nid) or ''
writes[#writes + 1] = 'v'
writes[#writes + 1] = stamp_now
writes[#writes + 1] = 'j' .. fmt(version %% JOURNAL_SIZE)
writes[#writes + 1] = entry
-- The writer index is touched once a minute per writer; each time, a few
-- writers silent for longer than the retention are forgotten.
-- Activity times, in ms: of this write, and of the one that created the memory.
local now_ms = fmt(now * 1000 + math.floor(tonumber(clock[2]) / 1000))
writes[#writes + 1] = 'ta'
writes[#writes + 1] = now_ms
if creating then
  writes[#writes + 1] = 'tc'
  writes[#writes + 1] = now_ms
end
if index_due then
  stamp = now
  local W = KEYS[2]
  redis.call('ZADD', W, now, writer)
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', W, '-inf', now - %(retention)d, 'LIMIT', 0, 16)) do
    redis.call('HDEL', K, 'w' .. old)
    redis.call('ZREM', W, old)
  end
end
writes[#writes + 1] = wfield
writes[#writes + 1] = fmt(seq) .. ' ' .. fmt(stamp) .. ' ' .. result
if first_nid or creating then
  writes[#writes + 1] = 'c'
  writes[#writes + 1] = fmt(counter)
end
if creating then
  writes[#writes + 1] = 'i'
  writes[#writes + 1] = incarnation
end
for _, f in ipairs(setlist) do
  if cache[f] then writes[#writes + 1] = f; writes[#writes + 1] = cache[f] end
end
flush_deletes()
for start = 1, #writes, 1000 do
  redis.call('HSET', K, unpack(writes, start, math.min(start + 999, #writes)))
end
refresh_ttl()
local author = ARGV[8]
local event = {
  fmt(version), now_ms, writer, op, nid, incarnation, event_index, event_count, event_trim,
  fmt(#author) .. ':' .. author
}
for _, k in ipairs(event_keys) do event[#event + 1] = fmt(#k) .. ':' .. k end
-- pcall: a user whose ACL forbids the channel still writes (without events).
redis.pcall('PUBLISH', K .. '%(feed)s', table.concat(event, ' '))
return reply('ok', result, unpack(extra))
""") % {
    "journal": JOURNAL_SIZE,
    "touch_limit": TOUCH_LIMIT,
    "index_every": _INDEX_EVERY,
    "retention": OP_ID_RETENTION,
    "feed": FEED_SUFFIX,
}

# Brings a replica from version ARGV[1] ('<count> <token>') of incarnation
# ARGV[2] to now: the current values of every field the journal says changed
# since, or 'full' when the journal no longer covers the gap or does not hold
# that version (the server was rolled back): then the caller reads it all.
# A journal entry is '<count> <token> ' then the fields, or '*' for too many;
# one that does not parse is answered 'full' too.
_SYNC = (_PRELUDE + """
local meta = redis.call('HMGET', K, 'v', 'i')
local v, inc = meta[1] or '', meta[2]
if not inc then
  -- Fields without an incarnation: the caller's full read reports them.
  if redis.call('EXISTS', K) == 1 then return {v, '', 'full'} end
  return {'0', '', 'empty'}
end
local known = tonumber(string.match(ARGV[1], '^%%d+') or '')
local current = tonumber(string.match(v, '^%%d+') or '')
if inc ~= ARGV[2] or not known or not current or current < known or current - known >= JOURNAL_SIZE then
  return {v, inc, 'full'}
end
if known > 0 then
  local e = hget('j' .. fmt(known %% JOURNAL_SIZE)) or ''
  if string.sub(e, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then return {v, inc, 'full'} end
end
local fields, seen = {}, {}
for n = known + 1, current do
  local e = hget('j' .. fmt(n %% JOURNAL_SIZE))
  local num, tok
  if e then num, tok = string.match(e, '^(%%d+) (%%S+) ') end
  if num ~= fmt(n) then return {v, inc, 'full'} end
  local p = #num + #tok + 3
  if string.sub(e, p) == '*' then return {v, inc, 'full'} end
  while p <= #e do
    local len = string.match(e, '^%%d+', p)
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
""") % {"journal": JOURNAL_SIZE, "touch_limit": TOUCH_LIMIT}


# Deletes a memory's keys (KEYS) and, if there was anything, publishes a
# 'clear' of the whole memory on its change channel (ARGV: author).
_DELETE = (
    """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- Only if idle: none of the first ARGV[3] keys (memory hashes) changed in
-- the last ARGV[2] ms, by the server's clock, checked in the same atomic
-- step as the delete (a write landing after a listing keeps its memory).
local idle = tonumber(ARGV[2] or '')
if idle then
  for i = 1, tonumber(ARGV[3]) do
    local active = tonumber(redis.call('HGET', KEYS[i], 'ta') or '')
    if active and now - active < idle then return -1 end
  end
end
-- Only if the participants are those the client listed (ARGV[4], when
-- given): an agent that joined since would be left out of the delete.
if ARGV[4] and ARGV[4] ~= '' and redis.call('SCARD', KEYS[#KEYS]) ~= tonumber(ARGV[4]) then return -2 end
local deleted = 0
for start = 1, #KEYS, 1000 do
  deleted = deleted + redis.call('DEL', unpack(KEYS, start, math.min(start + 999, #KEYS)))
end
if deleted > 0 then
  local now_ms = string.format('%d', now)
  local author = string.format('%d', #ARGV[1]) .. ':' .. ARGV[1]
  local event = {'0', now_ms, '', 'dclear', '0', '', '', '', '', author}
  redis.pcall('PUBLISH', KEYS[1] .. '"""
    + FEED_SUFFIX
    + """', table.concat(event, ' '))
end
return deleted
"""
)


def version_number(stamp: bytes) -> int:
    """The change count of a version stamp (``<count> <token>``, see the apply script); 0 for none.

    ValueError if ``stamp`` is not one (``int`` alone would take ``-3``, ``+3`` or ``1_0``).
    """
    count = stamp.partition(b" ")[0]
    if stamp and not count.isdigit():
        raise ValueError(f"not a version stamp: {stamp[:40]!r}")
    return int(count or b"0")


def send(link: Channel, key: str, packed: bytes, replies: int = 1) -> Any:
    """Send one command about ``key`` (in RESP form) on ``link``; redis-py's errors become the library's.

    Unreachable: ConnectionFailed; ``key`` of another type: CorruptData;
    any other refusal: ServerRefused. Each names ``key``. With ``replies``
    more than 1, ``packed`` holds that many commands: the list of replies.
    """
    try:
        return link.call_packed(packed, key, replies)
    except ConnectionFailed as exc:
        raise ConnectionFailed(f"{exc} (key {key})", key=key) from exc.__cause__
    except redis.exceptions.NoScriptError:
        raise  # the caller loads the script and sends it again
    except redis.ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            message = f"{key} holds another kind of Redis value than redis_memory keeps there: {exc}"
            raise CorruptData(message, key=key) from exc
        raise ServerRefused(f"Redis refused a command on {key}: {exc}", key=key) from exc


def command(link: Channel, key: str, *args: bytes | str | int) -> Any:
    """Send one command about ``key`` (see :func:`send`)."""
    return send(link, key, resp_command(args))


@dataclass
class Reply:
    """What the apply script answered: a status, the version stamps after and before it, and data."""

    status: str
    stamp: bytes
    incarnation: bytes
    first_nid: int | None
    before: bytes
    extra: list[bytes]


@dataclass
class Sync:
    """What the sync script answered: ``kind`` is 'empty', 'delta' or 'full'."""

    stamp: bytes
    incarnation: bytes
    kind: str
    changes: list[tuple[bytes, bytes | None]]


class Store:
    """All Redis traffic of one memory: its key, its scripts, its reads."""

    def __init__(self, client: Client, key: str, companions: tuple[str, ...] = ()) -> None:
        self.client = client
        self.key = key
        self.writers_key = key + ":w"
        #: The keys this memory owns: deleted with it.
        self.keys = (key, self.writers_key)
        #: Keys that also get the memory's expiry, but outlive its deletion.
        self.companions = companions
        self.feed = key + FEED_SUFFIX
        self.channel = channel(client)
        #: The start of each script's EVALSHA command, by script and keys.
        self._heads: dict[tuple[str, tuple[str, ...]], bytes] = {}
        self._shas: dict[str, str] = {}
        self._version_command = resp_command(("HMGET", key, "v", "i"))
        #: Replicas each write waits for, and for how long (ms): WAIT after the apply script.
        self.replicas = (0, 0)

    def _call(self, *args: Any) -> Any:
        return self._call_packed(resp_command(args))

    def _call_packed(self, packed: bytes) -> Any:
        return send(self.channel, self.key, packed)

    def _script(
        self, source: str, keys: tuple[str, ...], args: list[bytes], tail: Args = (b"", 0), after: bytes = b""
    ) -> Any:
        head = self._heads.get((source, keys))
        if head is None:
            sha = self._shas.get(source) or self._call("SCRIPT", "LOAD", source).decode()
            self._shas[source] = sha
            command = resp_command(("EVALSHA", sha, len(keys), *keys))
            head = self._heads[(source, keys)] = command[command.index(b"\r\n") + 2 :]  # without its count
        # ``after``: another command in the same round trip; then both replies.
        packed = resp_command(args, head, 3 + len(keys), *tail) + after
        replies = 2 if after else 1
        try:
            return send(self.channel, self.key, packed, replies)
        except redis.exceptions.NoScriptError:
            # The server restarted, failed over, or its script cache was flushed.
            self._call("SCRIPT", "LOAD", source)
            return send(self.channel, self.key, packed, replies)

    def apply(self, header: list[bytes], drops: Plan | None, op_args: Args) -> Reply:
        """EVALSHA of the apply script: O(1) fields for item operations.

        ``drops`` gives, for every container the operation may remove, the
        change count it was seen at and its keys (for a dict), so the script
        can delete whole subtrees without scanning the hash, and refuses to
        remove one changed since. None lets the script read them from the
        hash itself: O(size of the memory), and never stale.
        """
        plan: list[bytes] = []
        for nid, (mod, keys) in (drops or {}).items():
            plan += [nid, b"%d" % mod, b"%d" % len(keys), *keys]
        count = b"-1" if drops is None else b"%d" % len(plan)
        replicas, timeout_ms = self.replicas
        script_keys, args = self.keys + self.companions, [*header, count, *plan]
        if not replicas:
            raw = self._script(_APPLY, script_keys, args, op_args)
        else:
            wait = resp_command(("WAIT", replicas, timeout_ms))
            raw, acknowledged = self._script(_APPLY, script_keys, args, op_args, wait)
            if raw[0] in (b"ok", b"dup") and int(acknowledged) < replicas:
                message = (
                    f"{acknowledged} of the {replicas} replicas asked for confirmed a write to {self.key} within"
                    f" {timeout_ms} ms: it is kept queued until they do"
                )
                raise NotReplicated(message, key=self.key)
        return Reply(raw[0].decode(), raw[1], raw[2], int(raw[3]) if raw[3] else None, raw[4], list(raw[5:]))

    def version(self) -> tuple[bytes, bytes]:
        """HMGET of the version stamp and incarnation: the O(1) freshness check."""
        v, inc = self._call_packed(self._version_command)
        return (v or b""), (inc or b"")

    def sync(self, stamp: bytes, incarnation: bytes) -> Sync:
        """EVALSHA of the sync script: O(fields changed since version ``stamp``)."""
        raw = self._script(_SYNC, self.keys[:1], [stamp or b"0", incarnation])
        it = iter(raw[3:])
        return Sync(raw[0] or b"", raw[1], raw[2].decode(), list(zip(it, it, strict=False)))

    def read_all(self) -> dict[bytes, bytes]:
        """HGETALL: O(size of the memory)."""
        reply = self._call("HGETALL", self.key)
        if isinstance(reply, list):  # RESP2 answers a flat list
            it = iter(reply)
            return dict(zip(it, it, strict=False))
        return cast(dict[bytes, bytes], reply)

    def delete(
        self,
        author: bytes = b"",
        idle_ms: int | None = None,
        keys: tuple[str, ...] = (),
        hashes: int = 1,
        participants: tuple[str, int] | None = None,
    ) -> int:
        """DEL of the memory's keys (and ``keys``): O(size); if it existed, a ``clear`` on the change feed.

        With ``idle_ms``, only if none of the first ``hashes`` keys changed in
        that long (server time): -1 if one did. With ``participants`` (a set's
        key and size), only if that set (deleted too) still has that many
        members: -2 if not. Nothing is deleted then; else the keys deleted.
        """
        idle = b"" if idle_ms is None else b"%d" % idle_ms
        all_keys = (*self.keys[:1], *keys, *self.keys[1:])
        count = b""
        if participants is not None:
            all_keys, count = (*all_keys, participants[0]), b"%d" % participants[1]
        return int(self._script(_DELETE, all_keys, [author, idle, b"%d" % hashes, count]))

    def expire(self, milliseconds: int | None) -> None:
        """PEXPIRE (or PERSIST, for None) of each of the memory's keys: O(1).

        A companion's expiry is only extended (or removed), never shortened:
        other memories may outlive this one.
        """
        for key in self.keys:
            if milliseconds is None:
                self._call("PERSIST", key)
            else:
                self._call("PEXPIRE", key, milliseconds)
        for key in self.companions:
            if milliseconds is None:
                self._call("PERSIST", key)
            elif 0 <= int(self._call("PTTL", key)) < milliseconds:
                self._call("PEXPIRE", key, milliseconds)

    def activity(self) -> tuple[int | None, int | None]:
        """HMGET of the creation and last-change times (ms since the epoch): O(1)."""
        created, active = self._call("HMGET", self.key, "tc", "ta")
        return self._time(b"tc", created), self._time(b"ta", active)

    def _time(self, field: bytes, raw: bytes | None) -> int | None:
        if raw is None:
            return None
        if not raw.isdigit():
            message = f"corrupt data in {self.key} field {field!r}: not a time: {raw[:40]!r}"
            raise CorruptData(message, key=self.key, field=field)
        return int(raw)

    def size(self) -> tuple[int, int]:
        """MEMORY USAGE of the memory's keys (else their stored bytes), and HLEN: O(size) at most."""
        fields = int(self._call("HLEN", self.key))
        try:
            used = sum(int(self._call("MEMORY", "USAGE", key, "SAMPLES", "0") or 0) for key in self.keys)
        except ServerRefused:  # fakeredis has no MEMORY command
            stored = self.read_all()
            used = sum(len(f) + len(v) for f, v in stored.items())
        return used, fields

    def remaining(self) -> int:
        """PTTL of the hash: milliseconds left, -1 without expiry, -2 if it does not exist."""
        return int(self._call("PTTL", self.key))

    def ping(self) -> None:
        """PING: raises ConnectionFailed unless the server answers."""
        self._call("PING")
