"""The playground (server/web, served at / on the HTTP port) in a real headless browser.

Debian's chromium, driven by Playwright from pip and launched with ``executable_path``
(Playwright's own browser download is never used); where no chromium is installed the
tests skip and say so (``.ci/run`` installs it). One real server process for the module,
on an HTTP port of its own, with a bearer token that the page takes from its URL
fragment; its model dir holds the shipped default model and a second one, ``notebook``
(the "hello world" RNN), for the model picker. Each test opens a fresh page, so a session
of its own. What the page shows is checked against what the server answers over HTTP for
the same text from a fresh state: the page must show the server's numbers, character by
character, however the text got there (typing, Backspace, Tab, a model switch, a drop).

``NEXTCHAR_SCREENSHOTS=1`` also writes docs/playground.png and docs/playground-phone.png
(adaptation on: the README shows it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nextchar.core.default_model import load_default_model
from nextchar.server.registry import DEFAULT_NAME, Registry
from playwright.sync_api import Browser, Page, WebSocket, sync_playwright
from server_harness import DroppingProxy, ServerProcess, train_notebook_model

TOKEN = "playground-secret"
REWIND_CHARS = 16  # small, so a long edit is past the session's reach and the page starts over
SENTENCE = "To be, or not to be, that is the question"
DOCS = Path(__file__).resolve().parents[1] / "docs"
SHOWN = {" ": "␣", "\n": "⏎", "\t": "⇥"}  # how the page labels characters that do not show


CHROMIUM = os.environ.get("NEXTCHAR_CHROMIUM") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (apt-get install chromium; .ci/run installs it)"
)


class PlaygroundServer(ServerProcess):
    """``nextchar serve`` with its HTTP port too; ``url`` is the HTTP side's base URL."""

    def __init__(self, model_dir: Path, *args: str) -> None:
        super().__init__(
            model_dir, "--http-port", "0", "--token", TOKEN, "--rewind-chars", str(REWIND_CHARS), *args
        )
        self.url = self.http_url
        self.model_dir = model_dir

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def predict(self, text: str, model: str = DEFAULT_NAME, adapt: bool = False) -> dict[str, Any]:
        """The predictions for text from a fresh state of model, in no session (adapting to the
        text as it goes, as an adaptive session would, if asked)."""
        body = {"text": text, "top_k": 8, "model": {"name": model}, "adapt": adapt}
        predictions: dict[str, Any] = self.call("POST", "/v1/predict", body)["predictions"]
        return predictions

    def session(self, session_id: str | None) -> dict[str, Any]:
        info: dict[str, Any] = self.call("GET", f"/v1/sessions/{session_id}")["session"]
        return info


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlaygroundServer]:
    model_dir = tmp_path_factory.mktemp("models")
    registry = Registry(model_dir)
    registry.load_all()
    shipped = load_default_model()
    registry.install(DEFAULT_NAME, shipped.model, history=shipped.history, summary=shipped.summary)
    notebook, history, summary = train_notebook_model()
    registry.register("notebook", notebook, history=history, summary=summary)
    process = PlaygroundServer(model_dir)
    yield process
    process.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


def open_page(browser: Browser, url: str, frames: list[dict[str, Any]] | None = None, **context: Any) -> Page:
    """The playground at url, connected and ready; frames, if given, gets every frame the page
    sends on its WebSockets, decoded."""
    page = browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **context}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    if frames is not None:
        sent = frames

        def watch(ws: WebSocket) -> None:
            ws.on("framesent", lambda payload: sent.append(json.loads(payload)))

        page.on("websocket", watch)
    page.goto(f"{url}/#token={TOKEN}")
    page.wait_for_selector("#conn.up")
    wait_idle(page, 0)
    assert not errors
    return page


@pytest.fixture
def frames() -> list[dict[str, Any]]:
    """What the test's page sends on its WebSockets."""
    return []


