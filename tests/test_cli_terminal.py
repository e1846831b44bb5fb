"""The command line as people run it: in a real pseudo-terminal, behind a pipe, under Ctrl-C.

``nextchar stream`` on a terminal is driven through a pty of 100 x 30 and read as the
screen shows it (tests/terminal_screen.py: the keys a person types, escape sequences
and pastes included; lines and colours as drawn); a piped stream is fed by a writer that pauses in
the middle of a line; ``nextchar serve`` gets SIGINT the way a terminal sends it, to
its whole process group. Every process is real, and so is every server.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nextchar.cli.keys import Key, KeyReader
from server_harness import ServerProcess, children, ignores_sigint, make_registry, wait_until
from terminal_screen import TerminalScreen

CLI = [sys.executable, "-m", "nextchar.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The notebook's model ("hello world hello world ..."), trained once for the module."""
    path = tmp_path_factory.mktemp("models")
    make_registry(path, versions=1)
    return path


@pytest.fixture
def server(model_dir: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(model_dir, "--rewind-chars", "64")
    yield srv
    srv.close()


@pytest.fixture
def open_view() -> Iterator[Callable[..., TerminalScreen]]:
    """``nextchar stream`` on a 100 x 30 terminal, its view drawn and the session open."""
    views: list[TerminalScreen] = []

    def start(address: str, *args: str) -> TerminalScreen:
        view = TerminalScreen([*CLI, "stream", "--server", address, *args])
        views.append(view)
        view.wait_for(r"Ctrl-D ends")
        view.wait_for(r"offset 0 ")
        return view

    yield start
    for view in views:
        view.close()


def summary_value(view: TerminalScreen, key: str) -> str:
    match = re.search(rf"{key}\s+│\s+(\S+)", view.output())
    assert match, f"no {key!r} in the summary:\n{view.output()}"
    return match.group(1)


def test_the_typed_text_is_shaded_by_surprisal(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address)
    view.send("hello wd")  # the model has only ever seen "hello world ...": "d" after "w" is a surprise
    view.wait_for(r"^hello wd▌")
    row = view.line(r"^hello wd")
    expected, surprise = view.rgb(row, 1), view.rgb(row, 7)  # the "e" of hello, the "d"
    assert expected[1] > expected[0], expected  # green
    assert surprise[0] > surprise[1], surprise  # red
    view.send("\x04")
    assert view.finish() == 0


def test_the_status_line_shows_model_offset_bits_and_how_far_backspace_goes(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address)
    view.send("hello wor")
    status = view.wait_for(
        r"^ nextchar stream · (\S+) · offset 9 · (\d+\.\d+) bits/char · Backspace: (\d+) back"
    )
    model, bits, back = status.groups()
    assert model == "default:v1" and float(bits) >= 0 and back == "9"
    view.send("\x04")
    assert view.finish() == 0
    assert float(summary_value(view, "bits per char")) == pytest.approx(float(bits), abs=0.006)


def test_next_characters_are_shown_with_probabilities_and_none_at_zero(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address, "--top-k", "9")
    view.send("hello wor")
    row = view.wait_for(r"^next +(l \d+%.*)$").group(1)
    shown = re.findall(r"(\S+) (\d+)%", row)
    assert shown and all(int(percent) > 0 for _, percent in shown), row
    assert len(shown) < 9  # all nine were asked for; those the model gives under 0.5% are left out
    view.send("\x04")
    assert view.finish() == 0


def test_whole_words_are_proposed_with_probabilities_and_tab_accepts_the_best(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address)
    view.send("hello")
    view.wait_for(r"^words +␠world \d+%")  # the next word, the space it needs shown
    view.send(" wo")
    view.wait_for(r"^words +world \d+%")  # the word, not the suffix "rld"
    view.wait_for(r"^Tab: world ·")
    view.send("\t")
    view.wait_for(r"^hello world▌")  # sent as if typed: the session moved on by "rld"
    view.wait_for(r"offset 11 ")
    view.send("\x04")
    assert view.finish() == 0
    assert summary_value(view, "chars") == "11"


def test_backspace_rewinds_and_never_goes_further_than_the_session_can(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address)
    view.send("hello wor")
    view.wait_for(r"^next +l \d+%")
    view.send("\x1b[D\x1b[A\x1bOP")  # arrows, F1: ignored, nothing sent, nothing ends
    view.send("\x7f\x7f")  # Backspace twice: the session takes "or" back
    view.wait_for(r"^hello w▌")
    view.wait_for(r"offset 7 .*Backspace: 7 back")
    view.wait_for(r"^next +o \d+%")  # the prediction where the session went back to
    view.send("\x7f" * 10)  # seven can be taken back; the other three only ring the bell
    view.wait_for(r"offset 0 .*Backspace: 0 back")
    view.send("hi")
    view.wait_for(r"^hi▌")
    view.send("\x04")
    assert view.finish() == 0
    assert view.raw.count(b"\x07") == 3
    assert summary_value(view, "rewinds") == "9"


def test_a_paste_keeps_its_context_and_its_tabs(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address)
    view.send("hello wor")
    view.wait_for(r"^hello wor▌")
    paste = "ld hello world\n" * 10 + "hello\twé"  # newlines, a tab, a character the model does not know
    view.send(f"\x1b[200~{paste}\x1b[201~")  # as a terminal sends it in bracketed-paste mode
    view.wait_for(r"unknown to the model: .*é")
    lines = view.text.splitlines()
    first = lines.index("hello world hello world")  # the text wraps: what came before the paste stays
    assert lines[first + 1 : first + 10] == ["ld hello world"] * 9
    assert re.match(r"hello +wé▌", lines[first + 10])  # the tab is text, not a completion
    view.send("\x04")
    assert view.finish() == 0
    assert summary_value(view, "chars") == str(len("hello wor") + len(paste))


def test_completions_that_cross_a_line_stay_on_one_row(
    tmp_path: Path, open_view: Callable[..., TerminalScreen]
) -> None:
    english = ServerProcess(tmp_path)  # an empty model directory: the shipped Shakespeare model
    try:
        view = open_view(english.address)
        paste = "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo"
        view.send(f"\x1b[200~{paste}\x1b[201~")
        view.wait_for(rf"offset {len(paste)} ")
        # the model's likeliest words there go on after a comma and a newline: shown as "\n" on
        # the words row, right above the Tab row (waited for, not read once: the words of an
        # earlier offset may still be on the screen a moment after the offset moved on)
        view.wait_for(r"^words +.*\\n.*\nTab: ")
        view.send("\x04")
        assert view.finish() == 0
    finally:
        english.close()


def test_a_paste_longer_than_the_server_takes_in_one_message_goes_in_pieces(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address)
    paste = "hello world " * 500  # 6,000 characters; the server takes at most 4,096 a message
    view.send(f"\x1b[200~{paste}\x1b[201~")
    view.wait_for(r"offset 6000 ")
    view.wait_for(r"^(hello world ){8}▌")
    view.send("\x04")
    assert view.finish() == 0
    assert summary_value(view, "chars") == "6000"


def test_a_resized_terminal_is_redrawn_at_once(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address)
    view.send("hello world " * 8)  # 96 characters: one line of 100, two of 60
    view.wait_for(r"offset 96 ")
    view.resize(20, 60)  # no key pressed after it
    view.wait_for(
        r"\A nextchar stream · default:v1 · offset 96 .*\nhello world( hello world){4}\n(hello world ){3}▌"
        r"(?s:.*)\nTab: [^\n]*Ctrl-D ends[^\n]*\Z"  # the footer on the new last row
    )
    view.send("\x04")
    assert view.finish() == 0


def test_typed_into_a_pipe_the_stream_prints_lines_not_the_view(server: ServerProcess) -> None:
    command = " ".join([*CLI, "stream", "--server", server.address])
    typist = TerminalScreen(["sh", "-c", f"{command} | cat"])  # keys from the terminal, output to a pipe
    typist.send("hello\n")
    typist.wait_for(r"^ +4 +o .*next: ")  # read a line at a time, as a terminal hands it over
    typist.send("\x04")
    assert typist.finish() == 0
    assert "Ctrl-D ends" not in typist.output() and "chars" in typist.output()


def test_json_asked_for_on_a_terminal_is_json(server: ServerProcess) -> None:
    typist = TerminalScreen([*CLI, "stream", "--server", server.address, "--json"])
    typist.send("hi\n")
    typist.wait_for(r'^\{"offset": 1, "char": "i", ')
    typist.send("\x04")
    assert typist.finish() == 0
    assert '{"summary": {' in typist.output()


def test_keys_split_between_reads_are_still_keys() -> None:
    reader = KeyReader()
    keys = [
        *reader.feed(b"a\x1b["),
        *reader.feed(b"Db\xc3"),
        *reader.feed(b"\xa9\x1bO"),
        *reader.feed(b"P\t"),
    ]
    assert keys == ["a", "b", "é", Key.TAB]  # the arrow (ESC [ D) and F1 (ESC O P) dropped, whole
    pasted = [*reader.feed(b"\x1b[200~x\ty\x04\x7f\x1b[20"), *reader.feed(b"1~\t\x7f\x04")]
    assert pasted == [
        "x",
        "\t",
        "y",
        Key.TAB,
        Key.BACKSPACE,
        Key.END,
    ]  # inside a paste, controls edit nothing


@pytest.mark.parametrize("end", ["ctrl-d", "ctrl-c"])
def test_the_summary_is_printed_when_the_view_is_closed(
    server: ServerProcess, open_view: Callable[..., TerminalScreen], end: str
) -> None:
    view = open_view(server.address)
    view.send("hello")
    view.wait_for(r"offset 5 ")
    if end == "ctrl-d":
        view.send("\x04")
    else:
        view.interrupt()
    assert view.finish() == 0
    assert summary_value(view, "chars") == "5"
    assert "hello" in view.output().split("summary")[0]  # the text typed stays on the terminal


def test_a_lost_server_ends_the_view_at_once_with_the_summary_and_the_error(
    server: ServerProcess, open_view: Callable[..., TerminalScreen]
) -> None:
    view = open_view(server.address)
    view.send("hello")
    view.wait_for(r"offset 5 ")
    server.proc.kill()
    start = time.monotonic()
    error = view.wait_for(r"^(nextchar: error: .+)$", timeout=10).group(1)
    assert time.monotonic() - start < 5  # not after the next key, not after retries
    assert "the server" in error
    assert view.finish() == 1
    assert summary_value(view, "chars") == "5"
    assert "`nextchar serve`" in view.output()


def test_a_piped_stream_sends_characters_as_they_arrive(server: ServerProcess) -> None:
    proc = subprocess.Popen(
        [*CLI, "stream", "--server", server.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("hello")
    proc.stdin.flush()
    start = time.monotonic()
    lines = [proc.stdout.readline() for _ in range(5)]  # before the line is finished
    waited = time.monotonic() - start
    assert [line.split()[1] for line in lines] == list("hello") and waited < 3
    time.sleep(1)  # the writer pauses mid-line
    rest, err = proc.communicate(" w\n", timeout=20)
    assert proc.returncode == 0, err
    assert [line.split()[1] for line in rest.splitlines()[:3]] == ["␠", "w", "\\n"]


def test_ctrl_c_on_serve_drains_without_a_traceback(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=1)
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--model-dir", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "serving on" in line:
            break

    def children_armed() -> bool:  # the compute process is up and deaf to Ctrl-C, as the server wants
        kids = children(proc.pid)
        return bool(kids) and all(ignores_sigint(k) for k in kids)

    wait_until(children_armed, 30, "the server's children ignoring SIGINT")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the server AND its children get it
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "server stopped" in err


def test_files_written_follow_the_umask(tmp_path: Path) -> None:
    from nextchar.core.atomic import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "loss.csv") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "loss.csv").stat().st_mode) == 0o644
