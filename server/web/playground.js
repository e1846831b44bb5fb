/*
 * nextchar playground: type, and see what the model expects next.
 *
 * A `Lane` is one session on the server and one WebSocket (/v1/stream) on it. The session's
 * text is mirrored as `confirmed` (the characters the server has consumed, as far as its
 * replies have told us, with the surprisal of each); the textarea holds what the writer wants.
 * One message is in flight at a time: `pump` sends the difference between the two (take back the
 * characters after their common prefix, then feed the rest), and its reply moves `confirmed` on.
 * Keystrokes typed while a message is in flight go out together in the next one; every character
 * still gets its own row of predictions and its own surprisal. Any edit (Backspace, a selection
 * typed over, a paste in the middle) is the same rewind-then-feed, so there is one path to get
 * right. Characters are counted in code points, as the server counts them.
 *
 * When the server cannot take back that far (rewind_limit), or its session is not where the
 * page thinks (a refused expect_offset after a dropped socket), the lane starts over cleanly:
 * it resets the session and sends the whole text again.
 *
 * Adaptation. With "adapt" on, the page keeps two lanes on the same model, both following the
 * one textarea: `main`, an adaptive session (its predictions, heat map and completions are what
 * the page shows), and `twin`, a static session whose only use is the bits/char beside the
 * adapted one. Since each lane converges on the textarea by itself, Backspace, Tab, a paste, a
 * dropped socket or a start-over keep both on the same text with no code of their own. Turning
 * adaptation on opens an adaptive session and feeds it the text (the static session carries on
 * as the twin); turning it off closes the adaptive session and the twin becomes `main`. The text
 * is the textarea's throughout: never retyped, never lost.
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
    adapt: $("adapt"),
    adaptNote: $("adapt-note"),
    bits: $("bits"),
    bitsLabel: $("bits-label"),
    bitsStatic: $("bits-static"),
    gain: $("gain"),
    steps: $("steps"),
    next: $("next"),
    completions: $("completions"),
    conn: $("conn"),
    offset: $("offset"),
    rewindLimit: $("rewind-limit"),
    session: $("session"),
    twinSession: $("twin-session"),
    legend: $("legend-scale"),
    legendNote: $("legend-note"),
    detail: $("detail"),
  };
  const token = new URLSearchParams(location.hash.slice(1)).get("token");

  const view = {
    main: null, // the Lane the page shows
    twin: null, // with adaptation on, the static Lane beside it (else null)
    steps: { session: "", offset: -1, count: 0, resets: 0 }, // main's adaptation steps, as last asked
    asking: false, // a GetSession for them is under way
    hover: -1, // the character under the mouse, if any
    completions: [], // [{text, prob, complete}] for completionsKey
    completionsKey: null,
    completing: false,
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

  function describe(err) {
    return err instanceof ApiError && err.status === 401 ? "unauthorized: open the page as …/#token=YOUR_TOKEN" : String(err.message || err);
  }

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

  // ---------------------------------------------------------------- a lane: one session, one socket

  class Lane {
    /** adapt: whether the session learns from its text; null asks for the server's default (and
     * is replaced by what the new session reports). */
    constructor(adapt) {
      this.adapt = adapt;
      this.model = null; // {name, version} of the session
      this.sessionId = "";
      this.topK = TOP_K; // what the session's model allows: at most its vocabulary (with the unknown slot)
      this.ws = null;
      this.open = false;
      this.attached = false; // the socket's first frame (naming the session) has gone out
      this.busy = false; // a reset or a new session is under way: nothing is sent
      this.needs = ""; // after the socket closed: "" resend, "reset" start over, "session" a new session
      this.retries = 0;
      this.generation = 0; // bumped when the lane moves to another session: late answers are dropped
      this.fatal = ""; // what went wrong, shown in the status line (until the socket is up again)
      this.closed = false;
      this.forget();
    }

    /** What the lane knew of the session's text: nothing, until the server says again. */
    forget() {
      this.confirmed = []; // the session's text, one code point per entry
      this.bits = []; // surprisal of each confirmed character, bits (null: infinite)
      this.rows = []; // rows[i]: the prediction after confirmed[i], as [{ch, p}], likeliest first
      this.start = []; // the prediction before the first character, once the server has told it (a rewind to 0)
      this.rewindLimit = 0;
      this.inflight = null; // the message awaiting its reply: {rewind, text, expect}
    }

    /** The session has consumed exactly the textarea's text, and nothing is under way. */
    idle() {
      return this.open && !this.busy && !this.inflight && this.confirmed.join("") === ui.text.value;
    }

    /** How many of the textarea's characters the lane has scores for. */
    scored() {
      return commonPrefix(this.confirmed, Array.from(ui.text.value));
    }

    /** A new session on model, the text so far sent to it again (the page's first, a model
     * switch, or the old one expired). Resolves to true when the server made one, false when it
     * refused, null when the lane moved on meanwhile (closed, or another begin). */
    async begin(model) {
      const old = this.sessionId;
      const generation = this.moveOn();
      this.busy = true;
      changed(this);
      if (old) api("DELETE", `v1/sessions/${encodeURIComponent(old)}`).catch(() => {});
      const body = { model };
      if (this.adapt !== null) body.adapt = this.adapt;
      try {
        const data = await api("POST", "v1/sessions", body);
        if (generation !== this.generation) {
          api("DELETE", `v1/sessions/${encodeURIComponent(data.session.session_id)}`).catch(() => {}); // nobody's
          return null;
        }
        this.sessionId = data.session.session_id;
        this.model = data.session.model;
        this.rewindLimit = data.session.rewind_limit;
        this.topK = Math.min(TOP_K, data.vocab.length + 1);
        const asked = this.adapt;
        this.adapt = Boolean(data.session.adaptive);
        if (asked === null) defaultKnown(this);
      } catch (err) {
        if (generation !== this.generation) return null;
        this.failed(err);
        return false;
      } finally {
        if (generation === this.generation) this.busy = false;
      }
      this.connect();
      return true;
    }

    /** Start over on the same session: reset it, and let pump send the whole text again. */
    async startOver() {
      const generation = this.generation;
      this.busy = true;
      this.forget();
      changed(this);
      try {
        await api("POST", `v1/sessions/${encodeURIComponent(this.sessionId)}/reset`);
      } catch (err) {
        if (generation !== this.generation) return;
        if (err.status === 404) return this.begin(this.model); // expired meanwhile
        this.busy = false;
        return this.failed(err);
      }
      if (generation !== this.generation) return;
      this.busy = false;
      changed(this);
      if (this.ws) this.pump();
      else this.connect();
    }

    /** Close the session for good (adaptation turned off): its socket, and the session itself. */
    close() {
      this.moveOn();
      this.closed = true;
      if (this.sessionId) api("DELETE", `v1/sessions/${encodeURIComponent(this.sessionId)}`).catch(() => {});
    }

    /** Leave the current session behind: its socket closed, its late answers dropped. */
    moveOn() {
      this.generation += 1;
      this.detach();
      this.forget();
      return this.generation;
    }

    failed(err) {
      this.fatal = describe(err);
      changed(this);
    }

    connect() {
      const ws = new WebSocket(streamUrl());
      this.ws = ws;
      this.attached = false;
      ws.onopen = () => {
        this.open = true;
        this.fatal = "";
        changed(this);
        if (this.inflight) this.send(this.inflight); // its reply was lost: the same message again
        else this.pump();
      };
      ws.onmessage = (event) => {
        this.retries = 0;
        this.onReply(JSON.parse(event.data));
      };
      ws.onclose = (event) => this.onClose(ws, event);
    }

    detach() {
      const ws = this.ws;
      this.ws = null;
      this.open = false;
      if (ws) {
        ws.onclose = ws.onmessage = ws.onopen = null;
        ws.close();
      }
    }

    send(msg) {
      const frame = { top_k: this.topK, expect_offset: msg.expect };
      if (msg.rewind) frame.rewind = msg.rewind;
      if (msg.text) frame.text = msg.text;
      if (!this.attached) frame.session_id = this.sessionId;
      this.attached = true;
      this.inflight = msg;
      this.ws.send(JSON.stringify(frame));
      changed(this);
    }

    /** Send what the textarea has and the session has not, if nothing else is under way. */
    pump() {
      if (!this.open || this.inflight || this.busy) return;
      const target = Array.from(ui.text.value);
      const common = commonPrefix(this.confirmed, target);
      const rewind = this.confirmed.length - common;
      const text = target.slice(common, common + CHUNK).join("");
      if (!rewind && !text) {
        settled(this);
        return;
      }
      if (rewind > this.rewindLimit) {
        this.startOver();
        return;
      }
      this.send({ rewind, text, expect: this.confirmed.length });
    }

    onReply(data) {
      if (data.error) {
        this.fatal = data.error.message; // the socket closes next, with the reason's code
        return;
      }
      const msg = this.inflight;
      this.inflight = null;
      this.rewindLimit = data.rewind_limit;
      if (data.rewound) {
        const at = data.rewound.offset;
        this.confirmed = this.confirmed.slice(0, at);
        this.bits = this.bits.slice(0, at);
        this.rows = this.rows.slice(0, at);
        const next = row(data.rewound.top_chars, data.rewound.top_prob, 0, data.rewound.top_chars.length);
        if (at === 0) this.start = next;
      }
      if (data.predictions) {
        const p = data.predictions;
        const at = p.start_offset;
        this.confirmed = this.confirmed.slice(0, at).concat(Array.from(msg.text));
        this.bits = this.bits.slice(0, at).concat(p.surprisal_bits);
        this.rows = this.rows.slice(0, at);
        for (let i = 0; i < p.count; i++) this.rows.push(row(p.top_chars, p.top_prob, i, p.top_k));
      }
      changed(this);
      this.pump();
    }

    onClose(ws, event) {
      if (ws !== this.ws) return;
      this.ws = null;
      this.open = false;
      const code = event.code;
      if (code === 4401 || code === 4400 || code === 4413) {
        this.fatal = `${this.fatal || "refused"} (close ${code}); reload the page to try again`;
        changed(this);
        return;
      }
      // 4404: the session expired or was evicted. 4412: it is not where this page thinks (a message
      // applied before the drop, or a rewind past its limit). Anything else (a drop, a restart,
      // 4429, 4503): the same session, the unanswered message again.
      if (code === 4404) this.needs = "session";
      else if (code === 4412) this.needs = "reset";
      const delay = RETRY_MS[Math.min(this.retries, RETRY_MS.length - 1)];
      this.retries += 1;
      this.fatal = this.fatal || `connection lost (${code}); reconnecting`;
      changed(this);
      const generation = this.generation;
      setTimeout(() => {
        if (generation === this.generation) this.reconnect();
      }, delay);
    }

    reconnect() {
      const needs = this.needs;
      this.needs = "";
      if (needs === "session") this.begin(this.model);
      else if (needs === "reset") {
        this.ws = null;
        this.startOver();
      } else this.connect();
    }
  }

  /** Every lane, the shown one first. */
  function lanes() {
    return view.twin ? [view.main, view.twin] : [view.main];
  }

  /** A lane's session or text moved: redraw (a closed lane has nothing to show). */
  function changed(lane) {
    if (!lane.closed) render();
  }

  /** A lane has caught up with the textarea: the shown one fetches what depends on its text. */
  function settled(lane) {
    if (lane !== view.main) return;
    complete();
    askSteps();
  }

  // ---------------------------------------------------------------- adaptation on and off

  /** The page's first session asks for the server's default on adaptation: the toggle shows what
   * it got (and is usable from then on), and an adaptive one gets its twin. */
  function defaultKnown(lane) {
    if (lane !== view.main) return;
    ui.adapt.disabled = false;
    ui.adapt.checked = lane.adapt;
    if (lane.adapt && !view.twin) startTwin();
  }

  /** A static session beside the adaptive one, on its model, fed the same text from the start. */
  function startTwin() {
    view.twin = new Lane(false);
    view.twin.begin(view.main.model);
  }

  /** The toggle: on, a new adaptive session is fed the text and the static one becomes its twin;
   * off, the adaptive one is closed and the static twin is shown again, as far as it had got. */
  async function setAdapt(on) {
    ui.adaptNote.textContent = "";
    if (on === Boolean(view.twin)) return;
    if (!on) {
      const adaptive = view.main;
      view.main = view.twin;
      view.twin = null;
      adaptive.close();
      resetShown();
      return;
    }
    const adaptive = new Lane(true);
    view.twin = view.main;
    view.main = adaptive;
    resetShown();
    const made = await adaptive.begin(view.twin.model);
    if (made !== false || adaptive !== view.main) return; // made; or turned off, or another model, meanwhile
    // refused (past the server's max_adaptive_sessions, say): say so, and stay static
    ui.adaptNote.textContent = `not available: ${adaptive.fatal}`;
    adaptive.close();
    view.main = view.twin;
    view.twin = null;
    ui.adapt.checked = false;
    resetShown();
  }

  /** The shown session changed: what was drawn for the old one goes (its completions, steps). */
  function resetShown() {
    view.completions = [];
    view.completionsKey = null;
    view.steps = { session: "", offset: -1, count: 0, resets: 0 };
    render();
    view.main.pump(); // caught up already (adaptation turned off): its completions again
  }

  /** Another model: both lanes move to it, the text sent to each again. */
  function switchModel(model) {
    view.completions = [];
    view.completionsKey = null;
    for (const lane of lanes()) lane.begin(model);
  }

  /** How many steps the shown session's adapter has taken: the session's own count, asked when
   * its text has settled (no stream reply carries it), once per offset. */
  async function askSteps() {
    const lane = view.main;
    const known = view.steps.session === lane.sessionId && view.steps.offset === lane.confirmed.length;
    if (!lane.adapt || !lane.sessionId || view.asking || known) return;
    view.asking = true;
    let answered = false;
    try {
      const { session } = await api("GET", `v1/sessions/${encodeURIComponent(lane.sessionId)}`);
      answered = lane === view.main && session.session_id === lane.sessionId;
      if (answered) {
        view.steps = { session: session.session_id, offset: session.offset, count: session.adapt_steps, resets: session.adapt_resets };
        drawScore();
      }
    } catch (err) {
      // the next settled text asks again; the count is never worth an error
    } finally {
      view.asking = false;
    }
    if (answered && lane.idle()) askSteps(); // the text settled elsewhere while this was under way
  }

  // ---------------------------------------------------------------- completions

  /** The shown session's completions of its text (an adaptive session's come from its adapter). */
  async function complete() {
    const lane = view.main;
    const key = lane.confirmed.join("");
    if (!key || key === view.completionsKey || view.completing) return;
    const generation = lane.generation;
    const current = () => lane === view.main && generation === lane.generation;
    view.completing = true;
    try {
      const data = await api("POST", "v1/complete", { session_id: lane.sessionId, n: COMPLETIONS });
      if (current() && data.offset === lane.confirmed.length && key === lane.confirmed.join("")) {
        view.completions = data.completions;
        view.completionsKey = key;
        render();
      }
    } catch (err) {
      // the next character asks again; a failed completion never stops the typing
    } finally {
      view.completing = false;
    }
    if (view.completionsKey !== view.main.confirmed.join("")) view.main.pump(); // the text moved on meanwhile
  }

  /** The likeliest completion that adds something (one that is empty means "the word ends here"). */
  function best() {
    if (view.completionsKey === null || view.completionsKey !== ui.text.value) return null;
    return view.completions.find((c) => c.text) || null;
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

  /** What the model expected at offset i (before the shown session's i-th character), as far as known. */
  function expected(i) {
    return (i ? view.main.rows[i - 1] : view.main.start) || [];
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

  /** The mean of bits' first n surprisals (null: infinite), as shown; "–" for none. */
  function meanBits(bits, n) {
    if (!n) return "–";
    const total = bits.slice(0, n).reduce((sum, b) => sum + (b === null ? Infinity : b), 0);
    return Number.isFinite(total) ? (total / n).toFixed(2) : "∞";
  }

  function pct(p) {
    return p >= 0.995 ? "100%" : p >= 0.095 ? `${Math.round(p * 100)}%` : `${(p * 100).toFixed(1)}%`;
  }

  /** The backdrop under the textarea: the same text, each scored character shaded by its bin. */
  function drawText() {
    const { bits } = view.main;
    const common = view.main.scored();
    const want = Array.from(ui.text.value, (ch, i) => ({ ch, bin: i < common ? bin(bits[i]) : -1 }));
    const have = view.rendered;
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
        span.dataset.bits = fmtBits(bits[i]);
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
    view.rendered = want;
  }

  /** The character to explain: the one under the mouse, else the one before the caret. */
  function inspected() {
    if (view.hover >= 0) return view.hover;
    return Array.from(ui.text.value.slice(0, ui.text.selectionEnd)).length - 1;
  }

  /** One line under the editor: how surprising the inspected character was (and, adapting, how
   * surprising it was to the model alone), and what the model expected in its place, so a red
   * square can be read without guessing. */
  function drawDetail() {
    for (const span of ui.backdrop.querySelectorAll(".inspect")) span.classList.remove("inspect");
    ui.detail.textContent = "";
    const { confirmed, bits } = view.main;
    const i = inspected();
    if (i < 0 || i >= view.main.scored()) {
      ui.detail.textContent = "Point at a character, or put the cursor after it, to see what the model expected there.";
      return;
    }
    const caretAtEnd = ui.text.selectionEnd === ui.text.value.length;
    if (view.hover >= 0 || !caretAtEnd) ui.backdrop.children[i].classList.add("inspect"); // not while typing on
    const ch = confirmed[i];
    const glyph = document.createElement("span");
    glyph.className = `cell c b${bin(bits[i])}`;
    glyph.textContent = label(ch);
    const said = document.createElement("span");
    said.textContent = ` ${fmtBits(bits[i])} bits of surprise`;
    ui.detail.append(glyph, said);
    if (view.twin && i < view.twin.scored()) {
      const alone = document.createElement("span");
      alone.className = "alone";
      alone.textContent = `${fmtBits(view.twin.bits[i])} static`;
      ui.detail.append(alone);
    }
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
    const shown = expected(view.main.confirmed.length).filter((c) => c.p >= 0.0005).slice(0, SHOWN);
    if (!shown.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = view.main.confirmed.length ? "…" : "Start typing to see the model's guesses.";
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
    if (!ui.text.value) view.completions = [];
    const fresh = view.completionsKey === ui.text.value;
    ui.completions.classList.toggle("stale", !fresh);
    if (!view.completions.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = ui.text.value ? "…" : "Words the model would finish yours with.";
      ui.completions.append(li);
      return;
    }
    const first = best();
    for (const c of view.completions) {
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

  /** The running bits/char; adapting, the static twin's beside the adapted one, both over the
   * characters both have scored (the twin may be a message behind), and the adapter's steps. */
  function drawScore() {
    const { main, twin } = view;
    document.body.classList.toggle("adapting", Boolean(twin));
    ui.legendNote.textContent = twin ? "bits per character: how unexpected each one was to the adapted model" : "bits per character: how unexpected each one was to the model";
    if (!twin) {
      ui.bits.textContent = meanBits(main.bits, main.scored());
      ui.bitsLabel.textContent = "bits/char";
      return;
    }
    const n = Math.min(main.scored(), twin.scored());
    const adapted = meanBits(main.bits, n);
    const alone = meanBits(twin.bits, n);
    ui.bits.textContent = adapted;
    ui.bitsLabel.textContent = "adapted";
    ui.bitsStatic.textContent = alone;
    const change = Number(adapted) / Number(alone) - 1; // NaN or infinite when either is not a number
    ui.gain.textContent = Number.isFinite(change) ? `${change < 0 ? "−" : "+"}${Math.abs(100 * change).toFixed(0)}%` : "–";
    ui.gain.className = change < -0.005 ? "better" : change > 0.005 ? "worse" : "";
    const { count, resets } = view.steps.session === main.sessionId ? view.steps : { count: 0, resets: 0 };
    ui.steps.textContent = `${count} step${count === 1 ? "" : "s"}${resets ? `, ${resets} reset` : ""}`;
  }

  function drawStatus() {
    const { main, twin } = view;
    ui.offset.textContent = String(main.confirmed.length);
    ui.rewindLimit.textContent = String(main.rewindLimit);
    ui.session.textContent = main.sessionId ? `session ${main.sessionId.slice(0, 8)}` : "";
    ui.session.title = main.sessionId;
    ui.twinSession.textContent = twin && twin.sessionId ? `static twin ${twin.sessionId.slice(0, 8)}` : "";
    ui.twinSession.title = twin ? twin.sessionId : "";
    const idle = lanes().every((lane) => lane.idle());
    document.body.dataset.state = idle ? "idle" : "busy"; // for people (and the browser test) to wait on
    const open = lanes().every((lane) => lane.open);
    const fatal = lanes().map((lane) => lane.fatal).find(Boolean);
    ui.conn.className = `conn ${open ? "up" : "down"}`;
    ui.conn.textContent = fatal || (open ? (main.model ? `${main.model.name} v${main.model.version}` : "connected") : "connecting…");
  }

  function render() {
    drawText();
    drawDetail();
    drawNext();
    drawCompletions();
    drawScore();
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
    for (const lane of lanes()) lane.pump();
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
    if (i !== view.hover) {
      view.hover = i;
      drawDetail();
    }
  });
  ui.text.addEventListener("mouseleave", () => {
    view.hover = -1;
    drawDetail();
  });
  ui.model.addEventListener("change", () => switchModel(JSON.parse(ui.model.value)));
  ui.adapt.addEventListener("change", () => {
    ui.text.focus(); // back to the writing: the switch is flipped mid-text, and typing goes on
    setAdapt(ui.adapt.checked);
  });
  window.addEventListener("resize", fit);

  drawLegend();
  fit();
  view.main = new Lane(null); // the server's default on adaptation: defaultKnown sets the toggle
  render();
  loadModels()
    .then((model) => view.main.begin(model))
    .catch((err) => view.main.failed(err));
})();
