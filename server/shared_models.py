"""RedisModelFiles: the model registry's files in the shared Redis, cached in each replica's --model-dir.

With ``--store redis://…`` a version that any replica (or ``nextchar trainer``)
registers is seen by every replica, without a shared directory. Layout, all keys
under ``nextchar:``::

    models                        hash    "name/version" -> the model file's SHA-256
    model:{name}/{version}:{sha}  blob    the model file (nextchar.server.blobs)
    models:default                string  "name/version": the default model
    models:epoch                  string  a random token, new whenever the store lost the above

Publishing stores the blob first, then adds the version to ``models`` with HSETNX:
two processes registering the next version of a name at once cannot both get it
(the loser's blob goes, unless it is the very same file, and it takes the next
number). The default and the
deletions are scripts that check each other: the pointer is set only to a version
in ``models``, and a version is deleted only when the pointer does not name it, so
the default never names a version that is gone. ``files`` reads ``models`` and
downloads every version the cache lacks (or holds with another checksum) into
``model_dir/<name>/<version>.npz``, atomically and checksum-checked; cached files
of versions no longer in ``models`` are ignored (and removed when this process
deleted them).

A Redis restarted without persistence (or flushed) has lost every key at once, while
the replicas still hold their versions and serve sessions on them: they listed 0
models, and new sessions found no default. A version leaves the index one way only,
DeleteModel, which keeps ``models:epoch``; a missing epoch therefore means the store
lost its data. The first process to notice sets a new epoch, and every process that
sees an epoch other than its own publishes again the versions it holds (files whose
checksum it checked) and, when none is set, its default. The cost: a version deleted
after the loss but before a replica noticed it comes back from that replica.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import cast

import redis
from nextchar.server.blobs import Blobs, file_sha256, reaching
from nextchar.server.registry import NAME_RE, Ref

PREFIX = "nextchar:"
INDEX, POINTER, EPOCH = PREFIX + "models", PREFIX + "models:default", PREFIX + "models:epoch"
log = logging.getLogger("nextchar.server")

# KEYS: models, models:default; ARGV: "name/version". 1 when set, 0 when the version is gone.
SET_DEFAULT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# KEYS: models, models:default; ARGV: "name/version". The deleted file's SHA-256 ("" when it was
# not there), or false when it is the default.
WITHDRAW = """
if redis.call('GET', KEYS[2]) == ARGV[1] then return false end
local sha = redis.call('HGET', KEYS[1], ARGV[1])
if not sha then return '' end
redis.call('HDEL', KEYS[1], ARGV[1])
return sha
"""


def field(ref: Ref) -> str:
    return f"{ref[0]}/{ref[1]}"


def blob_key(ref: Ref, sha: str) -> str:
    return f"{PREFIX}model:{field(ref)}:{sha}"


class RedisModelFiles:
    """The ModelFiles protocol (nextchar.server.registry) on Redis, with model_dir as the cache."""

    def __init__(self, client: redis.Redis, url: str, model_dir: Path) -> None:
        self.redis, self.url, self.model_dir = client, url, model_dir
        self.blobs = Blobs(client)
        self._set_default = client.register_script(SET_DEFAULT)
        self._withdraw = client.register_script(WITHDRAW)
        self._cached: dict[Ref, str] = {}  # versions whose cached file this process checked: SHA-256
        self._epoch: bytes | None = None  # the store's epoch as this process last saw it
        self._pointer: Ref | None = None  # the default as this process last read it

    def __str__(self) -> str:
        return f"model registry {self.url}"

    def files(self) -> dict[Ref, Path]:
        with reaching(str(self)):
            self._restore_if_lost()
            index = cast(dict[bytes, bytes], self.redis.hgetall(INDEX))
            found: dict[Ref, Path] = {}
            for raw, sha_raw in index.items():
                name, _, version = raw.decode().partition("/")
                if not (NAME_RE.match(name) and version.isdigit()):
                    continue
                ref, sha = (name, int(version)), sha_raw.decode()
                path = self.model_dir / name / f"{version}.npz"
                fresh = path.is_file() and (self._cached.get(ref) == sha or file_sha256(path) == sha)
                if not fresh and self.blobs.get(blob_key(ref, sha), path) is None:
                    continue  # deleted while we listed
                self._cached[ref] = sha
                found[ref] = path
        return found

    def _restore_if_lost(self) -> None:
        """When the store lost its models since this process last looked (a new epoch), publish
        again the versions this process holds and its default (see the module's docstring)."""
        epoch = cast(bytes | None, self.redis.get(EPOCH))
        if epoch is None:  # a new store, or one that lost its data: the first to see it says so
            fresh = secrets.token_hex(8).encode()
            epoch = fresh if self.redis.set(EPOCH, fresh, nx=True) else cast(bytes, self.redis.get(EPOCH))
        lost, self._epoch = self._epoch is not None and epoch != self._epoch, epoch
        if not lost:
            return
        restored = [ref for ref, sha in list(self._cached.items()) if self._republish(ref, sha)]
        if self._pointer is not None and not self.redis.exists(POINTER):
            self.write_pointer(self._pointer)
        log.warning(
            "%s lost its models (restarted empty?): published again %d version(s) held here: %s",
            self,
            len(restored),
            ", ".join(field(ref) for ref in sorted(restored)) or "none",
        )

    def _republish(self, ref: Ref, sha: str) -> bool:
        """Put back version ref from this process's cached file, unless the store has it or the
        file is no longer the one checked."""
        path = self.model_dir / ref[0] / f"{ref[1]}.npz"
        if self.redis.hexists(INDEX, field(ref)) or not path.is_file() or file_sha256(path) != sha:
            return False
        self.blobs.put(blob_key(ref, sha), path)
        return bool(self.redis.hsetnx(INDEX, field(ref), sha))

    def read_pointer(self) -> Ref | None:
        with reaching(str(self)):
            raw = self.redis.get(POINTER)
        if not raw:
            return None
        name, _, version = cast(bytes, raw).decode().partition("/")
        if not version.isdigit():
            return None
        self._pointer = (name, int(version))
        return self._pointer

    def write_pointer(self, ref: Ref) -> bool:
        with reaching(str(self)):
            return bool(self._set_default([INDEX, POINTER], [field(ref)]))

    def publish(self, ref: Ref, path: Path) -> bool:
        sha = file_sha256(path)
        with reaching(str(self)):
            self.blobs.put(blob_key(ref, sha), path)
            if not self.redis.hsetnx(INDEX, field(ref), sha):
                if self.redis.hget(INDEX, field(ref)) != sha.encode():  # not the same file's blob
                    self.blobs.delete(blob_key(ref, sha))
                return False
        self._cached[ref] = sha
        return True

    def withdraw(self, ref: Ref, path: Path) -> bool:
        with reaching(str(self)):
            sha = self._withdraw([INDEX, POINTER], [field(ref)])
            if sha is None:
                return False
            if sha:
                self.blobs.delete(blob_key(ref, cast(bytes, sha).decode()))
        self._cached.pop(ref, None)
        path.unlink(missing_ok=True)
        return True