@pytest.fixture
def page(browser: Browser, server: PlaygroundServer, frames: list[dict[str, Any]]) -> Iterator[Page]:
    opened = open_page(browser, server.url, frames)
    yield opened
    opened.context.close()


def wait_idle(page: Page, offset: int) -> None:
    """Until the session has consumed exactly the textarea's text, offset characters of it."""
    page.wait_for_function(
        "n => document.body.dataset.state === 'idle' && document.getElementById('offset').textContent === String(n)",
        arg=offset,
        timeout=15_000,
    )


def type_each(page: Page, text: str, start: int = 0) -> list[list[str]]:
    """Type text one key at a time, waiting for each character's answer: what the next-character
    panel showed after each (the labels of its candidates, likeliest first)."""
    shown = []
    for i, ch in enumerate(text, start + 1):
        if ch == "\n":
            page.keyboard.press("Enter")
        else:
            page.keyboard.type(ch)
        wait_idle(page, i)
        shown.append(next_shown(page))
    return shown


def next_shown(page: Page) -> list[str]:
    return page.locator("#next li:not(.empty) .glyph").all_text_contents()


def expected_next(predictions: dict[str, Any], row: int) -> list[str]:
    """The labels the page must show for row: the candidates it would not print as 0%, at most 8."""
    k = predictions["top_k"]
    pairs = zip(
        predictions["top_chars"][row * k : (row + 1) * k],
        predictions["top_prob"][row * k : (row + 1) * k],
        strict=True,
    )
    return [SHOWN.get(ch, ch) for ch, p in pairs if p >= 0.0005][:8]


def heat(page: Page) -> list[tuple[str, str, str]]:
    """The shaded text under the textarea: (character, its bits as shown, its background colour)."""
    cells: list[tuple[str, str, str]] = page.eval_on_selector_all(
        "#backdrop span.c",
        "spans => spans.map(s => [s.textContent, s.dataset.bits, getComputedStyle(s).backgroundColor])",
    )
    return cells


def bits_shown(surprisal: list[float | None]) -> list[str]:
    return ["∞" if b is None else f"{b:.1f}" for b in surprisal]


def assert_page_matches_server(
    page: Page, server: PlaygroundServer, model: str = DEFAULT_NAME, adapt: bool = False
) -> None:
    """The page's text, heat map and next-character panel are the server's for that text, fed fresh
    (to an adaptive session, if adapt)."""
    text = page.input_value("#text")
    predictions = server.predict(text, model, adapt)
    cells = heat(page)
    assert "".join(ch for ch, _, _ in cells) == text
    assert [bits for _, bits, _ in cells] == bits_shown(predictions["surprisal_bits"])
    assert next_shown(page) == expected_next(predictions, len(text) - 1)


def point_at(page: Page, i: int) -> None:
    """Move the mouse over the text's i-th character, and wait for the page to explain it."""
    box = page.locator("#backdrop span").nth(i).bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#backdrop span.inspect")


def luminance(css: str) -> float:
    """Relative brightness of a computed CSS colour; a transparent one shows the white editor."""
    r, g, b, *alpha = (float(x) for x in re.findall(r"[\d.]+", css))
    if alpha and alpha[0] == 0:
        return 1.0
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


# ---------------------------------------------------------------- typing


def test_every_character_shows_the_servers_predictions_and_surprisal(
    page: Page, server: PlaygroundServer
) -> None:
    shown = type_each(page, SENTENCE)

    predictions = server.predict(SENTENCE)
    assert shown == [expected_next(predictions, i) for i in range(len(SENTENCE))]
    assert all(shown)  # every character, a non-empty panel
    assert_page_matches_server(page, server)
    bits = [b for b in predictions["surprisal_bits"] if b is not None]
    assert page.text_content("#bits") == f"{sum(bits) / len(bits):.2f}"


