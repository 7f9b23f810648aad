-- Tessera: the facts ext_authz admits a request by, a body the backend cannot overrun, and
-- exact usage for every OpenAI stream. Runs BEFORE ext_authz. (ARCHITECTURE §2 and §4;
-- verified design and traps: docs/usage-and-limits.md and docs/request-path.md)
--
-- request : sets the x-tessera-* headers of tessera/gateway_headers.py (Envoy removed any a
--           client sent): the served model (route metadata), the body's size as received
--           (chunked bodies too), and the body's max_tokens, max_completion_tokens, n and
--           best_of as written, which ext_authz checks against the model's cap. Top-level keys
--           are compared decoded ("stre\u0061m" is "stream"); a body naming a key twice is
--           refused (400 duplicate_key: parsers disagree on which one wins). A chat or
--           completions body without max_tokens (or with null) gets the model's default
--           written in (route metadata default_max_tokens; max_completion_tokens' value when
--           only that is given), so the backend cannot generate more than was admitted. On an
--           alias route, the top-level "model" becomes the served model's name. On chat and
--           completions (the APIs that report a stream's usage only when asked), a top-level
--           "stream": true without stream_options.include_usage: true (absent, false, null,
--           {}) gets include_usage set. Every change splices the body text (never
--           re-serialising it); ai.gw.inject:injected marks the stream. A multipart audio
--           request is routed by its form's "model" field (json_to_metadata reads only JSON):
--           set as ai.gw:model, then the route is chosen again, before anything asks for the
--           route's metadata (Envoy's Lua keeps its first answer for the stream). A form the
--           gateway could read differently from the backend's parser is refused (400
--           invalid_form; a second model field, in any spelling, duplicate_key). Refusals come
--           in the error shape of the endpoint's API (Anthropic's on /v1/messages, else OpenAI's).
-- response: records ai.gw:status (a string, for the ratelimit stream-done descriptor); counts
--           an SSE stream's data events into ai.gw:chunks (the usage line's estimate for a
--           stream cut before its usage); on an injected SSE stream drops the one event with
--           "choices": [] and "usage", which sse_to_metadata (after this filter in decode order,
--           so before it on the way back) has already read. Every other byte passes unchanged,
--           incremental, unbuffered.
-- No JSON library in Envoy's Lua: a scanner finds TOP-LEVEL keys only, skipping strings
-- (with escapes) and nested values, so a nested "stream" or message text cannot trigger it.

local function utf8(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64) end
  return string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

