--[[
apply: applies operations to a memory, in order and atomically: one or a
batch of them, all or none (every check runs before the first write; a
script is not rolled back).

KEYS[1]  the memory's hash
KEYS[2]  its writer index (a sorted set of writers by last write)
KEYS[3+] keys that share the memory's expiry (a session's participant set)

ARGV[1]  writer id
ARGV[2]  expected incarnation ('*' for any)
ARGV[3]  expiry in ms (0: none)
ARGV[4]  author (may be empty)
ARGV[5]  the command that publishes the changes: PUBLISH, or SPUBLISH on a
         Redis Cluster (sharded pub/sub: the message stays in the shard
         that holds the memory, instead of reaching every node)
ARGV[6]  the number of operations; then, for each:
  seq      its number for this writer, one more than the one before (a
           call whose first seq was applied already answers 'dup')
  token    unique to it: the birth of the nodes it creates, the version's
           token if it is the last, the incarnation if it creates the memory
  name     see the handlers below and ops.py
  nid      the node it changes ('0' is the root dict)
  birth    the birth of node nid as the client knows it (checked unless '0')
  created  a count, then the ids the client gave the nodes it creates, in the
           order it creates them: later operations of the call may name them
           (provisional ids, see queue.py), and get the ids the server gave
  plan     the number of arguments that follow for the removal plan, or -1
           for the script to read the plan from the hash itself (O(size));
           per node the op may remove: nid, change count, key count, keys
           (change count -1 for a node whose header is corrupt, with all its
           entry fields)
  args     how many arguments of its own follow, then those (see ops.py)
then, for a single operation, optionally: the version stamp of the caller's
replica ('' for none), and for an append of one item or a scalar set of
one key, what it writes as the caller's view says (see lean_append and
lean_set: used only if that view is the server's).


Replies: {status, version stamp after, incarnation, result, version stamp
before, '1' if the call modified the hash (else ''), then for a single
operation: what changed since the caller's version (the sync function's
reply, see sync.lua) if it applied after others' changes, else ''; for a
batch: the number of the operation refused ('' if none) and per-operation
results; then what a delete removed...}. Called as apply_tracked (by a
tracked connection, see tracking.py), a call reads the hash last, so the
server tracks it still for that connection, which gets exactly one
invalidation of it after this reply if the call modified it. Status: ok,
same (nothing to change),
dup, gone (memory or node replaced), stale (what it removes changed),
missing, index, exists (setdefault), or corrupt with the key, the field (''
for a key of another type) and why: malformed stored data, met before
anything is written. Result: the id of the first node the call created ('').
Per-operation results, for a batch: one word per operation, the id of the
first node it created, '-' for none, '=' if it changed nothing, 'x' for a
setdefault that found its key (which the rest of the batch goes on
without), or 'd' for one this writer had applied already. Only a single operation
answers what its delete removed.

An applied call publishes its changes on the memory's change channel, one
line per operation (see feed.py for a line).
]]
-- @include fields
-- @include changes

local A, pos                           -- ARGV, and the cursor of arg()
local writer, seq, token, nid, op      -- the call's writer; the operation being applied
local incarnation, version, counter, creating
local before, stamp_now
local h                                -- the header of node nid
local known, known_mod                 -- the removal plan
local checked, dropped                 -- nodes can_drop/drop have seen
local first_nid, op_first, damage, damage_why
local realid                           -- client's id of a node created in this call -> the server's
local known_as                         -- node -> the birth the client knows it by (it thought it made or
                                       -- promoted it in this call, but another writer had)
local created_ids, created_pos         -- the ids the client gave the operation's new nodes
local headers, dirty                   -- parsed headers by nid; the nids whose header changed, in order
local kept_raw                         -- what each kept child of a list replace held
local extra                            -- what a delete removed
-- What the change event says beyond the op: the dict keys it changed, or
-- the list index (at the time of the change) and the number of items.
local event_keys, event_index, event_count, event_trim

local function arg()
  pos = pos + 1
  return A[pos - 1]
end

-- The server's id of node n (n itself unless created earlier in this call).
local function mapped(n) return realid[n] or n end

local nops                             -- how many operations the call carries
local delta                            -- for the caller behind others' changes: what changed since its version
-- A single operation's reply has no 'refused' and 'per-operation' slots.
local function reply(status, result, failed, per_op, ...)
  local changed = wrote and '1' or ''
  if nops == 1 then return {status, stamp_now, incarnation or '', result or '', before, changed, delta, ...} end
  return {status, stamp_now, incarnation or '', result or '', before, changed, failed or '', per_op or '', ...}
end

-- Malformed stored data is answered with the key and field, for the client
-- to raise CorruptData; never met by a Lua error.
local function corrupt(field, why, key)
  return reply('corrupt', '', '', '', key or K, field, why)
end

-- Corrupt data met while applying is answered after the op: every write
-- waits for the end, so nothing is written then.
local function damaged(field, why)
  if not damage then damage, damage_why = field, why end
end

-- Whether a count of a header is one this code keeps exact: at most 15
-- digits (a Lua number holds integers exactly up to 2^53; past it, counts
-- would merge slots and loops would not end).
local function counts_fit(n) return n > -1e15 and n < 1e15 end