def test_heat_map_colours_follow_surprisal(page: Page, server: PlaygroundServer) -> None:
    text = "To be, or not to be, Qx"  # "Qx" surprises a model of English; "o be" does not
    type_each(page, text)

    cells = heat(page)
    ordered = sorted(cells, key=lambda cell: float(cell[1].replace("∞", "inf")))
    calm, surprised = ordered[0], ordered[-1]
    assert float(calm[1]) < 1 < 6 < float(surprised[1].replace("∞", "inf"))
    assert calm[2] != surprised[2]
    assert luminance(surprised[2]) < 0.5 < luminance(calm[2])
    # the legend shows the colour the surprising character got
    legend = page.eval_on_selector_all(
        "#legend-scale span", "spans => spans.map(s => getComputedStyle(s).backgroundColor)"
    )
    assert surprised[2] in legend


def test_pointing_at_a_character_explains_it(page: Page, server: PlaygroundServer) -> None:
    text = "To be, or not to be, Qx"
    type_each(page, text)
    predictions = server.predict(text)

    i = text.index("Q")
    point_at(page, i)
    assert "inspect" in (page.locator("#backdrop span").nth(i).get_attribute("class") or "").split()
    assert page.text_content("#detail .cell") == "Q"
    assert f"{predictions['surprisal_bits'][i]:.1f} bits" in (page.text_content("#detail") or "")
    guesses = [g.split(" ")[0] for g in page.locator("#detail .guess").all_text_contents()]
    assert guesses == expected_next(predictions, i - 1)[:3]  # what the model expected after "be, "

    page.mouse.move(0, 0)  # away: the character before the caret (the last one) is explained
    page.wait_for_function("document.querySelector('#detail .cell')?.textContent === 'x'")


# ---------------------------------------------------------------- Backspace


def test_backspace_rewinds_the_session(
    page: Page, server: PlaygroundServer, frames: list[dict[str, Any]]
) -> None:
    shown = type_each(page, "To be, or not to be")

    page.keyboard.press("Backspace")
    wait_idle(page, len("To be, or not to b"))
    assert next_shown(page) == shown[-2]  # what the model expected after "...to b", again
    assert frames[-1] == {"top_k": 10, "expect_offset": 19, "rewind": 1}
    for _ in range(4):
        page.keyboard.press("Backspace")
    wait_idle(page, len("To be, or not "))
    assert_page_matches_server(page, server)
    session = server.call("GET", f"/v1/sessions/{page.get_attribute('#session', 'title')}")["session"]
    assert (session["offset"], session["rewind_limit"]) == (14, 14)
    assert page.text_content("#rewind-limit") == "14"

    type_each(page, "two", start=len("To be, or not "))
    assert_page_matches_server(page, server)


def test_an_edit_past_the_rewind_limit_starts_over(page: Page, server: PlaygroundServer) -> None:
    resets: list[str] = []
    page.on("request", lambda r: resets.append(r.url) if r.url.endswith("/reset") else None)
    type_each(page, SENTENCE)
    assert int(page.text_content("#rewind-limit") or 0) < len(SENTENCE) - 2

    page.keyboard.press("Home")  # change the third character: the whole rest must be fed again
    for _ in range(2):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Delete")
    page.keyboard.type("e")
    wait_idle(page, len(SENTENCE))

    edited = "Toebe, or not to be, that is the question"
    assert page.input_value("#text") == edited
    assert len(resets) == 1
    assert_page_matches_server(page, server)

    more = ": whether 'tis nobler in the mind"
    page.keyboard.press("End")
    type_each(page, more, start=len(edited))
    assert int(page.text_content("#rewind-limit") or 0) < len(edited + more)
    page.keyboard.press("Control+a")  # all of it, at once: after the reset, nothing left to send
    page.keyboard.press("Delete")
    wait_idle(page, 0)
    assert len(resets) == 2 and heat(page) == []


# ---------------------------------------------------------------- completions


