"""Files in Redis: what replicas and trainers share without a shared file system.

Model files, training texts and checkpoints travel between machines as blobs: a
file of any size kept as checksummed chunks (CHUNK bytes each, so no Redis command
carries more than that). Layout under a blob's key ``K``::

    K              hash    sha256, size, chunks, gen
    K:{gen}:{i}    string  the i-th chunk of generation gen

A write puts the chunks under a new generation, then swaps the header in one HSET
and drops the previous generation's chunks, so a reader sees the old file or the new
one, never a mix. A read streams the chunks into a temporary file beside the target,
checks the SHA-256 and renames it into place (``atomic_write``); a read that raced a
rewrite (a chunk already gone, or a checksum that does not match) reads again.

``connect`` opens the blocking client every shared part uses (job store, queue,
model registry: all of them run off the event loop, in threads or in
``nextchar trainer``): 2 s timeouts and no blind retries, as the session store's.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import redis
from nextchar.core.atomic import atomic_write
from nextchar.server.errors import Unavailable
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

CHUNK = 4 * 1024 * 1024  # bytes per chunk: well under Redis's 512 MB value limit, and one chunk of memory
TIMEOUT = 2.0  # seconds a Redis call may take
READS = 3  # attempts of a read that races rewrites


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0)
    )


@contextlib.contextmanager
def reaching(what: str) -> Iterator[None]:
    """A Redis failure becomes UNAVAILABLE naming what was being reached, for the client to retry."""
    try:
        yield
    except RedisError as exc:
        raise Unavailable(f"{what} unavailable: {exc}; retry shortly") from None


class BlobChanged(Exception):
    """A read met a rewrite in progress; reading again gets the new file."""


class Blobs:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def put(self, key: str, path: Path, ttl: float | None = None) -> str:
        """Store the file at path under key, for ttl seconds (None: for good); returns its SHA-256 (hex)."""
        previous = self._header(key)
        gen, digest, size, chunks = secrets.token_hex(4), hashlib.sha256(), 0, 0
        px = int(ttl * 1000) if ttl else None
        with open(path, "rb") as f:
            while piece := f.read(CHUNK):
                self.redis.set(f"{key}:{gen}:{chunks}", piece, px=px)
                digest.update(piece)
                size, chunks = size + len(piece), chunks + 1
        sha = digest.hexdigest()
        pipe = self.redis.pipeline()  # MULTI: the header never lives without its expiry
        pipe.hset(key, mapping={"sha256": sha, "size": size, "chunks": chunks, "gen": gen})
        if px:
            pipe.pexpire(key, px)
        pipe.execute()
        if previous:
            self._drop_chunks(key, previous)
        return sha

    def get(self, key: str, path: Path) -> str | None:
        """Write the blob to path (atomically, checksum checked); its SHA-256, or None when there is none."""
        for attempt in range(READS):
            header = self._header(key)
            if not header:
                return None
            try:
                self._read(key, header, path)
                return header["sha256"]
            except BlobChanged:
                if attempt == READS - 1:
                    raise
        raise AssertionError("unreachable")

    def sha256(self, key: str) -> str | None:
        sha = self.redis.hget(key, "sha256")
        return cast(bytes, sha).decode() if sha else None

    def delete(self, key: str) -> None:
        header = self._header(key)
        self.redis.delete(key)
        if header:
            self._drop_chunks(key, header)

    def _header(self, key: str) -> dict[str, str]:
        raw = cast(dict[bytes, bytes], self.redis.hgetall(key))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def _read(self, key: str, header: dict[str, str], path: Path) -> None:
        digest = hashlib.sha256()
        with atomic_write(path) as f:
            for i in range(int(header["chunks"])):
                piece: Any = self.redis.get(f"{key}:{header['gen']}:{i}")
                if piece is None:
                    raise BlobChanged(key)
                digest.update(piece)
                f.write(piece)
            if digest.hexdigest() != header["sha256"]:
                raise BlobChanged(key)

    def _drop_chunks(self, key: str, header: dict[str, str]) -> None:
        names = [f"{key}:{header['gen']}:{i}" for i in range(int(header["chunks"]))]
        if names:
            self.redis.delete(*names)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(CHUNK):
            digest.update(piece)
    return digest.hexdigest()
