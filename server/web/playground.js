/*
 * nextchar playground: type, and see what the model expects next.
 *
 * The page keeps one session on the server and one WebSocket (/v1/stream) on it. The session's
 * text is mirrored here as `confirmed` (the characters the server has consumed, as far as its
 * replies have told us, with the surprisal of each); the textarea holds what the writer wants.
 * One message is in flight at a time: `pump` sends the difference between the two (take back the
 * characters after their common prefix, then feed the rest), and its reply moves `confirmed` on.
 * Keystrokes typed while a message is in flight go out together in the next one; every character
 * still gets its own row of predictions and its own surprisal. Any edit (Backspace, a selection
 * typed over, a paste in the middle) is the same rewind-then-feed, so there is one path to get
 * right. Characters are counted in code points, as the server counts them.
 *
 * When the server cannot take back that far (rewind_limit), or its session is not where the
 * page thinks (a refused expect_offset after a dropped socket), the page starts over cleanly:
 * it resets the session and sends the whole text again.
 *
 * Plain script, no build step, no network beyond the page's own server.
 */
"use strict";

(() => {
  const TOP_K = 10; // candidates asked for per character (fewer for a model with a smaller vocabulary)
  const SHOWN = 8; // of which the panel shows at most this many (0% ones never)
  const CHUNK = 1024; // characters per message: a paste goes out in pieces, far below max_chunk_chars
  const COMPLETIONS = 3;
  const RETRY_MS = [200, 500, 1000, 2000, 4000]; // reconnect back-off, then every 4 s
  // Surprisal bins for the heat map, in bits (the last bin is open: 10 bits and more, or infinite).
  const BIN_EDGES = [1, 2, 3, 4, 5, 6, 8, 10];
  const BIN_LABELS = ["0", "1", "2", "3", "4", "5", "6", "8", "10+"];

  const $ = (id) => document.getElementById(id);
  const ui = {
    text: $("text"),
    backdrop: $("backdrop"),
    model: $("model"),
    bits: $("bits"),
    next: $("next"),
    completions: $("completions"),
    conn: $("conn"),
    offset: $("offset"),
    rewindLimit: $("rewind-limit"),
    session: $("session"),
    legend: $("legend-scale"),
    detail: $("detail"),
  };
  const token = new URLSearchParams(location.hash.slice(1)).get("token");

  const state = {
    model: null, // {name, version} of the session
    sessionId: "",
    confirmed: [], // the session's text, one code point per entry
    bits: [], // surprisal of each confirmed character, bits (null: infinite)
    rewindLimit: 0,
    topK: TOP_K, // what the session's model allows: at most its vocabulary (with the unknown slot)
    rows: [], // rows[i]: the prediction after confirmed[i], as [{ch, p}], likeliest first
    start: [], // the prediction before the first character, once the server has told it (a rewind to 0)
    hover: -1, // the character under the mouse, if any
    ws: null,
    open: false,
    attached: false, // the socket's first frame (naming the session) has gone out
    inflight: null, // the message awaiting its reply: {rewind, text, expect}
    busy: false, // a reset or a new session is under way: nothing is sent
    needs: "", // after the socket closed: "" resend, "reset" start over, "session" a new session
    retries: 0,
    generation: 0, // bumped when the page moves to another session: late answers are dropped
    completions: [], // [{text, prob, complete}] for completionsKey
    completionsKey: null,
    completing: false,
    fatal: "", // what went wrong, shown in the status line (until the socket is up again)
    rendered: [], // the backdrop's character spans, as [{ch, bin}]
  };

  // ---------------------------------------------------------------- the HTTP API

  class ApiError extends Error {
    constructor(status, error) {
      super(error.message || `HTTP ${status}`);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers };
    if (body !== undefined) init.body = JSON.stringify(body);
    const resp = await fetch(new URL(path, location.href), init);
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new ApiError(resp.status, data.error || {});
    return data;
  }

  function streamUrl() {
    const url = new URL("v1/stream", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.hash = "";
    if (token) url.searchParams.set("access_token", token);
    return url.href;
  }

  // ---------------------------------------------------------------- the session

  async function loadModels() {
    const data = await api("GET", "v1/models");
    ui.model.textContent = "";
    for (const entry of data.models) {
      const { name, version } = entry.model;
      const option = new Option(`${name} v${version}${entry.is_default ? " (default)" : ""}`);
      option.value = JSON.stringify({ name, version });
      option.disabled = entry.available === false;
      option.selected = Boolean(entry.is_default);
      ui.model.add(option);
    }
    return data.default_model;
  }

  /** A new session on model, the text so far sent to it again (a model switch, or the old one expired). */
  async function newSession(model) {
    const old = state.sessionId;
    state.generation += 1;
    const generation = state.generation;
    detach();
    forget();
    state.busy = true;
    render();
    if (old) api("DELETE", `v1/sessions/${encodeURIComponent(old)}`).catch(() => {});
    try {
      const data = await api("POST", "v1/sessions", { model });
      if (generation !== state.generation) return;
      state.sessionId = data.session.session_id;
      state.model = data.session.model;
      state.rewindLimit = data.session.rewind_limit;
      state.topK = Math.min(TOP_K, data.vocab.length + 1);
    } catch (err) {
      if (generation === state.generation) failed(err);
      return;
    } finally {
      if (generation === state.generation) state.busy = false;
    }
    connect();
  }

  /** Start over on the same session: reset it, and let pump send the whole text again. */
  async function startOver() {
    const generation = state.generation;
    state.busy = true;
    forget();
    render();
    try {
      await api("POST", `v1/sessions/${encodeURIComponent(state.sessionId)}/reset`);
    } catch (err) {
      if (generation !== state.generation) return;
      if (err.status === 404) return newSession(state.model); // expired meanwhile
      state.busy = false;
      return failed(err);
    }
    if (generation !== state.generation) return;
    state.busy = false;
    render();
    if (state.ws) pump();
    else connect();
  }

  /** What the page knew of the session's text: nothing, until the server says again. */
  function forget() {
    state.confirmed = [];
    state.bits = [];
    state.rows = [];
    state.start = [];
    state.rewindLimit = 0;
    state.inflight = null;
    state.completions = [];
    state.completionsKey = null;
  }

  function failed(err) {
    state.fatal = err instanceof ApiError && err.status === 401 ? "unauthorized: open the page as …/#token=YOUR_TOKEN" : String(err.message || err);
    render();
  }

  // ---------------------------------------------------------------- the socket

  function connect() {
    const ws = new WebSocket(streamUrl());
    state.ws = ws;
    state.attached = false;
    ws.onopen = () => {
      state.open = true;
      state.fatal = "";
      render();
      if (state.inflight) send(state.inflight); // its reply was lost: the same message again
      else pump();
    };
    ws.onmessage = (event) => {
      state.retries = 0;
      onReply(JSON.parse(event.data));
    };
    ws.onclose = (event) => onClose(ws, event);
  }

  function detach() {
    const ws = state.ws;
    state.ws = null;
    state.open = false;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      ws.close();
    }
  }

  function send(msg) {
    const frame = { top_k: state.topK, expect_offset: msg.expect };
    if (msg.rewind) frame.rewind = msg.rewind;
    if (msg.text) frame.text = msg.text;
    if (!state.attached) frame.session_id = state.sessionId;
    state.attached = true;
    state.inflight = msg;
    state.ws.send(JSON.stringify(frame));
    render();
  }

  /** Send what the textarea has and the session has not, if nothing else is under way. */
  function pump() {
    if (!state.open || state.inflight || state.busy) return;
    const target = Array.from(ui.text.value);
    const common = commonPrefix(state.confirmed, target);
    const rewind = state.confirmed.length - common;
    const text = target.slice(common, common + CHUNK).join("");
    if (!rewind && !text) {
      complete();
      return;
    }
    if (rewind > state.rewindLimit) {
      startOver();
      return;
    }
    send({ rewind, text, expect: state.confirmed.length });
  }

  function onReply(data) {
    if (data.error) {
      state.fatal = data.error.message; // the socket closes next, with the reason's code
      return;
    }
    const msg = state.inflight;
    state.inflight = null;
    state.rewindLimit = data.rewind_limit;
    if (data.rewound) {
      const at = data.rewound.offset;
      state.confirmed = state.confirmed.slice(0, at);
      state.bits = state.bits.slice(0, at);
      state.rows = state.rows.slice(0, at);
      const next = row(data.rewound.top_chars, data.rewound.top_prob, 0, data.rewound.top_chars.length);
      if (at === 0) state.start = next;
    }
    if (data.predictions) {
      const p = data.predictions;
      const at = p.start_offset;
      state.confirmed = state.confirmed.slice(0, at).concat(Array.from(msg.text));
      state.bits = state.bits.slice(0, at).concat(p.surprisal_bits);
      state.rows = state.rows.slice(0, at);
      for (let i = 0; i < p.count; i++) state.rows.push(row(p.top_chars, p.top_prob, i, p.top_k));
    }
    render();
    pump();
  }

  function onClose(ws, event) {
    if (ws !== state.ws) return;
    state.ws = null;
    state.open = false;
    const code = event.code;
    if (code === 4401 || code === 4400 || code === 4413) {
      state.fatal = `${state.fatal || "refused"} (close ${code}); reload the page to try again`;
      render();
      return;
    }
    // 4404: the session expired or was evicted. 4412: it is not where this page thinks (a message
    // applied before the drop, or a rewind past its limit). Anything else (a drop, a restart,
    // 4429, 4503): the same session, the unanswered message again.
    if (code === 4404) state.needs = "session";
    else if (code === 4412) state.needs = "reset";
    const delay = RETRY_MS[Math.min(state.retries, RETRY_MS.length - 1)];
    state.retries += 1;
    state.fatal = state.fatal || `connection lost (${code}); reconnecting`;
    render();
    setTimeout(reconnect, delay);
  }

  function reconnect() {
    const needs = state.needs;
    state.needs = "";
    if (needs === "session") newSession(state.model);
    else if (needs === "reset") {
      state.ws = null;
      startOver();
    } else connect();
  }

  // ---------------------------------------------------------------- completions

  async function complete() {
    const key = state.confirmed.join("");
    if (!key || key === state.completionsKey || state.completing) return;
    const generation = state.generation;
    state.completing = true;
    try {
      const data = await api("POST", "v1/complete", { session_id: state.sessionId, n: COMPLETIONS });
      if (generation === state.generation && data.offset === state.confirmed.length && key === state.confirmed.join("")) {
        state.completions = data.completions;
        state.completionsKey = key;
        render();
      }
    } catch (err) {
      // the next character asks again; a failed completion never stops the typing
    } finally {
      state.completing = false;
    }
    if (generation === state.generation && state.completionsKey !== state.confirmed.join("")) pump();
  }

  /** The likeliest completion that adds something (one that is empty means "the word ends here"). */
  function best() {
    if (state.completionsKey === null || state.completionsKey !== ui.text.value) return null;
    return state.completions.find((c) => c.text) || null;
  }

  function accept(text) {
    const end = ui.text.value.length;
    ui.text.focus();
    ui.text.setSelectionRange(end, end);
    ui.text.setRangeText(text, end, end, "end");
    onInput();
  }

  // ---------------------------------------------------------------- drawing

  function row(chars, probs, i, k) {
    const out = [];
    for (let j = i * k; j < (i + 1) * k; j++) out.push({ ch: chars[j], p: probs[j] });
    return out;
  }

  /** What the model expected at offset i (before the session's i-th character), as far as known. */
  function expected(i) {
    return (i ? state.rows[i - 1] : state.start) || [];
  }

  function commonPrefix(a, b) {
    const n = Math.min(a.length, b.length);
    let i = 0;
    while (i < n && a[i] === b[i]) i++;
    return i;
  }

  function bin(bits) {
    if (bits === null || bits === undefined) return BIN_EDGES.length; // infinite surprise
    let b = 0;
    while (b < BIN_EDGES.length && bits >= BIN_EDGES[b]) b++;
    return b;
  }

  function label(ch) {
    if (ch === " ") return "␣";
    if (ch === "\n") return "⏎";
    if (ch === "\t") return "⇥";
    return ch;
  }

  function fmtBits(bits) {
    return bits === null ? "∞" : bits.toFixed(1);
  }

  function pct(p) {
    return p >= 0.995 ? "100%" : p >= 0.095 ? `${Math.round(p * 100)}%` : `${(p * 100).toFixed(1)}%`;
  }

  /** The backdrop under the textarea: the same text, each scored character shaded by its bin. */
  function drawText() {
    const target = Array.from(ui.text.value);
    const common = commonPrefix(state.confirmed, target);
    const want = target.map((ch, i) => ({ ch, bin: i < common ? bin(state.bits[i]) : -1 }));
    const have = state.rendered;
    let same = 0;
    while (same < have.length && same < want.length && have[same].ch === want[same].ch && have[same].bin === want[same].bin) same++;
    const spans = ui.backdrop.children;
    while (spans.length > same) spans[spans.length - 1].remove();
    const fragment = document.createDocumentFragment();
    for (let i = same; i < want.length; i++) {
      const span = document.createElement("span");
      span.textContent = want[i].ch;
      if (want[i].bin >= 0) {
        span.className = `c b${want[i].bin}`;
        span.dataset.bits = fmtBits(state.bits[i]);
      } else span.className = "pending";
      fragment.append(span);
    }
    const ghost = document.createElement("span");
    ghost.className = "ghost";
    const suggestion = best();
    const atEnd = document.activeElement !== ui.text || ui.text.selectionStart === ui.text.value.length;
    ghost.textContent = (suggestion && atEnd ? suggestion.text : "") + "\u200b"; // keeps a last empty line's height
    fragment.append(ghost);
    ui.backdrop.append(fragment);
    state.rendered = want;
  }

  /** The character to explain: the one under the mouse, else the one before the caret. */
  function inspected() {
    if (state.hover >= 0) return state.hover;
    return Array.from(ui.text.value.slice(0, ui.text.selectionEnd)).length - 1;
  }

  /** One line under the editor: how surprising the inspected character was, and what the model
   * expected in its place, so a red square can be read without guessing. */
  function drawDetail() {
    for (const span of ui.backdrop.querySelectorAll(".inspect")) span.classList.remove("inspect");
    ui.detail.textContent = "";
    const i = inspected();
    if (i < 0 || i >= commonPrefix(state.confirmed, Array.from(ui.text.value))) {
      ui.detail.textContent = "Point at a character, or put the cursor after it, to see what the model expected there.";
      return;
    }
    const caretAtEnd = ui.text.selectionEnd === ui.text.value.length;
    if (state.hover >= 0 || !caretAtEnd) ui.backdrop.children[i].classList.add("inspect"); // not while typing on
    const ch = state.confirmed[i];
    const glyph = document.createElement("span");
    glyph.className = `cell c b${bin(state.bits[i])}`;
    glyph.textContent = label(ch);
    const said = document.createElement("span");
    said.textContent = ` ${fmtBits(state.bits[i])} bits of surprise`;
    ui.detail.append(glyph, said);
    const guesses = expected(i).filter((c) => c.p >= 0.0005).slice(0, 3);
    if (!guesses.length) return;
    ui.detail.append(" · the model expected ");
    for (const { ch: guess, p } of guesses) {
      const chip = document.createElement("span");
      chip.className = guess === ch ? "guess hit" : "guess";
      chip.textContent = `${label(guess)} ${pct(p)}`;
      ui.detail.append(chip);
    }
  }

  function drawNext() {
    ui.next.textContent = "";
    const shown = expected(state.confirmed.length).filter((c) => c.p >= 0.0005).slice(0, SHOWN);
    if (!shown.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = state.confirmed.length ? "…" : "Start typing to see the model's guesses.";
      ui.next.append(li);
      return;
    }
    const top = shown[0].p;
    for (const { ch, p } of shown) {
      const li = document.createElement("li");
      const glyph = document.createElement("span");
      glyph.className = ch === " " || ch === "\n" || ch === "\t" ? "glyph special" : "glyph";
      glyph.textContent = label(ch);
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${(100 * p) / top}%`;
      bar.append(fill);
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = pct(p);
      li.append(glyph, bar, prob);
      ui.next.append(li);
    }
  }

  /** The completions of the text the session has; while newer ones are on their way, the last
   * ones stay in view, faded and inert, so the panel does not flicker at every key. */
  function drawCompletions() {
    ui.completions.textContent = "";
    if (!ui.text.value) state.completions = [];
    const fresh = state.completionsKey === ui.text.value;
    ui.completions.classList.toggle("stale", !fresh);
    if (!state.completions.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = ui.text.value ? "…" : "Words the model would finish yours with.";
      ui.completions.append(li);
      return;
    }
    const first = best();
    for (const c of state.completions) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.disabled = !fresh || !c.text;
      if (c === first) button.className = "best";
      const words = document.createElement("span");
      words.className = "words";
      if (c.text) {
        const typed = document.createElement("span");
        typed.className = "typed";
        typed.textContent = /^\s/.test(c.text) ? "" : (ui.text.value.match(/\S{1,12}$/) || [""])[0]; // the word being finished
        words.append(typed, c.text.replaceAll(" ", "␣").replaceAll("\n", "⏎"));
      } else words.textContent = "(the word ends here)";
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = pct(c.prob);
      button.append(words, prob);
      button.addEventListener("click", () => accept(c.text));
      li.append(button);
      ui.completions.append(li);
    }
  }

  function drawStatus() {
    const n = state.bits.length;
    const total = state.bits.reduce((sum, b) => sum + (b === null ? Infinity : b), 0);
    ui.bits.textContent = n ? (Number.isFinite(total) ? (total / n).toFixed(2) : "∞") : "–";
    ui.offset.textContent = String(state.confirmed.length);
    ui.rewindLimit.textContent = String(state.rewindLimit);
    ui.session.textContent = state.sessionId ? `session ${state.sessionId.slice(0, 8)}` : "";
    ui.session.title = state.sessionId;
    const idle = state.open && !state.busy && !state.inflight && state.confirmed.join("") === ui.text.value;
    document.body.dataset.state = idle ? "idle" : "busy"; // for people (and the browser test) to wait on
    ui.conn.className = `conn ${state.open ? "up" : "down"}`;
    ui.conn.textContent = state.fatal || (state.open ? (state.model ? `${state.model.name} v${state.model.version}` : "connected") : "connecting…");
  }

  function render() {
    drawText();
    drawDetail();
    drawNext();
    drawCompletions();
    drawStatus();
  }

  function drawLegend() {
    BIN_LABELS.forEach((text, b) => {
      const swatch = document.createElement("span");
      swatch.className = `c b${b}`;
      swatch.textContent = text;
      ui.legend.append(swatch);
    });
  }

  // ---------------------------------------------------------------- events

  function onInput() {
    fit();
    render();
    pump();
  }

  /** The textarea grows with its text, so it and the backdrop never scroll apart. */
  function fit() {
    ui.text.style.height = "auto";
    ui.text.style.height = `${ui.text.scrollHeight}px`;
  }

  ui.text.addEventListener("input", onInput);
  ui.text.addEventListener("keydown", (event) => {
    if (event.key !== "Tab" || event.shiftKey || event.altKey || event.ctrlKey || event.metaKey) return;
    const suggestion = best();
    if (!suggestion || ui.text.selectionStart !== ui.text.value.length) return;
    event.preventDefault();
    accept(suggestion.text);
  });
  for (const event of ["select", "click", "keyup", "focus", "blur"]) {
    ui.text.addEventListener(event, () => {
      drawText(); // the suggestion shows only with the caret at the end
      drawDetail(); // the character before the caret is explained
    });
  }
  ui.text.addEventListener("mousemove", (event) => {
    const under = document.elementsFromPoint(event.clientX, event.clientY);
    const span = under.find((el) => el.parentElement === ui.backdrop && el.classList.contains("c"));
    const i = span ? Array.prototype.indexOf.call(ui.backdrop.children, span) : -1;
    if (i !== state.hover) {
      state.hover = i;
      drawDetail();
    }
  });
  ui.text.addEventListener("mouseleave", () => {
    state.hover = -1;
    drawDetail();
  });
  ui.model.addEventListener("change", () => newSession(JSON.parse(ui.model.value)));
  window.addEventListener("resize", fit);

  drawLegend();
  fit();
  render();
  loadModels()
    .then((model) => newSession(model))
    .catch(failed);
})();