def test_tab_accepts_the_best_completion(page: Page, server: PlaygroundServer) -> None:
    prefix = "To be, or not to b"
    page.keyboard.type(prefix)
    wait_idle(page, len(prefix))
    page.wait_for_selector("#completions button.best")

    offered = server.call("POST", "/v1/complete", {"prime_text": prefix, "n": 3})["completions"]
    assert len(page.locator("#completions button").all()) == len(offered) == 3
    best = next(c["text"] for c in offered if c["text"])
    assert page.text_content("#completions button.best .words") == "b" + best.replace(
        " ", "␣"
    )  # the word it finishes
    page.keyboard.press("Tab")
    wait_idle(page, len(prefix + best))

    assert page.input_value("#text") == prefix + best
    assert_page_matches_server(page, server)
    assert page.evaluate("document.activeElement.id") == "text"  # Tab did not move the focus


# ---------------------------------------------------------------- models, token, reconnect


def test_switching_model_starts_a_session_on_it(page: Page, server: PlaygroundServer) -> None:
    type_each(page, "hello worl")
    first = page.get_attribute("#session", "title")

    page.select_option("#model", label="notebook v1")
    page.wait_for_function("document.getElementById('conn').textContent.startsWith('notebook')")
    wait_idle(page, len("hello worl"))

    assert page.get_attribute("#session", "title") != first
    assert next_shown(page)[0] == "d"  # the hello-world model knows how this ends
    assert_page_matches_server(page, server, model="notebook")


def test_a_session_gone_from_the_server_is_replaced(page: Page, server: PlaygroundServer) -> None:
    """Closed (or expired, or evicted) under the page: the next character opens a new session on
    the same model and sends it the whole text again."""
    type_each(page, "To be, or")
    gone = page.get_attribute("#session", "title")
    server.call("DELETE", f"/v1/sessions/{gone}")

    type_each(page, " not", start=len("To be, or"))
    assert page.get_attribute("#session", "title") != gone
    assert_page_matches_server(page, server)


def test_without_the_token_the_page_says_why(browser: Browser, server: PlaygroundServer) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('conn').textContent.includes('unauthorized')")
    assert "#token=" in (page.text_content("#conn") or "")
    context.close()


def test_reconnects_after_a_dropped_socket(browser: Browser, server: PlaygroundServer) -> None:
    proxy = DroppingProxy(server.url.removeprefix("http://"))
    frames: list[dict[str, Any]] = []
    page = open_page(browser, f"http://{proxy.address}", frames)
    try:
        type_each(page, "To be, or")
        proxy.drop()  # between messages
        type_each(page, " not to be", start=len("To be, or"))
        assert_page_matches_server(page, server)
        resumed = [f for f in frames if "session_id" in f]
        assert resumed and resumed[-1]["expect_offset"] == len("To be, or")

        # a drop while a message is under way, after the server took it: the page sends it again
        # with its expect_offset, is refused (the session moved on), and starts over cleanly
        proxy.mute_replies()  # the reply under way at the moment still arrives: the next one does not
        type_each(page, ",", start=len("To be, or not to be"))
        page.keyboard.type("t")
        session_id = page.get_attribute("#session", "title")
        text = "To be, or not to be,t"
        deadline = time.monotonic() + 10
        while server.call("GET", f"/v1/sessions/{session_id}")["session"]["offset"] < len(text):
            assert time.monotonic() < deadline, "the server never took the message"
            time.sleep(0.05)
        proxy.drop()
        proxy.unmute_replies()
        wait_idle(page, len(text))
        assert_page_matches_server(page, server)
        again, over = frames[-2:]
        assert again == {"top_k": 10, "expect_offset": len(text) - 1, "text": "t", "session_id": session_id}
        assert over == {"top_k": 10, "expect_offset": 0, "text": text, "session_id": session_id}
    finally:
        page.context.close()
        proxy.close()


# ---------------------------------------------------------------- adaptation

REPEATED = "The cat sat on the mat. " * 5  # 120 characters, 6 steps: the model knows English, not this cat