-- The header of node n, or nil if there is none; nil and true if it is
-- corrupt (the same rule as store.parse_header's). A node's birth is the token of
-- the operation that created it: after a rollback the same id may name
-- another node, of another birth. The root's header has none.
local function read_header(n)
  local raw = hget(hfield(n))
  if not raw and creating and n == '0' then raw = 'd 0 1 0' end
  if not raw then return nil end
  -- Parsed once per call: operations change the table, written back once at the end.
  if headers[n] then return headers[n] end
  local kind, a, b, c, rest = string.match(raw, '^([lds]) (%-?%d+) (%-?%d+) (%-?%d+)(.*)$')
  local birth = ''
  if kind and rest ~= '' then
    birth = string.match(rest, '^ (%S*)$')
    if not birth then kind = nil end
  end
  if not kind then return nil, true end
  a, b, c = tonumber(a), tonumber(b), tonumber(c)
  if not (counts_fit(a) and counts_fit(b) and counts_fit(c)) or (kind == 'l' and b < a) then return nil, true end
  headers[n] = {kind = kind, a = a, b = b, c = c, birth = birth}
  return headers[n]
end

-- Node n's header (the table read_header gave) changed: written at the end.
local function header_changed(n)
  if not dirty[n] then dirty[n] = true; dirty[#dirty + 1] = n end
end

local function write_headers()
  for _, n in ipairs(dirty) do
    local f, hd = hfield(n), headers[n]
    -- Not for a node a later operation of the call removed.
    if hget(f) or (creating and n == '0') then
      local birth = hd.birth ~= '' and ' ' or ''
      hset(f, string.format('%s %d %d %d', hd.kind, hd.a, hd.b, hd.c) .. birth .. hd.birth)
    end
  end
end

-- A list cannot hold more slots than the hash has fields: a header that
-- claims so is corrupt, and walking its range would hold the server up.
-- Checked (HLEN, O(1)) only before a walk of a long list.
local function overlong(hd)
  -- (with the fields this call is about to write, which may make a list long)
  return hd.kind == 'l' and hd.b - hd.a > 1000 and hd.b - hd.a > redis.call('HLEN', K) + #setlist
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

-- The removal plan: for each container the op may remove, the change count
-- this client saw it at and (for a dict) its keys. A container changed
-- since is not removed: the client's copy of it, which a pop returns, would
-- be stale. A count of -1 asks the script to read the plan from the hash
-- itself (HGETALL, O(size)): for a client whose view keeps losing the race
-- against busy writers, or cannot decode what it removes.
local NO_PLAN = {}  -- shared by operations with an empty plan: never written
local NONE = {}     -- shared, never written: no ids given, no ids mapped (a single operation)
local function read_plan()
  local nplan = tonumber(arg())
  if nplan == 0 then known, known_mod = NO_PLAN, NO_PLAN; return end
  known, known_mod = {}, {}
  if nplan < 0 then
    -- The hash as this call left it so far: what earlier operations of the
    -- call wrote or deleted (in the cache) over what Redis holds.
    local all, fields, listed = redis.call('HGETALL', K), {}, {}
    for i = 1, #all, 2 do
      local f = all[i]
      if cache[f] == nil then cache[f] = all[i + 1] end
      listed[f] = true
      fields[#fields + 1] = f
    end
    for _, f in ipairs(setlist) do
      if not listed[f] then fields[#fields + 1] = f end
    end
    for _, f in ipairs(fields) do
      local tag = cache[f] and string.sub(f, 1, 1)
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
        local hd, bad = read_header(n)
        if bad or (hd.kind ~= 'l' and #keys ~= hd.a) then known_mod[n] = -1 else known_mod[n] = hd.c end
      end
    end
    return
  end
  local drops_end = pos + nplan
  while pos < drops_end do
    local dn, mod, cnt = mapped(A[pos]), tonumber(A[pos + 1]), tonumber(A[pos + 2])
    local keys = {}
    for j = 1, cnt do keys[j] = A[pos + 2 + j] end
    known[dn], known_mod[dn] = keys, mod
    pos = pos + 3 + cnt
  end
end

-- A node whose header is corrupt (unparseable, or a count that is not its
-- dict's or set's number of entries) is removed as the client read it from
-- the server: change count -1 and the names of all its entry fields.
local function broken(n, hd, bad)
  if known_mod[n] ~= -1 then return false end
  return bad or (hd.kind ~= 'l' and #known[n] ~= hd.a)
end

local function child_of(n, raw)
  if string.sub(hget(hfield(n)), 1, 1) == 'l' then return raw end
  return dict_payload(raw)
end

-- True when every dict node under payload p is fully listed in 'known', so
-- that drop(p) removes every field the subtree has. Each node is checked
-- and dropped once, and neither the root nor the node being changed is ever
-- followed into: only corrupt data references a node twice or an ancestor,
-- and it must stay removable.
local function can_drop(p, own)
  if not is_ref(p) or is_whole(p) then return true end
  local n = string.sub(p, 2)
  checked = checked or {}
  if checked[n] or (not own and (n == '0' or n == nid)) then return true end
  checked[n] = true
  local hd, bad = read_header(n)
  if not hd and not bad then return true end
  if hd and overlong(hd) then hd, bad = nil, true end
  local keys = known[n]
  if broken(n, hd, bad) then
    for _, k in ipairs(keys) do
      local raw = hget(efield(n, k))
      if not raw or not can_drop(child_of(n, raw)) then return false end
    end
    return true
  end
  if bad then return false end
  if not keys or known_mod[n] ~= hd.c then return false end
  if hd.kind == 'l' then
    for s = hd.a, hd.b - 1 do
      local raw = hget(efield(n, fmt(s)))
      if raw and not can_drop(raw) then return false end
    end
    return true
  end
  if #keys ~= hd.a then return false end
  for _, k in ipairs(keys) do
    local raw = hget(efield(n, k))
    if not raw or not can_drop(dict_payload(raw)) then return false end
  end
  return true
end

local function drop(p)
  if not is_ref(p) or is_whole(p) then return end
  local n = string.sub(p, 2)
  dropped = dropped or {}
  if dropped[n] or n == '0' or n == nid then return end
  dropped[n] = true
  local hd, bad = read_header(n)
  if not hd and not bad then return end
  if hd and overlong(hd) then hd, bad = nil, true end
  if broken(n, hd, bad) then
    for _, k in ipairs(known[n]) do
      local f = efield(n, k)
      drop(child_of(n, hget(f))); hdel(f)
    end
  elseif hd.kind == 'l' then
    for s = hd.a, hd.b - 1 do
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

-- The value the next arguments describe (see the token grammar in ops.py):
-- a scalar's bytes, or a reference to the node it creates.
local function build()
  local t = arg()
  if t == 's' then return arg() end
  if t == 'r' then
    local n = mapped(arg())
    return (kept_raw and kept_raw[n]) or (string.char(REF) .. n)
  end
  if not counter then damaged('c', 'not a node counter'); counter = 0 end
  counter = counter + 1
  first_nid = first_nid or counter
  op_first = op_first or counter
  local n = fmt(counter)
  created_pos = created_pos + 1
  if created_ids[created_pos] then
    if realid == NONE then realid = {} end
    realid[created_ids[created_pos]] = n
  end
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

local function move(from, to)
  local v = hget(efield(nid, fmt(from)))
  if not v then damaged(efield(nid, fmt(from)), 'missing list element'); return end
  hset(efield(nid, fmt(to)), v)
end

-- Where the item a client saw at 'slot' (stored as 'seen') is now: there,
-- or wherever others' inserts and deletes in the middle moved it (O(n),
-- rare); nil if the list no longer holds it. No 'seen': the slot as named.
-- Among equal items, the one nearest the slot named (others' inserts and
-- deletes move an item a slot or a few). A message stored whole that others
-- gave fields of its own since is the same node under its reference.
local function locate(slot, seen)
  -- An item made earlier in this call is named by the client's id.
  if string.byte(seen, 1) == REF then
    local n, rest = string.match(seen, '^.([^=]*)(.*)$')
    if realid[n] then seen = string.char(REF) .. realid[n] .. rest end
  end
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

-- (Strings that may hold any byte are joined with '..': this Lua's
-- string.format('%s') stops at a zero byte.)

-- The operations. Each checks what it depends on and returns a reply to
-- refuse, or nothing once it has made its changes (in the cache).
local OPS = {}

local function dict_set(setdefault)
  local count = tonumber(arg())
  local keys = {}
  for i = 1, count do keys[i] = arg() end
  for i = 1, count do
    local raw = hget(efield(nid, keys[i]))
    if raw and setdefault then
      -- What is there, and its birth if it is a node (for what was queued for the default).
      local p = dict_payload(raw)
      local there = is_ref(p) and read_header(string.sub(p, 2))
      if there and created_ids[1] and nops > 1 then
        -- The container the client made for the default (the first it
        -- created) is this one for the rest of the call.
        realid[created_ids[1]] = string.sub(p, 2)
        known_as[string.sub(p, 2)] = token
      end
      return reply('exists', '', '', '', p, there and there.birth or '')
    end
    if raw and not can_drop(dict_payload(raw)) then return reply('stale') end
  end
  for i = 1, count do
    local f = efield(nid, keys[i])
    local raw = hget(f)
    local s
    if raw then
      -- A corrupt entry without its sequence number goes last.
      s = string.match(raw, '^(%d+):')
      if not s then s = fmt(h.b); h.b = h.b + 1 end
      drop(dict_payload(raw))
    else
      s = fmt(h.b); h.b = h.b + 1; h.a = h.a + 1
    end
    local was = changes
    hset(f, s .. ':' .. build())
    -- Only keys whose entry changed are named in the change event.
    if changes > was then
      event_keys = event_keys or {}
      event_keys[#event_keys + 1] = keys[i]
    end
  end
end
OPS.dset = function() return dict_set(false) end
OPS.dsetdefault = function() return dict_set(true) end

OPS.ddel = function()
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
    extra = extra or {}
    extra[#extra + 1] = p
    drop(p); hdel(f); h.a = h.a - 1
  end
end

OPS.dclear = function()
  if not can_drop(string.char(REF) .. nid, true) then return reply('stale') end
  for _, k in ipairs(known[nid]) do
    local f = efield(nid, k)
    drop(dict_payload(hget(f))); hdel(f)
  end
  h.a = 0
end

OPS.lappend = function()
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
end

OPS.linsert = function()
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
    for s = h.a, slot - 1 do move(s, s - 1) end
    h.a = h.a - 1; target = slot - 1
  else
    for s = h.b - 1, slot, -1 do move(s, s + 1) end
    h.b = h.b + 1; target = slot
  end
  event_index, event_count = fmt(target - h.a), '1'
  put(efield(nid, fmt(target)), build())
end

local function list_set_or_delete(deleting)
  local named, seen = tonumber(arg()), arg()
  local slot = locate(named, seen)
  if not slot then return reply(seen == '' and 'index' or 'missing') end
  event_index, event_count = fmt(slot - h.a), '1'
  local f = efield(nid, fmt(slot))
  local old = hget(f) or ''
  if not can_drop(old) then return reply('stale') end
  drop(old)
  extra = {old}
  if not deleting then
    hset(f, build())
  elseif slot - h.a < h.b - 1 - slot then
    for s = slot, h.a + 1, -1 do move(s - 1, s) end
    hdel(efield(nid, fmt(h.a))); h.a = h.a + 1
  else
    for s = slot, h.b - 2 do move(s + 1, s) end
    hdel(efield(nid, fmt(h.b - 1))); h.b = h.b - 1
  end
end
OPS.lset = function() return list_set_or_delete(false) end
OPS.ldel = function() return list_set_or_delete(true) end

OPS.lreplace = function()
  if overlong(h) then return corrupt(hfield(nid), 'a list longer than the hash') end
  if tonumber(arg()) ~= h.c then return reply('stale') end
  local nkept = tonumber(arg())
  local kept, seen = {}, {}
  kept_raw = {}
  for _ = 1, nkept do kept[mapped(arg())] = true end
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
end

OPS.schange = function()
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
end

OPS.promote = function()
  -- The dict stored whole in this list (node x, seen at 'slot') gets a
  -- header and entries, as a dict node has, and the slot a plain reference.
  -- Nothing to do if it already has them; 'gone' if it is no longer here.
  -- A dict stored whole never changes, so the client names it by its id and
  -- its stored bytes: after a rollback the same id may be another message.
  local x, slot = mapped(arg()), tonumber(arg())
  local whole = string.char(REF) .. x .. '=' .. arg()
  if read_header(x) then
    -- Another writer promoted it first: the client, which promoted it here,
    -- knows it by this operation's token; later operations of the call on it
    -- mean the node there.
    if nops > 1 then known_as[x] = token end
    return
  end
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

-- Sliding expiry: every write, even one that changes nothing, restarts the
-- clock of every key of the memory, in the same atomic step. Keys after the
-- first two are shared with other memories (a session's participant set):
-- their expiry is only ever extended, never shortened (nor set on one that
-- has none).
local function refresh_ttl(keys, ttl)
  if ttl > 0 then
    if redis.call('PEXPIRE', keys[1], ttl) == 1 then wrote = true end
    redis.call('PEXPIRE', keys[2], ttl)
    for i = 3, #keys do
      local left = redis.call('PTTL', keys[i])
      if left >= 0 and left < ttl then redis.call('PEXPIRE', keys[i], ttl) end
    end
  end
end

-- The bookkeeping every applied call writes, in one format for the general
-- path and the fast ones below.
-- The journal entry: the stamp, then '<length>:<field>' for each field
-- changed, or '*' for more than TOUCH_LIMIT of them.
local function journal_entry(stamp, fields, count)
  if count > TOUCH_LIMIT then return stamp .. ' *' end
  local parts = {stamp, ' '}
  for i = 1, count do
    local f = fields[i]
    parts[#parts + 1] = #f
    parts[#parts + 1] = ':'
    parts[#parts + 1] = f
  end
  return table.concat(parts)
end

-- The server's clock in ms, as the activity times hold it.
local function clock_ms(clock)
  return string.format('%s%03d', clock[1], math.floor(tonumber(clock[2]) / 1000))
end

-- What a change event says of one operation (see feed.py): the writer, the
-- op, its node, the incarnation, then the list index, item count and trim.
local function event_of(name, n, index, count, trim)
  return table.concat({writer, name, n, incarnation, index, count, trim}, ' ')
end

-- pcall: a user whose ACL forbids the channel still writes (without events).
local function publish(command, lines)
  redis.pcall(command == 'SPUBLISH' and 'SPUBLISH' or 'PUBLISH', K .. '@FEED_SUFFIX@', lines)
end

-- The checks and the change of the operation whose own arguments start
-- at pos: nothing and its result ('=' if it changed nothing), or a reply
-- refusing it.
local function run_op(birth, events)
  local bad
  h, bad = read_header(nid)
  if bad then return corrupt(hfield(nid), 'not a node header') end
  if not h or (nid ~= '0' and h.birth ~= birth and known_as[nid] ~= birth) then return reply('gone') end
  local want = string.sub(op, 1, 1)
  if want ~= 'd' and want ~= 's' then want = 'l' end
  if h.kind ~= want then return reply('gone') end
  local handler = OPS[op]
  if not handler then return redis.error_reply('redis_memory: unknown operation ' .. op) end
  local was = changes
  local refused = handler()
  if refused then return refused end
  if changes == was then
    -- In a batch the client counted this one as a change of its node, as
    -- it counts every operation it made: so does the server.
    if nops > 1 and op ~= 'promote' then
      h.c = h.c + 1
      header_changed(nid)
    end
    return nil, '='
  end
  -- A promotion changes how an item is stored, not what the list holds:
  -- the list's change count (which a list replace checks) stays.
  if op ~= 'promote' then
    h.c = h.c + 1
    header_changed(nid)
  end
  local keys = ''
  if event_keys then
    local parts = {''}
    for _, k in ipairs(event_keys) do parts[#parts + 1] = #k .. ':' .. k end
    keys = table.concat(parts, ' ')
  end
  events[#events + 1] = event_of(op, nid, event_index, event_count, event_trim)
  events[#events + 1] = keys
  return nil, op_first and fmt(op_first) or '-'
end

-- Applies the next operation of the call: nothing and its result, or a
-- reply refusing it. Its arguments are skipped whatever it read of them.
-- One this writer already applied (a batch replayed after a part of it
-- landed) is skipped: 'd'.
local function apply_one(events, applied)
  seq, token, op, nid = tonumber(arg()), arg(), arg(), arg()
  local birth = arg()
  local ncreated = tonumber(arg())
  created_ids, created_pos = NONE, 0
  if ncreated > 0 then
    created_ids = {}
    for i = 1, ncreated do created_ids[i] = arg() end
  end
  nid = mapped(nid)
  checked, dropped, kept_raw, extra = nil, nil, nil, nil
  event_keys, event_index, event_count, event_trim = nil, '', '', ''
  op_first = nil
  read_plan()
  local args_end = pos + 1 + tonumber(arg())
  local refused, result = nil, 'd'
  if seq > applied then refused, result = run_op(birth, events) end
  pos = args_end
  return refused, result
end

-- Fast paths: the commonest single operations (an append of scalars and
-- dicts stored whole that trims nothing, and a scalar set of one key of a
-- dict: the root or a nested one),
-- run before any of the general path's state is set up: none of its
-- caches, plans, tables or walks, and as few string operations as the
-- bookkeeping allows (each costs about as much as a Redis command here).
-- Numbers are written with fmt (%d), as the general path writes them (never
-- as Lua's '..' would, '1e+14' from 10^14 on). Each checks that the call is
-- its case, on a memory that exists, from a writer indexed within the
-- minute, and returns nil if not, having written nothing: the general path
-- then runs (and answers whatever refusal or corruption applies). What they
-- write and publish is what the general path writes and publishes for the
-- same call, field for field (tests/test_fast_paths.py compares the two).
--
-- ARGV of a single operation: [7] seq, [8] token, [9] name, [10] nid, [11]
-- birth, [12] ids given ('0' here), [13] plan count ('0' here), [14] the
-- op's own argument count, then those, then the caller's version stamp.
local REF_CHAR = '\193'  -- string.char(REF): a library's top level has no string library
local LIST_HEADER = '^l (%-?%d+) (%-?%d+) (%d+) (%S+)$'
local DICT_HEADER = '^d (%d+) (%d+) (%d+)$'
local NODE_DICT_HEADER = '^d (%d+) (%d+) (%d+) (%S+)$'

-- Writes the fields of an applied operation (field, value, ...), its
-- node's header and the bookkeeping, then the expiry, the event and the
-- reply. 'journal' is the journal entry's list of fields, without the
-- stamp in front; 'event' and 'keys' are the change event's parts before
-- and after the author.
local function fast_commit(KEYS, ARGV, K, meta, version, clock, hf, fields, journal, header, result, event, keys)
  version = version + 1
  local count = fmt(version)
  local stamp = count .. ' ' .. ARGV[8]
  local jfield = 'j' .. fmt(version % JOURNAL_SIZE)
  local now_ms = string.format('%s%03d', clock[1], math.floor(clock[2] / 1000))
  local wentry = string.format('%d %d %s', ARGV[7], meta[6], result)
  if #fields == 2 then
    -- The commonest case, without a table to unpack.
    if result == '' then
      redis.call('HSET', K, fields[1], fields[2], hf, header, 'v', stamp, jfield, stamp .. ' ' .. journal,
        'ta', now_ms, 'w' .. ARGV[1], wentry)
    else
      redis.call('HSET', K, fields[1], fields[2], hf, header, 'v', stamp, jfield, stamp .. ' ' .. journal,
        'ta', now_ms, 'w' .. ARGV[1], wentry, 'c', meta[3])
    end
  else
    local n = #fields
    fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4] = hf, header, 'v', stamp
    fields[n + 5], fields[n + 6] = jfield, journal == '*' and stamp .. ' *' or stamp .. ' ' .. journal
    fields[n + 7], fields[n + 8], fields[n + 9], fields[n + 10] = 'ta', now_ms, 'w' .. ARGV[1], wentry
    if result ~= '' then fields[n + 11], fields[n + 12] = 'c', meta[3] end
    -- In chunks: Lua unpacks a few thousand values at most.
    for start = 1, #fields, 1000 do
      redis.call('HSET', K, unpack(fields, start, math.min(start + 999, #fields)))
    end
  end
  if ARGV[3] ~= '0' then refresh_ttl(KEYS, tonumber(ARGV[3])) end
  local author = ARGV[4]
  redis.pcall(ARGV[5] == 'SPUBLISH' and 'SPUBLISH' or 'PUBLISH', K .. '@FEED_SUFFIX@',
    count .. ' ' .. now_ms .. ' ' .. ARGV[1] .. ' ' .. event .. ' ' .. #author .. ':' .. author .. keys)
  local since = ARGV[15 + tonumber(ARGV[14])]
  if since and since ~= '' and since ~= meta[2] then
    begin(K)
    return {'ok', stamp, meta[1], result, meta[2], '1', changes_since(since, meta[1])}
  end
  return {'ok', stamp, meta[1], result, meta[2], '1', ''}
end

local function fast_append(KEYS, ARGV, K, meta, version, clock, hf)
  local a, b, c, birth = string.match(meta[5], LIST_HEADER)
  if not a or birth ~= ARGV[11] then return nil end
  a, b, c = tonumber(a), tonumber(b), tonumber(c)
  if not (counts_fit(a) and counts_fit(b) and counts_fit(c)) then return nil end
  local count, keep = tonumber(ARGV[15]), ARGV[16]
  if b < a or not count or count < 1 or tonumber(ARGV[14]) ~= 2 + 2 * count then return nil end
  if keep ~= '0' and not (tonumber(keep) and b - a + count <= tonumber(keep)) then return nil end
  local n, counter, first = ARGV[10], tonumber(meta[3] or '0'), nil
  local prefix = 'e' .. n .. ':'
  local fields, journal = {}, count > 1 and {} or nil
  for k = 1, count do
    local t, value = ARGV[15 + 2 * k], ARGV[16 + 2 * k]
    if t == 'f' then
      if not counter then return nil end
      counter = counter + 1
      -- An id in use means the counter went back (damaged): the general path says so.
      local id = fmt(counter)
      if redis.call('HEXISTS', K, 'h' .. id) == 1 then return nil end
      first = first or id
      value = REF_CHAR .. id .. '=' .. value
    elseif t ~= 's' then
      return nil
    end
    local f = prefix .. fmt(b + k - 1)
    fields[2 * k - 1], fields[2 * k] = f, value
    if journal then journal[k] = #f .. ':' .. f end
  end
  if not journal then
    journal = #fields[1] .. ':' .. fields[1] .. #hf .. ':' .. hf  -- one item: no table
  elseif count + 1 > TOUCH_LIMIT then
    journal = '*'
  else
    journal[count + 1] = #hf .. ':' .. hf
    journal = table.concat(journal)
  end
  meta[3] = counter and fmt(counter)
  return fast_commit(KEYS, ARGV, K, meta, version, clock, hf, fields, journal,
    string.format('l %d %d %d', a, b + count, c + 1) .. ' ' .. birth, first or '',  -- (not '%s': see fast_set)
    'lappend ' .. n .. ' ' .. meta[1] .. string.format(' %d %d 0', b - a, count), '')
end

local function fast_set(KEYS, ARGV, K, meta, version, clock, hf)
  if ARGV[14] ~= '4' or ARGV[15] ~= '1' or ARGV[17] ~= 's' then return nil end
  local n = ARGV[10]
  local a, b, c, birth
  if n == '0' then
    a, b, c = string.match(meta[5], DICT_HEADER)
  else
    -- A nested dict: the one the client knows, by its birth.
    a, b, c, birth = string.match(meta[5], NODE_DICT_HEADER)
    if birth ~= ARGV[11] then return nil end
  end
  if not a then return nil end
  a, b, c = tonumber(a), tonumber(b), tonumber(c)
  if not (counts_fit(a) and counts_fit(b) and counts_fit(c)) then return nil end
  local key, value = ARGV[16], ARGV[18]
  local f = 'e' .. n .. ':' .. key
  local raw = redis.call('HGET', K, f)
  local s
  if raw then
    -- '<seq>:<value>'. A container there is dropped, a corrupt entry
    -- placed anew: the general path.
    s = string.match(raw, '^(%d+):')
    if not s or string.byte(raw, #s + 2) == REF then return nil end
    -- Nothing changes: the general path answers 'same'.
    if #raw - #s - 1 == #value and string.sub(raw, #s + 2) == value then return nil end
  else
    s, a, b = fmt(b), a + 1, b + 1
  end
  -- The birth joined as it is: '%s' would cut it at a zero byte.
  local header = string.format('d %d %d %d', a, b, c + 1)
  if birth then header = header .. ' ' .. birth end
  return fast_commit(KEYS, ARGV, K, meta, version, clock, hf, {f, s .. ':' .. value}, #f .. ':' .. f .. #hf .. ':' .. hf,
    header, '', 'dset ' .. n .. ' ' .. meta[1] .. '   ', ' ' .. #key .. ':' .. key)
end

-- The leanest path: an append of one scalar or dict stored whole, from a
-- caller whose view is the server's (the version it sent is the one there,
-- and so are the list's header and the incarnation). Such a caller has made the
-- strings the call writes and publishes itself (see store.append_hints),
-- so that the script parses and formats almost nothing. ARGV after the
-- caller's version [19]:
--   [20] the list's header as the caller knows it  [21] the header after
--   [22] the version stamp after                    [23] its journal field
--   [24] its journal entry                          [25] the change event up to its time
--   [26] the item's field                           [27] the event after the time
--   [28] the incarnation the event names
-- Nil, having written nothing, where the writer's entry or the item says
-- otherwise (the fast path then decides).
local function lean_append(KEYS, ARGV, K, meta, hf, wf)
  local lseq, lstamp = string.match(meta[4], '^(%d+) (%d+) %d* ?%S*$')
  local seq = tonumber(ARGV[7])
  if not lseq or not seq or tonumber(lseq) >= seq then return nil end
  local clock = redis.call('TIME')
  lstamp = tonumber(lstamp)
  if tonumber(clock[1]) - lstamp >= @INDEX_EVERY@ then return nil end
  local t, value, first = ARGV[17], ARGV[18], ''
  if t == 'f' then
    local counter = tonumber(meta[3] or '0')
    if not counter then return nil end
    first = fmt(counter + 1)
    -- An id in use means the counter went back (damaged): the general path says so.
    if redis.call('HEXISTS', K, 'h' .. first) == 1 then return nil end
    value = REF_CHAR .. first .. '=' .. value
  elseif t ~= 's' then
    return nil
  end
  local stamp = ARGV[22]
  local now_ms = string.format('%s%03d', clock[1], math.floor(clock[2] / 1000))
  local wentry = string.format('%d %d %s', seq, lstamp, first)
  if first == '' then
    redis.call('HSET', K, ARGV[26], value, hf, ARGV[21], 'v', stamp, ARGV[23], ARGV[24], 'ta', now_ms, wf, wentry)
  else
    redis.call('HSET', K, ARGV[26], value, hf, ARGV[21], 'v', stamp, ARGV[23], ARGV[24], 'ta', now_ms, wf, wentry,
      'c', first)
  end
  if ARGV[3] ~= '0' then refresh_ttl(KEYS, tonumber(ARGV[3])) end
  redis.pcall(ARGV[5] == 'SPUBLISH' and 'SPUBLISH' or 'PUBLISH', K .. '@FEED_SUFFIX@', ARGV[25] .. now_ms .. ARGV[27])
  return {'ok', stamp, meta[1], first, meta[2], '1', ''}
end

-- The same for a scalar set of one key of a dict (the root or a nested
-- one), with the hints [20]-[28] made for it (see store.set_hints), and
-- [29] the entry's '<seq>:' if the key is new to the caller's view ('' if
-- the key is there, whose entry keeps its seq).
local function lean_set(KEYS, ARGV, K, meta, hf, wf)
  if ARGV[17] ~= 's' or not ARGV[29] then return nil end
  local lseq, lstamp = string.match(meta[4], '^(%d+) (%d+) %d* ?%S*$')
  local seq = tonumber(ARGV[7])
  if not lseq or not seq or tonumber(lseq) >= seq then return nil end
  local f, value = ARGV[26], ARGV[18]
  local raw, entry = redis.call('HGET', K, f), nil
  if raw then
    -- A container there is dropped, a corrupt entry placed anew, the same
    -- value left alone: not here.
    local s = string.match(raw, '^(%d+):')
    if ARGV[29] ~= '' or not s or string.byte(raw, #s + 2) == REF then return nil end
    if #raw - #s - 1 == #value and string.sub(raw, #s + 2) == value then return nil end
    entry = s .. ':' .. value
  elseif ARGV[29] == '' then
    return nil
  else
    entry = ARGV[29] .. value
  end
  local clock = redis.call('TIME')
  lstamp = tonumber(lstamp)
  if tonumber(clock[1]) - lstamp >= @INDEX_EVERY@ then return nil end
  local stamp = ARGV[22]
  local now_ms = string.format('%s%03d', clock[1], math.floor(clock[2] / 1000))
  redis.call('HSET', K, f, entry, hf, ARGV[21], 'v', stamp, ARGV[23], ARGV[24], 'ta', now_ms, wf,
    string.format('%d %d ', seq, lstamp))
  if ARGV[3] ~= '0' then refresh_ttl(KEYS, tonumber(ARGV[3])) end
  redis.pcall(ARGV[5] == 'SPUBLISH' and 'SPUBLISH' or 'PUBLISH', K .. '@FEED_SUFFIX@', ARGV[25] .. now_ms .. ARGV[27])
  return {'ok', stamp, meta[1], '', meta[2], '1', ''}
end

-- The fast path of a call, or nil for the general one.
local function fast(KEYS, ARGV)
  local name = ARGV[9]
  if name ~= 'lappend' and name ~= 'dset' then return nil end
  local K = KEYS[1]
  local hf, wf = 'h' .. ARGV[10], 'w' .. ARGV[1]
  local meta = redis.call('HMGET', K, 'i', 'v', 'c', wf, hf)
  -- The memory exists, as the client knows it, and the node has a header.
  if not meta[1] or not meta[2] or not meta[4] or not meta[5] then return nil end
  if ARGV[2] ~= '*' and ARGV[2] ~= meta[1] then return nil end
  if ARGV[28] and ARGV[14] == '4' and ARGV[15] == '1' and ARGV[19] == meta[2] and ARGV[20] == meta[5]
      and ARGV[28] == meta[1] then
    local reply = (name == 'lappend' and lean_append or lean_set)(KEYS, ARGV, K, meta, hf, wf)
    if reply then return reply end
  end
  local version = tonumber(string.match(meta[2], '^%d+'))
  -- The writer's last call, and when it was indexed: due again, the general path.
  local lseq, lstamp = string.match(meta[4], '^(%d+) (%d+) %d* ?%S*$')
  if not version or not lseq or tonumber(lseq) >= tonumber(ARGV[7]) then return nil end
  local clock = redis.call('TIME')
  if tonumber(clock[1]) - tonumber(lstamp) >= @INDEX_EVERY@ then return nil end
  meta[6] = lstamp
  if name == 'lappend' then return fast_append(KEYS, ARGV, K, meta, version, clock, hf) end
  return fast_set(KEYS, ARGV, K, meta, version, clock, hf)
end

local function apply(KEYS, ARGV)
  delta = ''
  if ARGV[6] == '1' and ARGV[12] == '0' and ARGV[13] == '0' then
    local reply = fast(KEYS, ARGV)
    if reply then return reply end
  end
  begin(KEYS[1])
  A, pos = ARGV, 7
  writer = ARGV[1]
  nops = tonumber(ARGV[6])
  -- A single operation creates nodes under no ids of the client's and
  -- knows every node by its birth: nothing to map.
  if nops == 1 then realid, known_as = NONE, NONE else realid, known_as = {}, {} end
  headers, dirty = {}, {}
  first_nid, damage, damage_why = nil, nil, nil
  local wfield = 'w' .. writer
  local first_seq, first_token, first_nid_arg = tonumber(ARGV[7]), ARGV[8], ARGV[10]
  local hnid = hfield(first_nid_arg)
  -- The header of the node first changed comes with the memory's own fields.
  local meta = redis.call('HMGET', K, 'i', 'v', 'c', wfield, hnid)
  cache[hnid] = meta[5] or false
  -- The version is '<count> <token of the operation that made it>': a server
  -- rolled back to an older state and written again reaches the same counts
  -- with other tokens, so no replica mistakes one state for another.
  before = meta[2] or ''
  incarnation = meta[1]
  version, counter = tonumber(string.match(before, '^%d+') or '0'), tonumber(meta[3] or '0')
  stamp_now = before

  -- Operations are numbered in order; the last one applied is recorded.
  local stamp, applied, applied_result, applied_results = 0, 0, '', ''
  if incarnation and meta[4] then
    -- '<seq> <index time> <first node made>', and for a batch its per-operation results.
    local lseq, lstamp, lres, lresults = string.match(meta[4], '^(%d+) (%d+) (%d*) ?(%S*)$')
    if lseq and tonumber(lseq) >= first_seq and nops == 1 then return reply('dup', lres, '', '') end
    applied, applied_result = tonumber(lseq or '0'), lres or ''
    applied_results = string.gsub(lresults or '', ',', ' ')
    stamp = tonumber(lstamp or '0')
  end
  if ARGV[2] ~= '*' and ARGV[2] ~= (incarnation or '') then return reply('gone', '', '1', '') end
  -- A memory that does not exist yet is created by this call's final
  -- write, never before everything is checked.
  creating = not incarnation
  if creating then
    -- Fields without an incarnation are a damaged memory, not a new one:
    -- creating over them would mix old nodes with new ones.
    if redis.call('EXISTS', K) == 1 then return corrupt('i', 'a memory with fields but no incarnation') end
    incarnation = first_token
    version, counter = 0, 0
  end
  -- The writer index is touched once a minute per writer (below); a key of
  -- another type there is found now, before anything is written.
  local clock = redis.call('TIME')
  local now = tonumber(clock[1])
  local index_due = now - stamp >= @INDEX_EVERY@
  if index_due then
    local kind = redis.call('TYPE', KEYS[2])
    kind = type(kind) == 'table' and kind.ok or kind
    if kind ~= 'zset' and kind ~= 'none' then
      return corrupt('', 'holds another kind of Redis value than redis_memory keeps there', KEYS[2])
    end
  end

  local events, results, last_token = {}, {}, first_token
  for i = 1, nops do
    local refused, result = apply_one(events, applied)
    if refused then
      if nops == 1 then return refused end
      if refused[1] ~= 'exists' then
        refused[7] = fmt(i)
        return refused
      end
      -- A setdefault that found its key: the rest goes on; the node there, if
      -- one, with its birth (for what the client made on the default).
      local there = refused[9] and is_ref(refused[9]) and string.sub(refused[9], 2)
      results[i] = there and ('x' .. there .. '/' .. (refused[10] or '')) or 'x'
    else
      results[i] = result
    end
    if result ~= 'd' then last_token = token end
  end
  -- A batch this writer applied whole already (a resend).
  if nops > 1 and applied >= seq then return reply('dup', applied_result, '', applied_results) end
  if damage then return corrupt(damage, damage_why) end
  write_headers()

  local ttl = tonumber(ARGV[3])
  if changes == 0 then
    refresh_ttl(KEYS, ttl)
    return reply('same', '', '', nops > 1 and table.concat(results, ' ') or '')
  end
  version = version + 1
  stamp_now = fmt(version) .. ' ' .. last_token
  local result = first_nid and fmt(first_nid) or ''
  note('v', stamp_now)
  -- The write that creates the memory lists no fields: no replica syncs across
  -- it (one of the memory before has another incarnation and reloads), while
  -- the entry's stamp still vouches for version 1 to a replica syncing from it.
  note('j' .. fmt(version % JOURNAL_SIZE), creating and stamp_now .. ' *' or journal_entry(stamp_now, touched, ntouched))
  -- Activity times, in ms: of this write, and of the one that created the memory.
  local now_ms = clock_ms(clock)
  note('ta', now_ms)
  if creating then note('tc', now_ms) end
  -- The writer index is touched once a minute per writer; each time, a few
  -- writers silent for longer than the retention are forgotten.
  if index_due then
    stamp = now
    local W = KEYS[2]
    redis.call('ZADD', W, now, writer)
    for _, old in ipairs(redis.call('ZRANGEBYSCORE', W, '-inf', now - @RETENTION@, 'LIMIT', 0, 16)) do
      if redis.call('HDEL', K, 'w' .. old) > 0 then wrote = true end
      redis.call('ZREM', W, old)
    end
  end
  local per_op = nops > 1 and ' ' .. table.concat(results, ',') or ''
  note(wfield, string.format('%d %d %s', seq, stamp, result) .. per_op)
  if first_nid or creating then note('c', fmt(counter)) end
  if creating then note('i', incarnation) end
  flush()
  refresh_ttl(KEYS, ttl)
  -- Each line: '<version> <ms> ' then what apply_one wrote, and the author.
  local author = ARGV[4]
  local head, tail = fmt(version) .. ' ' .. now_ms .. ' ', ' ' .. #author .. ':' .. author
  local lines = {}
  for i = 1, #events, 2 do lines[#lines + 1] = head .. events[i] .. tail .. events[i + 1] end
  if #lines == 1 then lines = lines[1] else lines = table.concat(lines, '\n') end
  publish(ARGV[5], lines)
  if nops > 1 then return reply('ok', result, '', table.concat(results, ' ')) end
  local since = A[pos]
  if since and since ~= '' and since ~= before then
    local modified = wrote
    begin(K)
    delta, wrote = changes_since(since, incarnation), modified
  end
  return reply('ok', result, '', '', unpack(extra or {}))
end

-- apply, for a tracked connection (CLIENT TRACKING, see tracking.py): a
-- write ends the server's tracking of the hash for the caller's connection,
-- and a read as the last step tracks it again, so a tracked replica learns
-- of the next writer's change. (pcall: a key of another type is answered
-- 'corrupt' by apply, not met by an error here.)
local function apply_tracked(KEYS, ARGV)
  local answer = apply(KEYS, ARGV)
  redis.pcall('HGET', KEYS[1], 'v')
  return answer
end
