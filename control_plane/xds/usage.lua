-- Tessera: exact usage for every OpenAI stream, and the response status for settlement.
-- (ARCHITECTURE §2 and §4; verified design and traps: docs/usage-and-limits.md)
--
-- request : on an alias route, the top-level "model" becomes the served model's name (route
--           metadata served_model; model names need no JSON escaping). A top-level
--           "stream": true without stream_options.include_usage: true (absent, false, null, {})
--           gets include_usage set, by splicing the body text (never re-serialising it);
--           ai.gw.inject:injected marks the stream.
-- response: records ai.gw:status (a string, for the ratelimit stream-done descriptor); counts
--           an SSE stream's data events into ai.gw:chunks (the usage line's estimate for a
--           stream cut before its usage); on an injected SSE stream drops the one event with
--           "choices": [] and "usage", which sse_to_metadata (after this filter in decode order,
--           so before it on the way back) has already read. Every other byte passes unchanged,
--           incremental, unbuffered.
-- No JSON library in Envoy's Lua: a scanner finds TOP-LEVEL keys only, skipping strings
-- (with escapes) and nested values, so a nested "stream" or message text cannot trigger it.

local function top_level(s, from)
  -- s: text, from: index of '{'. Returns key -> {value start, value end}, index of the matching '}'
  local keys, depth, p = {}, 0, from
  local expect_key, cur, vstart = false, nil, nil
  while true do
    p = string.find(s, '[{}%[%]",:]', p)
    if not p then return nil end
    local c = string.byte(s, p)
    if c == 34 then -- '"': skip the string
      local q = p + 1
      while true do
        q = string.find(s, '["\\]', q)
        if not q then return nil end
        if string.byte(s, q) == 92 then q = q + 2 else break end
      end
      if depth == 1 and expect_key then cur = string.sub(s, p + 1, q - 1); expect_key = false end
      p = q + 1
    else
      if c == 123 or c == 91 then -- '{' '['
        depth = depth + 1
        if depth == 1 then expect_key = true end
      elseif c == 125 or c == 93 then -- '}' ']'
        if depth == 1 then
          if cur then keys[cur] = {vstart, p - 1} end
          return keys, p
        end
        depth = depth - 1
      elseif depth == 1 and c == 58 then -- ':'
        vstart = p + 1
      elseif depth == 1 and c == 44 then -- ','
        if cur then keys[cur] = {vstart, p - 1} end
        cur, expect_key = nil, true
      end
      p = p + 1
    end
  end
end

local function trim(x) return (string.gsub(x, "^%s*(.-)%s*$", "%1")) end

local function with_usage(s)
  -- the body asking for usage, or nil when it needs no change (or is not ours to touch)
  local first = string.find(s, "[^ \t\r\n]")
  if not first or string.byte(s, first) ~= 123 then return nil end
  local keys, close = top_level(s, first)
  if not keys or not keys["stream"] then return nil end
  if trim(string.sub(s, keys["stream"][1], keys["stream"][2])) ~= "true" then return nil end
  local so = keys["stream_options"]
  if not so then
    return string.sub(s, 1, close - 1) .. ',"stream_options":{"include_usage":true}' .. string.sub(s, close)
  end
  local v = trim(string.sub(s, so[1], so[2]))
  if v == "null" then
    return string.sub(s, 1, so[1] - 1) .. '{"include_usage":true}' .. string.sub(s, so[2] + 1)
  end
  local ob = string.find(s, "[^ \t\r\n]", so[1])
  if string.byte(s, ob) ~= 123 then return nil end -- not an object: the upstream rejects it
  local sk, sclose = top_level(s, ob)
  if not sk then return nil end
  local cus = sk["continuous_usage_stats"]
  if cus and trim(string.sub(s, cus[1], cus[2])) == "true" then
    return nil -- usage on every chunk: nothing to inject, nothing to strip
  end
  local iu = sk["include_usage"]
  if iu then
    if trim(string.sub(s, iu[1], iu[2])) == "true" then return nil end
    return string.sub(s, 1, iu[1] - 1) .. "true" .. string.sub(s, iu[2] + 1)
  end
  local empty = string.find(string.sub(s, ob + 1, sclose - 1), "[^ \t\r\n]") == nil
  return string.sub(s, 1, sclose - 1) .. (empty and '"include_usage":true' or ',"include_usage":true')
    .. string.sub(s, sclose)
