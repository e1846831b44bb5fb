"""Training texts on disk: every job's text is a file here, uploaded in pieces or stored from a request.

Layout: ``model_dir/_texts/<id>.txt`` (the "_" keeps it out of the model names).
``UploadText`` streams a text of any size in small messages: pieces are appended
to a temporary file, which becomes ``<id>.txt`` only when the upload is complete
(a broken upload leaves nothing usable), and the total is capped
(``max_upload_bytes``), and so are all the texts kept at once, uploads under way
included (``max_pending_upload_bytes``): a client uploading again and again must not
fill the disk the models and checkpoints go to. A job's trainer reads its text from
the file, so a 100 MB corpus is never copied through the server's memory or a
process pipe. Texts are removed after ``TEXT_TTL`` seconds, or when a job takes
them. With a shared store (``shared``: the Redis every replica uses) a finished upload is also kept there as a blob for as long, so a
``Train`` that names it may reach any replica: one that lacks the file fetches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from nextchar.core.atomic import atomic_write
from nextchar.server.blobs import Blobs, reaching
from nextchar.server.errors import InvalidArgument, NotFound, ResourceExhausted, shown
from redis.exceptions import RedisError

TEXT_TTL = 3600.0  # seconds an uploaded text is kept for a Train to name it
ID_RE = re.compile(r"^[0-9a-f]{32}$")


def shared_key(text_id: str) -> str:
    return f"nextchar:upload:{text_id}"


class TextStore:
    def __init__(
        self, directory: Path, max_bytes: int, max_pending: int = 4 << 30, shared: Blobs | None = None
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes  # one upload
        self.max_pending = max_pending  # every text kept here and every upload under way, together
        self.shared = shared
        self._receiving: dict[str, int] = {}  # uploads under way: bytes so far (the event loop's own)
        self._kept = 0  # bytes of the finished texts here, as counted when the last upload began

    def path(self, text_id: str) -> Path:
        """The file of an uploaded text (blocking: with a shared store, a text another replica took
        is fetched first); NotFound when there is none (never uploaded, or expired)."""
        if not ID_RE.match(text_id):
            raise InvalidArgument(f"text_id: {shown(text_id)} is not an id UploadText gave")
        path = self.directory / f"{text_id}.txt"
        if not path.is_file() and self.shared is not None:
            with reaching("upload store"):
                self.shared.get(shared_key(text_id), path)
        if not path.is_file():
            raise NotFound(
                f"text {shown(text_id)}: no such uploaded text (they are kept {TEXT_TTL:g} s)", subject="text"
            )
        return path

    def store(self, text: str) -> Path:
        """Keep a text that came inline (blocking I/O: call it in a thread)."""
        path = self.directory / f"{secrets.token_hex(16)}.txt"
        with atomic_write(path) as f:
            f.write(text.encode())
        return path

    async def receive(self, pieces: AsyncIterator[str]) -> tuple[str, int, int]:
        """Append pieces to a new text as they arrive; returns (text id, characters, bytes)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._kept = await asyncio.to_thread(self._count_kept)
        text_id = secrets.token_hex(16)
        tmp = self.directory / f".{text_id}.txt.tmp"
        chars = size = 0
        self._receiving[text_id] = 0
        try:
            with open(tmp, "wb") as f:
                async for piece in pieces:
                    data = piece.encode()
                    chars, size = chars + len(piece), size + len(data)
                    self._receiving[text_id] = size
                    if size > self.max_bytes:
                        raise ResourceExhausted(f"text: more than max_upload_bytes ({self.max_bytes}) bytes")
                    if self._kept + sum(self._receiving.values()) > self.max_pending:
                        raise ResourceExhausted(
                            f"text: the uploaded texts waiting for a Train would hold more than "
                            f"max_pending_upload_bytes ({self.max_pending}) bytes; train on them or retry later",
                            limit="max_pending_upload_bytes",
                        )
                    await asyncio.to_thread(f.write, data)
                await asyncio.to_thread(_flush, f)
            tmp.replace(self.directory / f"{text_id}.txt")
            self._kept += size
        finally:
            del self._receiving[text_id]
            tmp.unlink(missing_ok=True)
        if self.shared is not None:
            with reaching("upload store"):
                await asyncio.to_thread(
                    self.shared.put, shared_key(text_id), self.directory / f"{text_id}.txt", TEXT_TTL
                )
        return text_id, chars, size

    def _count_kept(self) -> int:
        """Bytes of the finished texts in the directory (blocking)."""
        total = 0
        for path in self.directory.glob("*.txt"):
            with contextlib.suppress(OSError):  # swept or taken meanwhile
                total += path.stat().st_size
        return total

    def forget(self, text_id: str) -> None:
        """A job took the text (into its own store): the shared copy is nobody's any more (should
        Redis not answer now, its expiry removes it)."""
        if self.shared is not None:
            with contextlib.suppress(RedisError):
                self.shared.delete(shared_key(text_id))

    def sweep(self, now: float) -> int:
        """Remove texts older than TEXT_TTL; returns how many."""
        removed = 0
        for path in self.directory.glob("*.txt"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > TEXT_TTL:
                    path.unlink()
                    removed += 1
        return removed


def _flush(f: object) -> None:
    f.flush()  # type: ignore[attr-defined]
    os.fsync(f.fileno())  # type: ignore[attr-defined]
