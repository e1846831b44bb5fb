"""Training texts on disk: every job's text is a file here, uploaded in pieces or kept from a Train.

Layout: ``model_dir/_texts/<id>.txt`` (the "_" keeps it out of the model names).
``UploadText`` streams a text of any size in small messages: pieces are appended
to a temporary file, which becomes ``<id>.txt`` only when the upload is complete
(a broken, cancelled or empty upload leaves nothing), and the total is capped
(``max_upload_bytes``), and so are all the texts kept at once, uploads under way
and Trains' inline texts included (``max_pending_upload_bytes``): a client uploading
again and again must not fill the disk the models and checkpoints go to. A job's
trainer reads its text from the file, so a 100 MB corpus is never copied through
the server's memory or a process pipe. Texts are removed after ``TEXT_TTL``
seconds, or when a job takes them. With a shared store (``shared``: the Redis every
replica uses) a finished upload is also kept there as a blob for as long, so a
``Train`` that names it may reach any replica: one that lacks the file fetches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from nextchar.core.atomic import atomic_write
from nextchar.server.blobs import Blobs, reaching
from nextchar.server.errors import InvalidArgument, NotFound, ResourceExhausted, shown
from redis.exceptions import RedisError

T = TypeVar("T")

TEXT_TTL = 3600.0  # seconds an uploaded text is kept for a Train to name it
ID_RE = re.compile(r"^[0-9a-f]{32}$")
FILE_WORKERS = 4  # threads for the texts' file work, apart from the pool every other RPC uses


def shared_key(text_id: str) -> str:
    return f"nextchar:upload:{text_id}"


class TextStore:
    """The texts waiting for a Train, and their byte total. The total is counted once (at the first
    upload or inline text) and then kept up to date as texts come and go; the sweep counts it
    again from the directory. Blocking file work runs on the store's own few threads: thousands
    of uploads at once must not take the pool Train, ListModels and ListJobs wait on."""

    def __init__(
        self, directory: Path, max_bytes: int, max_pending: int = 4 << 30, shared: Blobs | None = None
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes  # one upload
        self.max_pending = max_pending  # every text kept here and every upload under way, together
        self.shared = shared
        self._files = ThreadPoolExecutor(FILE_WORKERS, thread_name_prefix="nextchar-texts")
        self._lock = threading.Lock()  # the counts change on the event loop and in the sweep's thread
        self._kept: dict[str, int] | None = None  # bytes of each text kept here, by id; None: not counted
        self._held = 0  # bytes of the texts kept here and of the uploads under way, together
        self._counting: asyncio.Future[dict[str, int]] | None = None  # the first count of _kept
        self._removing: set[asyncio.Task[None]] = set()  # unanswered uploads' removals under way

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._files, fn, *args)

    async def _through(self, fn: Callable[..., T], *args: Any) -> T:
        """fn in the file threads, run to its end even when the caller is cancelled meanwhile (the
        cancel is raised after it). A cancelled ``_run`` drops a job still queued, or lets one
        already running finish unseen: with 300 uploads dropped at once (4 file threads), a second
        cancel during an upload's cleanup left its partial file, and one during its rename left a
        text that its cleanup, believing it uncommitted, never removed."""
        job = asyncio.ensure_future(self._run(fn, *args))
        cancelled = False
        while not job.done():
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return job.result()

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

    async def keep(self, text: str) -> Path:
        """Keep a text that came inline in a Train, counted against max_pending like an upload. A
        call cancelled meanwhile (its deadline) leaves nothing: the write finishes in its thread
        and its file is removed."""
        data = text.encode()
        await self._count()
        path = self.directory / f"{secrets.token_hex(16)}.txt"
        self._hold(len(data))
        self._keep(path.stem, len(data))
        writing = asyncio.ensure_future(self._run(self._write, path, data))
        try:
            await asyncio.shield(writing)
        except BaseException:
            # whenever the thread is done, in the file threads (taken unlinks: not on the loop)
            writing.add_done_callback(lambda _: self._files.submit(self.taken, path))
            raise
        return path

    def _write(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(data)

    def taken(self, path: Path) -> None:
        """The text at path is nobody's here any more: a job took it (the file moved into the job
        store), or its Train was refused or cancelled (the file is removed, if still there).
        Blocking (an unlink)."""
        path.unlink(missing_ok=True)
        with self._lock:
            if self._kept is not None:
                self._held -= self._kept.pop(path.stem, 0)

    async def release(self, path: Path) -> None:
        """taken, on the store's threads, run to its end even when the caller is cancelled (a
        dropped one left its bytes counted against max_pending for good)."""
        await self._through(self.taken, path)

    async def receive(self, pieces: AsyncIterator[str]) -> tuple[str, int, int]:
        """Append pieces to a new text as they arrive; returns (text id, characters, bytes). The
        text is committed once the pieces end, so they must end only for a client that ended
        them (the protocol's adapter sees to it). An upload that ends empty, or whose call is
        cancelled before its answer, leaves nothing."""
        await self._count()
        text_id = secrets.token_hex(16)
        tmp, path = self.directory / f".{text_id}.txt.tmp", self.directory / f"{text_id}.txt"
        chars = size = 0
        committed = False
        try:
            f = await self._through(_open, tmp)
            try:
                async for piece in pieces:
                    data = piece.encode()
                    if size + len(data) > self.max_bytes:
                        raise ResourceExhausted(f"text: more than max_upload_bytes ({self.max_bytes}) bytes")
                    self._hold(len(data))
                    chars, size = chars + len(piece), size + len(data)
                    await self._run(f.write, data)
                if not size:
                    raise InvalidArgument("text: empty; send the text in one or more pieces")
                await self._run(_flush, f)
            finally:
                await self._through(f.close)
            try:
                await self._through(tmp.replace, path)
            except asyncio.CancelledError:  # raised after the rename: the text is there, and goes below
                self._keep(text_id, size)
                committed = True
                raise
            self._keep(text_id, size)
            committed = True
            if self.shared is not None:
                with reaching("upload store"):
                    await self._run(self.shared.put, shared_key(text_id), path, TEXT_TTL)
        except BaseException:
            if committed:
                await self._through(self.taken, path)
            else:
                self._hold(-size, check=False)
                await self._through(functools.partial(tmp.unlink, missing_ok=True))
            raise
        return text_id, chars, size

    async def _count(self) -> None:
        """Count the texts kept here, once: every call until it is done waits for the same count
        (the sweep counts again)."""
        if self._counting is None:
            self._counting = asyncio.ensure_future(self._run(self._sizes))
        counted = await asyncio.shield(self._counting)
        with self._lock:
            if self._kept is None:
                self._kept = counted
                self._held += sum(counted.values())

    def _sizes(self) -> dict[str, int]:
        """Bytes of each finished text in the directory, by id (blocking: a stat each)."""
        sizes = {}
        for path in self.directory.glob("*.txt"):
            with contextlib.suppress(OSError):  # swept or taken meanwhile
                sizes[path.stem] = path.stat().st_size
        return sizes

    def _hold(self, size: int, check: bool = True) -> None:
        """Count size more bytes (fewer, if negative); refused (RESOURCE_EXHAUSTED) past max_pending."""
        with self._lock:
            if check and self._held + size > self.max_pending:
                raise ResourceExhausted(
                    f"text: the uploaded texts waiting for a Train would hold more than "
                    f"max_pending_upload_bytes ({self.max_pending}) bytes; train on them or retry later",
                    limit="max_pending_upload_bytes",
                )
            self._held += size

    def _keep(self, text_id: str, size: int) -> None:
        """The size bytes held for a text under way now belong to the kept text text_id."""
        with self._lock:
            if self._kept is not None:
                self._kept[text_id] = size

    def unanswered(self, text_id: str) -> None:
        """The upload of text_id was committed but its answer never reached the client (its call
        ended cancelled: the client ended its pieces and went away before the answer): nobody
        knows the id, so the text goes, off the loop."""

        def remove() -> None:
            self.taken(self.directory / f"{text_id}.txt")
            self.forget(text_id)

        self._removing.add(task := asyncio.get_running_loop().create_task(self._run(remove)))
        task.add_done_callback(self._removing.discard)

    def forget(self, text_id: str) -> None:
        """A job took the text (into its own store): the shared copy is nobody's any more (should
        Redis not answer now, its expiry removes it)."""
        if self.shared is not None:
            with contextlib.suppress(RedisError):
                self.shared.delete(shared_key(text_id))

    def sweep(self, now: float) -> int:
        """Remove texts older than TEXT_TTL and count the rest again; returns how many went."""
        removed = 0
        for path in self.directory.glob("*.txt"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > TEXT_TTL:
                    path.unlink()
                    removed += 1
        sizes = self._sizes()
        with self._lock:
            if self._kept is not None:  # the uploads under way keep their share
                self._held += sum(sizes.values()) - sum(self._kept.values())
                self._kept = sizes
        return removed


def _open(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb")


def _flush(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