end

local function with_model(s, served)
  -- the body naming the served model instead of the alias the caller used (route metadata)
  local first = string.find(s, "[^ \t\r\n]")
  if not first or string.byte(s, first) ~= 123 then return nil end
  local keys = top_level(s, first)
  if not keys or not keys["model"] then return nil end
  local m = keys["model"]
  return string.sub(s, 1, m[1] - 1) .. '"' .. served .. '"' .. string.sub(s, m[2] + 1)
end

function envoy_on_request(h)
  if h:headers():get(":method") ~= "POST" then return end
  local ct = h:headers():get("content-type") or ""
  if not string.find(ct, "application/json", 1, true) then return end
  local body = h:body() -- buffered already by json_to_metadata; bounded by the body-size limit
  if not body then return end
  local n = body:length()
  if n == 0 then return end
  local s = body:getBytes(0, n)
  local served = h:metadata():get("served_model") -- set on alias routes only
  local renamed = served and with_model(s, served) or s
  local nb = with_usage(renamed)
  if nb then
    h:streamInfo():dynamicMetadata():set("ai.gw.inject", "injected", true)
  else
    nb = renamed
  end
  if nb == s then return end
  body:setBytes(nb)
  if h:headers():get("content-length") then
    h:headers():replace("content-length", tostring(#nb))
  end
end

local function is_usage_event(e)
  return string.find(e, '"usage"%s*:%s*{') ~= nil and string.find(e, '"choices"%s*:%s*%[%s*%]') ~= nil
end

local function events_in(bytes)
  -- SSE data events that carry a JSON object (an estimate of tokens streamed: one per chunk)
  local _, n = string.gsub(bytes, "data:%s*{", "")
  return n
end

function envoy_on_response(h)
  local meta = h:streamInfo():dynamicMetadata()
  meta:set("ai.gw", "status", h:headers():get(":status") or "")
  local ct = h:headers():get("content-type") or ""
  if not string.find(ct, "text/event-stream", 1, true) then return end
  local injected = meta:get("ai.gw.inject")
  injected = injected and injected["injected"]
  -- the body shrinks: an upstream content-length would now be wrong (the client would hang)
  if injected then h:headers():remove("content-length") end
  local pending, last, last_out, sent = "", nil, nil, 0
  for chunk in h:bodyChunks() do
    local own = chunk:getBytes(0, chunk:length())
    if injected then
      local s = pending .. own
      local out, pos = {}, 1
      local crlf = string.find(s, "\r", 1, true) ~= nil
      while true do
        local a, b -- an SSE event ends with a blank line (LF or CRLF)
        if crlf then a, b = string.find(s, "\r?\n\r?\n", pos) else a, b = string.find(s, "\n\n", pos, true) end
        if not a then break end
        local e = string.sub(s, pos, b)
        if not is_usage_event(e) then out[#out + 1] = e end
        pos = b + 1
      end
      pending = string.sub(s, pos) -- an unfinished event waits for its end
      local o = table.concat(out)
      if o ~= own then chunk:setBytes(o) end -- compare with this chunk's own bytes, not pending .. own
      last, last_out = chunk, o
      sent = sent + events_in(o)
    else
      sent = sent + events_in(own)
    end
    -- counted as it goes: a stream the client cuts still says how much it got (the meter's
    -- estimate when no usage arrives). The metadata handle of the headers phase is out of
    -- scope once the body is iterated: fetch it again.
    h:streamInfo():dynamicMetadata():set("ai.gw", "chunks", tostring(sent))
  end
  if #pending > 0 and last then last:setBytes(last_out .. pending) end -- an unterminated tail
end