def mean_bits(surprisal: list[float | None]) -> str:
    """A bits/char figure as the page shows it."""
    return "∞" if None in surprisal else f"{sum(b for b in surprisal if b is not None) / len(surprisal):.2f}"


def sessions_shown(page: Page) -> tuple[str | None, str | None]:
    """The ids of the session the page shows and of its static twin ("" with adaptation off)."""
    return page.get_attribute("#session", "title"), page.get_attribute("#twin-session", "title")


def assert_adaptation_shown(page: Page, server: PlaygroundServer, model: str = DEFAULT_NAME) -> None:
    """Two sessions at the textarea's text, one adaptive, one static; the page shows the adaptive
    one's predictions and heat map, both figures (the static one is the twin's), and the steps."""
    text = page.input_value("#text")
    shown, twin = sessions_shown(page)
    adaptive, static = server.session(shown), server.session(twin)
    assert (adaptive["adaptive"], static["adaptive"]) == (True, False)
    assert adaptive["offset"] == static["offset"] == len(text)
    assert adaptive["model"]["name"] == static["model"]["name"] == model
    assert_page_matches_server(page, server, model, adapt=True)
    assert page.text_content("#bits") == mean_bits(server.predict(text, model, adapt=True)["surprisal_bits"])
    assert page.text_content("#bits-static") == mean_bits(server.predict(text, model)["surprisal_bits"])
    steps = adaptive["adapt_steps"]
    page.wait_for_function(  # asked once the text has settled
        "n => document.getElementById('steps').textContent === n",
        arg=f"{steps} step{'' if steps == 1 else 's'}",
    )


def toggle_adaptation(page: Page, on: bool) -> None:
    """Click the switch, as a person would, and wait until the page is settled on its sessions."""
    page.click("label.toggle")
    assert page.is_checked("#adapt") == on
    page.wait_for_function("on => document.body.classList.contains('adapting') === on", arg=on)
    wait_idle(page, len(page.input_value("#text")))


def test_adaptation_shows_static_and_adapted_side_by_side(page: Page, server: PlaygroundServer) -> None:
    assert not page.is_checked("#adapt")  # the server's default: off
    assert not page.is_visible("#bits-static") and not page.is_visible("#twin-session")
    start = "The cat "
    type_each(page, start)
    static_session = page.get_attribute("#session", "title")

    # on: a new adaptive session is fed the text; the static one carries on beside it
    toggle_adaptation(page, True)
    shown, twin = sessions_shown(page)
    assert twin == static_session and shown != static_session
    assert page.is_visible("#bits-static") and page.is_visible("#gain")
    assert page.text_content("#bits-label") == "adapted"
    assert page.input_value("#text") == start

    page.keyboard.type(REPEATED[len(start) :])  # at typing speed: keys pile up while messages are out
    wait_idle(page, len(REPEATED))
    assert_adaptation_shown(page, server)
    adapted, static = (
        float(page.text_content("#bits") or "nan"),
        float(page.text_content("#bits-static") or "nan"),
    )
    assert adapted < static - 0.3  # the writer's cat is learnt
    assert page.text_content("#gain") == f"−{100 * (1 - adapted / static):.0f}%"
    assert server.session(shown)["adapt_steps"] >= 5

    # Backspace: both sessions take the characters back
    for _ in range(4):
        page.keyboard.press("Backspace")
    wait_idle(page, len(REPEATED) - 4)  # "... on the m"
    assert_adaptation_shown(page, server)

    # Tab: the adaptive session's best completion, fed to both
    page.wait_for_selector("#completions button.best:not([disabled])")
    offered = server.call("POST", "/v1/complete", {"session_id": shown, "n": 3})["completions"]
    best = next(c["text"] for c in offered if c["text"])
    page.keyboard.press("Tab")
    text = REPEATED[:-4] + best
    wait_idle(page, len(text))
    assert page.input_value("#text") == text
    assert_adaptation_shown(page, server)

    # off: the adaptive session is closed, the static one shown again, nothing retyped
    toggle_adaptation(page, False)
    assert sessions_shown(page) == (static_session, "")
    assert not page.is_visible("#bits-static")
    assert page.text_content("#bits-label") == "bits/char"
    assert_page_matches_server(page, server)
    with pytest.raises(urllib.error.HTTPError) as gone:
        server.session(shown)
    assert gone.value.code == 404