local SIMPLE = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function decoded(k)
  -- a JSON string's text (between the quotes) as the characters it stands for
  if not string.find(k, "\\", 1, true) then return k end
  local out, i, n = {}, 1, #k
  while i <= n do
    local c = string.sub(k, i, i)
    if c ~= "\\" then
      out[#out + 1] = c; i = i + 1
    else
      local e = string.sub(k, i + 1, i + 1)
      if e == "u" then -- (a surrogate pair stays two code points: enough to compare key names)
        out[#out + 1] = utf8(tonumber(string.sub(k, i + 2, i + 5), 16) or 0xFFFD); i = i + 6
      else
        out[#out + 1] = SIMPLE[e] or e; i = i + 2
      end
    end
  end
  return table.concat(out)
end

local function string_end(s, q)
  -- the index of the '"' that ends the JSON string whose text starts at s[q], nil if none: a
  -- '"' is escaped when an odd number of backslashes precede it (plain find: no per-byte
  -- pattern matching through long message text)
  while true do
    q = string.find(s, '"', q, true)
    if not q then return nil end
    local b = q - 1
    while string.byte(s, b) == 92 do b = b - 1 end
    if (q - b) % 2 == 1 then return q end
    q = q + 1
  end
end

-- the bytes top_level stops at: { } [ ] " , : at the top level, only { } [ ] " below it
local TOP = {[123] = true, [125] = true, [91] = true, [93] = true, [34] = true, [44] = true, [58] = true}
local NESTED = {[123] = true, [125] = true, [91] = true, [93] = true, [34] = true}

local function top_level(s, from)
  -- s: text, from: index of '{'. Returns key -> {value start, value end}, index of the matching
  -- '}', and the first key named twice (nil if none). Keys are decoded.
  local keys, depth, p, twice = {}, 0, from, nil
  local expect_key, cur, vstart = false, nil, nil
  while true do
    -- the next byte that matters (inside a nested value only brackets and strings do): most
    -- often s[p] or s[p + 1], tested before a pattern search
    local want = depth == 1 and TOP or NESTED
    local c = string.byte(s, p)
    if not want[c] then
      c = string.byte(s, p + 1)
      if want[c] then
        p = p + 1
      else
        p = string.find(s, depth == 1 and '[{}%[%]",:]' or '[{}%[%]"]', p + 1)
        if not p then return nil end
        c = string.byte(s, p)
      end
    end
    if c == 34 then -- '"': skip the string
      local q = string_end(s, p + 1)
      if not q then return nil end
      if depth == 1 and expect_key then
        cur = decoded(string.sub(s, p + 1, q - 1)); expect_key = false
        if keys[cur] then twice = twice or cur end
        keys[cur] = {p, p} -- seen; its value's span is filled in at its end
      end
      p = q + 1
    else
      if c == 123 or c == 91 then -- '{' '['
        depth = depth + 1
        if depth == 1 then expect_key = true end
      elseif c == 125 or c == 93 then -- '}' ']'
        if depth == 1 then
          if cur then keys[cur] = {vstart, p - 1} end
          return keys, p, twice
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

-- tessera/gateway_headers.py: what ext_authz decides on (a unit test checks the names match)
local H_MODEL, H_BODY, H_PROMPTS = "x-tessera-model", "x-tessera-body-bytes", "x-tessera-prompts"
-- this Envoy's node, as its usage lines name it (%ENVIRONMENT(ENVOY_NODE_ID)%): ext_authz keeps
-- the admission open under it for the usage backstop
local H_NODE, NODE = "x-tessera-node", os.getenv("ENVOY_NODE_ID")
local FACTS = {
  max_tokens = "x-tessera-max-tokens",
  max_completion_tokens = "x-tessera-max-completion-tokens",
  max_output_tokens = "x-tessera-max-output-tokens",
  n_predict = "x-tessera-n-predict",
  n = "x-tessera-n",
  best_of = "x-tessera-best-of",
}
-- generating endpoints, and the key each reads its limit from (the default is written there)
local GENERATES = {
  ["/v1/chat/completions"] = "max_tokens",
  ["/v1/completions"] = "max_tokens",
  ["/v1/responses"] = "max_output_tokens",
  ["/v1/messages"] = "max_tokens",
}
-- streams that carry usage only when asked (stream_options.include_usage); the Responses and
-- Messages APIs always send it (response.completed, message_start / message_delta)
local ASKS_USAGE = {["/v1/chat/completions"] = true, ["/v1/completions"] = true}
-- endpoints that answer errors in Anthropic's shape (tessera/endpoints.py)
local ANTHROPIC = {["/v1/messages"] = true}

local function fact(v)
  -- a value as written, if it can be one (a number, null, a short literal); else a word that
  -- ext_authz refuses as the wrong type (never raw text with line breaks in a header)
  if #v <= 64 and string.match(v, '^[%w%.%+%-"]+$') then return v end
  return "invalid"
end

local function elements(s, from)
  -- how many prompts the JSON array at s[from] ('[') batches: its elements when they are strings
  -- or arrays, one when it is a single prompt of token ids; nil when it does not end
  local depth, p, count, seen = 0, from, 0, false
  while true do
    p = string.find(s, '[{}%[%]",]', p)
    if not p then return nil end
    local c = string.byte(s, p)
    if c == 34 then
      local q = string_end(s, p + 1)
      if not q then return nil end
      if depth == 1 then seen = true end
      p = q + 1
    else
      if c == 123 or c == 91 then
        if depth == 1 then seen = true end
        depth = depth + 1
      elseif c == 125 or c == 93 then
        depth = depth - 1
        if depth == 0 then
          if not seen then -- numbers only: one prompt of token ids (or none)
            return string.find(string.sub(s, from + 1, p - 1), "[^ \t\r\n]") and 1 or 0
          end
          return count + 1
        end
      elseif c == 44 and depth == 1 then
        count = count + 1
      end
      p = p + 1
    end
  end
end

local function decoded_path(path)
  -- the path without its query, percent-escapes decoded (as the backend will read it)
  return (string.gsub(string.match(path, "^[^?]*"), "%%(%x%x)", function(x)
    return string.char(tonumber(x, 16))
  end))
end

local function refuse(h, path, code, message, param)
  -- a 400 in the endpoint's API's shape (tessera/client_errors.py); message and param are JSON
  -- string contents, already safe
  local body
  if ANTHROPIC[path] then
    body = '{"type":"error","error":{"type":"invalid_request_error","message":"' .. message .. '"}}'
  else
    body = '{"error":{"message":"' .. message .. '","type":"invalid_request_error","code":"' .. code
      .. '","param":' .. (param and ('"' .. param .. '"') or "null") .. '}}'
  end
  h:respond({[":status"] = "400", ["content-type"] = "application/json"}, body)
end

local function refuse_unreadable(h, path)
  refuse(h, path, "invalid_json", "The request body is not a JSON object the gateway can read.")
end

local function stream_usage(s, keys, close, edits, appends)
  -- a top-level "stream": true asks the upstream for usage; false when it needs no change
  local st = keys["stream"]
  if not st or trim(string.sub(s, st[1], st[2])) ~= "true" then return false end
  local so = keys["stream_options"]
  if not so then
    appends[#appends + 1] = '"stream_options":{"include_usage":true}'
    return true
  end
  if trim(string.sub(s, so[1], so[2])) == "null" then
    edits[#edits + 1] = {so[1], so[2], '{"include_usage":true}'}
    return true
  end
  local ob = string.find(s, "[^ \t\r\n]", so[1])
  if string.byte(s, ob) ~= 123 then return false end -- not an object: the upstream rejects it
  local sk, sclose = top_level(s, ob)
  if not sk then return false end
  local cus = sk["continuous_usage_stats"]
  if cus and trim(string.sub(s, cus[1], cus[2])) == "true" then
    return false -- usage on every chunk: nothing to inject, nothing to strip
  end
  local iu = sk["include_usage"]
  if iu then
    if trim(string.sub(s, iu[1], iu[2])) == "true" then return false end
    edits[#edits + 1] = {iu[1], iu[2], "true"}
    return true
  end
  local empty = string.find(string.sub(s, ob + 1, sclose - 1), "[^ \t\r\n]") == nil
  edits[#edits + 1] = {sclose, sclose - 1, empty and '"include_usage":true' or ',"include_usage":true'}
  return true
end

local function spliced(s, close, edits, appends)
  -- s with each edit {first, last, text} (last = first - 1 inserts) and the appends before '}'
  if #appends > 0 then
    local empty = string.find(string.sub(s, 2, close - 1), "[^ \t\r\n]") == nil -- '{' is s[first]
    edits[#edits + 1] = {close, close - 1, (empty and "" or ",") .. table.concat(appends, ",")}
  end
  table.sort(edits, function(a, b) return a[1] > b[1] end)
  for _, e in ipairs(edits) do
    s = string.sub(s, 1, e[1] - 1) .. e[3] .. string.sub(s, e[2] + 1)
  end
  return s
end

local function refuse_duplicate(h, path, key)
  local plain = string.match(key, "^[%w_]+$")
  local named = plain and (" '" .. key .. "'") or ""
  refuse(h, path, "duplicate_key", "The request body names the key" .. named .. " more than once.", plain and key)
end

-- endpoints whose body is multipart/form-data, the model a form field (tessera/endpoints.py)
local FORM = {["/v1/audio/transcriptions"] = true, ["/v1/audio/translations"] = true}

local function params(value)
  -- a header value's parameters (after its first ';'): lower-cased name -> list of values. nil
  -- when one is not name=value, a value a token or a quoted string without escapes, or a name is
  -- RFC 2231's name*: a form the gateway could read differently from the backend is refused
  local out = {}
  local rest = string.match(value, "^[^;]*;(.*)$")
  if not rest then return out end
  for item in string.gmatch(rest, "[^;]+") do
    local name, v = string.match(item, "^%s*([%w%-_%.]+)%s*=%s*(.-)%s*$")
    if not name then return nil end
    local q = string.match(v, '^"([^"\\]*)"$')
    if q then v = q elseif v == "" or string.find(v, '["\\%s]') then return nil end
    name = string.lower(name)
    out[name] = out[name] or {}
    out[name][#out[name] + 1] = v
  end
  return out
end

local function form_model(s, boundary)
  -- the span {first, last} of the form field "model"'s value; nil if the form has none; false
  -- (and "twice" when it names it twice) when the form is not one the gateway reads exactly as
  -- a backend's parser would: it must start with the delimiter, every delimiter is followed by
  -- CRLF or "--", every part has one Content-Disposition: form-data with one name. A file part's
  -- bytes are skipped by a plain search for the next delimiter.
  local delim = "\r\n--" .. boundary
  if string.sub(s, 1, #delim - 2) ~= string.sub(delim, 3) then return false end
  local pos, found = #delim - 1, nil
  while true do
    if string.sub(s, pos, pos + 1) == "--" then return found end
    if string.sub(s, pos, pos + 1) ~= "\r\n" then return false end
    local head_end = string.find(s, "\r\n\r\n", pos, true)
    if not head_end then return false end
    local name, dispositions = nil, 0
    for line in string.gmatch(string.sub(s, pos + 2, head_end + 1), "([^\r\n]*)\r\n") do
      local header, value = string.match(line, "^([%w%-]+):%s*(.*)$")
      if not header then return false end
      if string.lower(header) == "content-disposition" then
        dispositions = dispositions + 1
        local p = params(value)
        if not p or string.lower(string.match(value, "^%s*([^;%s]*)")) ~= "form-data"
          or not p.name or #p.name ~= 1 then return false end
        name = p.name[1]
      end
    end
    if dispositions ~= 1 then return false end
    local a, b = string.find(s, delim, head_end + 4, true)
    if not a then return false end
    if name == "model" then
      if found then return false, "twice" end
      found = {head_end + 4, a - 1}
    end
    pos = b + 1
  end
end

local function refuse_form(h, path)
  refuse(h, path, "invalid_form", "The multipart form is not one the gateway can read unambiguously.")
end

local function route_form(h, ct, path)
  -- A multipart request: its "model" field routes it (json_to_metadata reads only JSON), as the
  -- body's model routes a JSON request. Called before anything asks for the route's metadata:
  -- Envoy keeps the first answer for the stream, which must be the route chosen again here.
  local body = h:body()
  local hd = h:headers()
  local n = body and body:length() or 0
  hd:replace(H_BODY, tostring(n))
  local p = params(ct)
  local boundary = p and p.boundary and #p.boundary == 1 and p.boundary[1]
  if not boundary or #boundary > 70 then return refuse_form(h, path) end
  local s = n > 0 and body:getBytes(0, n) or ""
  local span, twice = form_model(s, boundary)
  if span == false then
    if twice then return refuse_duplicate(h, path, "model") end
    return refuse_form(h, path)
  end
  local name = span and string.sub(s, span[1], span[2]) or ""
  if name == "" or #name > 256 or string.find(name, "%c") then
    name = ":missing" -- (json_to_metadata called the form invalid JSON): 400 missing_model
  end
  h:streamInfo():dynamicMetadata():set("ai.gw", "model", name)
  h:clearRouteCache()
  local route = h:metadata()
  local model = route:get("model")
  if not model then return end -- no model, or not one that serves this endpoint: Envoy's 4xx
  hd = h:headers()
  hd:replace(H_MODEL, model)
  if NODE and NODE ~= "" then hd:replace(H_NODE, NODE) end
  local served = route:get("served_model") -- an alias: the backend is asked for its own name
  if served then
    local nb = string.sub(s, 1, span[1] - 1) .. served .. string.sub(s, span[2] + 1)
    body:setBytes(nb)
    if hd:get("content-length") then hd:replace("content-length", tostring(#nb)) end
  end
end

local function largest(a, b, c)
  -- the largest of the numbers given (JSON text), as an integer string; nil if none is one
  local best
  for _, v in pairs({a, b, c}) do
    local x = tonumber(v)
    if x and x >= 0 and (not best or x > best) then best = x end
  end
  return best and string.format("%d", math.min(best, 1e9)) or nil
end

function envoy_on_request(h)
  local hd = h:headers()
  local post, ct = hd:get(":method") == "POST", hd:get("content-type") or ""
  if post and string.find(ct, "multipart/form-data", 1, true) then
    local path = decoded_path(hd:get(":path") or "")
    if FORM[path] then return route_form(h, ct, path) end
  end
  local route = h:metadata() -- this route's metadata for the Lua filter (model routes only)
  local model = route:get("model")
  if model then
    hd:replace(H_MODEL, model)
    if NODE and NODE ~= "" then hd:replace(H_NODE, NODE) end
  end
  if not post then return end
  local body = h:body() -- the whole body (json_to_metadata buffered it); bounded by the size limit
  -- handles taken before the body was read are out of scope now: take them again
  hd, route = h:headers(), h:metadata()
  local n = body and body:length() or 0
  hd:replace(H_BODY, tostring(n)) -- as received: chunked bodies have no content-length
  local path = decoded_path(hd:get(":path") or "")
  if n == 0 or not string.find(ct, "application/json", 1, true) then return end
  local s = body:getBytes(0, n)
  local first = string.find(s, "[^ \t\r\n]")
  local keys, close, twice
  if first and string.byte(s, first) == 123 then keys, close, twice = top_level(s, first) end
  if not keys then
    -- Not JSON to us. Envoy's parser routed it by model, so it is JSON to Envoy (a BOM,
    -- something Envoy's parser forgives): the backend may read facts we could not. Refuse.
    if model then return refuse_unreadable(h, path) end
    return -- not JSON at all: json_to_metadata routes it to invalid_json
  end
  if twice then return refuse_duplicate(h, path, twice) end
  if first ~= 1 then s, close = string.sub(s, first), close - first + 1; keys, close = top_level(s, 1) end
  local function value(k)
    local v = keys[k]
    return v and trim(string.sub(s, v[1], v[2])) or nil
  end
  local meta = h:streamInfo():dynamicMetadata()
  local edits, appends = {}, {}
  local served = route:get("served_model") -- alias routes: the body names the served model
  if served and keys["model"] then edits[#edits + 1] = {keys["model"][1], keys["model"][2], '"' .. served .. '"'} end
  for key, header in pairs(FACTS) do
    local v = value(key)
    if v then hd:replace(header, fact(v)) end
  end
  local prompt = keys["prompt"]
  if prompt then -- a batch of prompts generates for each
    local at = string.find(s, "[^ \t\r\n]", prompt[1])
    if at and string.byte(s, at) == 91 then hd:replace(H_PROMPTS, tostring(elements(s, at) or "invalid")) end
  end
  local field = GENERATES[path]
  local mt, mct = value("max_tokens"), value("max_completion_tokens")
  local limit = largest(value("max_output_tokens"), mct, mt) -- whichever the backend honours
  local own = field and value(field)
  if field and (own == nil or own == "null") then
    local default = route:get("default_max_tokens")
    local put = (field == "max_tokens" and mct and string.match(mct, "^%d+$"))
      or (default and string.format("%d", default))
    if put then
      if own == "null" then
        edits[#edits + 1] = {keys[field][1], keys[field][2], put}
      else
        appends[#appends + 1] = '"' .. field .. '":' .. put
      end
      hd:replace(FACTS[field], put)
      limit = (field == "max_tokens" and mct) or put
    end
  end
  if limit then meta:set("ai.gw", "max_tokens", limit) end -- the usage line's estimate
  if ASKS_USAGE[path] and stream_usage(s, keys, close, edits, appends) then
    meta:set("ai.gw.inject", "injected", true)
  end
  if #edits == 0 and #appends == 0 then return end
  local nb = spliced(s, close, edits, appends)
  body:setBytes(nb)
  if hd:get("content-length") then hd:replace("content-length", tostring(#nb)) end
end

local function is_usage_event(e)
  -- (a plain find first: a pattern is tried at every byte, and most events have no usage)
  local u = string.find(e, '"usage"', 1, true)
  if not u or not string.find(e, '"usage"%s*:%s*{', u) then return false end
  local c = string.find(e, '"choices"', 1, true)
  return c ~= nil and string.find(e, '"choices"%s*:%s*%[%s*%]', c) ~= nil
end

local function events_in(bytes)
  -- SSE data events that carry a JSON object (an estimate of tokens streamed: one per chunk):
  -- the matches of "data:%s*{", counted without building a copy of the bytes
  local n, at = 0, 1
  while true do
    local d = string.find(bytes, "data:", at, true)
    if not d then return n end
    local _, e = string.find(bytes, "^%s*{", d + 5)
    if e then n, at = n + 1, e + 1 else at = d + 5 end
  end
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
