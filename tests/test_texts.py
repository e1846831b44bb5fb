"""Training texts from files (nextchar.client.texts): read in blocks, checked as they are decoded,
never held whole; and the `nextchar train` process that uploads a big file stays small."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from nextchar.client import texts
from nextchar.client.texts import TextFiles
from nextchar.core.demo import NOTEBOOK_TEXT
from server_harness import start_server

ALPHABET = "ab \n" + "é€𝄞ж"  # 1- to 4-byte characters, so blocks cut characters in every way


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def test_pieces_are_the_files_in_order_however_the_blocks_cut_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(0)
    for block in (1, 2, 3, 5, 7, 64):
        monkeypatch.setattr(texts, "BLOCK_BYTES", block)
        parts = [random_text(rng, rng.randint(1, 300)) for _ in range(3)]
        paths = []
        for i, part in enumerate(parts):
            paths.append(tmp_path / f"{block}-{i}.txt")
            paths[-1].write_text(part, encoding="utf-8")
        files = TextFiles.of(paths)
        pieces = list(files.pieces())
        assert "".join(pieces) == "".join(parts) == files.read()
        assert files.count() == sum(len(p) for p in parts)
        assert files.size() == sum(len(p.encode()) for p in parts)
        assert all(0 < len(p) <= block for p in pieces)
        for size in (1, 4, 100):
            chunks = list(files.chunks(size))
            assert "".join(chunks) == "".join(parts)
            assert all(len(c) == size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= size


def test_a_bad_byte_is_named_where_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The byte and its position in the file, wherever the blocks fall; nothing after it is read."""
    monkeypatch.setattr(texts, "BLOCK_BYTES", 5)
    rng = random.Random(1)
    path = tmp_path / "bad.txt"
    for _ in range(200):
        head = random_text(rng, rng.randint(0, 40)).encode()
        bad = rng.choice([b"\xff", b"\xc3(", b"\xe2\x82(", b"\x80"])
        path.write_bytes(head + bad + random_text(rng, 10).encode())
        with pytest.raises(ValueError) as exc:
            TextFiles.of(path).count()
        assert str(exc.value).startswith(
            f"{path} is not UTF-8 text (byte 0x{bad[0]:02x} at position {len(head)});"
        )


def test_a_character_cut_off_at_the_end_and_an_empty_file_are_named(tmp_path: Path) -> None:
    cut, empty, fine = tmp_path / "cut.txt", tmp_path / "empty.txt", tmp_path / "fine.txt"
    cut.write_bytes(b"abc\xe2\x82")
    empty.write_bytes(b"")
    fine.write_text("ok")
    with pytest.raises(ValueError, match=r"cut.txt is not UTF-8 text \(byte 0xe2 at position 3\)"):
        TextFiles.of([fine, cut]).read()
    with pytest.raises(ValueError, match=r"empty.txt is empty"):
        TextFiles.of([fine, empty]).count()


def test_nextchar_train_uploads_a_big_file_without_holding_it(tmp_path: Path) -> None:
    """A real `nextchar train FILE --detach` process against a real server: the 48 MB file arrives
    byte for byte, and the client's peak memory stays far below the file's size (read whole,
    decoded and encoded again it took about 2.3x the file)."""
    corpus = tmp_path / "big.txt"
    unit = (NOTEBOOK_TEXT + " é€\n").encode()
    with corpus.open("wb") as f:
        for _ in range(48 * 1024 * 1024 // len(unit)):
            f.write(unit)
    size = corpus.stat().st_size
    srv = start_server(tmp_path / "models")
    try:
        cli = [sys.executable, "-m", "nextchar.cli"]
        server = ["--server", f"127.0.0.1:{srv.port}"]
        baseline, _ = peak_rss([*cli, "health", "--json", *server], tmp_path / "health")  # no text
        peak, out = peak_rss(
            [*cli, "train", str(corpus), "--detach", "--json", "--max-chars", "4096", *server],
            tmp_path / "train",
        )
        job = json.loads(out)
        assert job["state"] in ("queued", "running")
        uploaded = tmp_path / "models" / "_jobs" / job["job_id"] / "text.txt"  # where the job keeps it
        assert uploaded.stat().st_size == size and uploaded.read_bytes() == corpus.read_bytes()
        assert peak - baseline < 32 * 1024 * 1024, (peak, baseline, size)
    finally:
        srv.close()


def peak_rss(cmd: list[str], out: Path) -> tuple[int, str]:
    """(peak resident bytes, stdout) of a command run to its end, from its own rusage (wait4)."""
    with out.with_suffix(".out").open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out.with_suffix(".err").read_text()
    return usage.ru_maxrss * 1024, out.with_suffix(".out").read_text()