def test_adaptation_across_a_drop_and_a_model_switch(browser: Browser, server: PlaygroundServer) -> None:
    proxy = DroppingProxy(server.url.removeprefix("http://"))
    frames: list[dict[str, Any]] = []
    page = open_page(browser, f"http://{proxy.address}", frames)
    try:
        toggle_adaptation(page, True)
        type_each(page, "hello world hello ")
        before = sessions_shown(page)
        proxy.drop()  # both sockets: each lane resumes its own session where it was
        type_each(page, "world hello world", start=len("hello world hello "))
        assert sessions_shown(page) == before
        resumed = [f for f in frames if "session_id" in f and f["expect_offset"] == len("hello world hello ")]
        assert sorted(f["session_id"] for f in resumed) == sorted(str(sid) for sid in before)
        assert_adaptation_shown(page, server)

        page.select_option("#model", label="notebook v1")  # both move to it, the text sent again
        page.wait_for_function("document.getElementById('conn').textContent.startsWith('notebook')")
        wait_idle(page, len("hello world hello world hello world"))
        assert set(sessions_shown(page)).isdisjoint(before)
        assert_adaptation_shown(page, server, model="notebook")
    finally:
        page.context.close()
        proxy.close()


def test_the_servers_default_turns_adaptation_on(
    browser: Browser, server: PlaygroundServer, tmp_path: Path
) -> None:
    """A server that adapts sessions that do not say: the page opens with the switch on, and a twin."""
    adapting = PlaygroundServer(shutil.copytree(server.model_dir, tmp_path / "models"), "--adapt")
    page = open_page(browser, adapting.url)
    try:
        assert page.is_checked("#adapt")
        type_each(page, "To be, or")
        assert_adaptation_shown(page, adapting)
    finally:
        page.context.close()
        adapting.close()


# ---------------------------------------------------------------- phone width, screenshots


def test_phone_width_and_screenshots(browser: Browser, server: PlaygroundServer) -> None:
    save = os.environ.get("NEXTCHAR_SCREENSHOTS") == "1"
    passage = (  # a text the model has never read, that repeats itself: the adapter learns it
        "The cat sat on the mat.\nThe cat sat on the hat.\nThe cat sat on the bat, and the bat sat on the cat.\n"
        "The cat sat on the rat, and the rat sat on the cat.\nThe cat sat on the c"
    )
    sizes: dict[str, dict[str, Any]] = {
        "playground.png": {"viewport": {"width": 1280, "height": 680}},
        "playground-phone.png": {
            "viewport": {"width": 390, "height": 844},
            "device_scale_factor": 2,
            "is_mobile": True,
            "has_touch": True,
        },
    }
    for name, context in sizes.items():
        page = open_page(browser, server.url, **context)
        try:
            toggle_adaptation(page, True)
            page.fill("#text", passage)
            wait_idle(page, len(passage))
            page.wait_for_selector("#completions button.best")
            page.wait_for_function("!document.getElementById('steps').textContent.startsWith('0 ')")
            width = context["viewport"]["width"]
            assert page.evaluate("document.documentElement.scrollWidth") <= width  # nothing off screen
            for panel in ("#text", "#next", "#completions", "#status", ".score", ".toggle"):
                box = page.locator(panel).bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
            if not context.get("has_touch"):  # a mouse: point at the most surprising character
                bits = [float(b.replace("∞", "inf")) for _, b, _ in heat(page)]
                point_at(page, bits.index(max(bits)))
            if save:
                page.screenshot(path=str(DOCS / name))
        finally:
            page.context.close()
