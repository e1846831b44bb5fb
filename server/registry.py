"""The model registry: versions of named models on disk, checked at start and shared by sessions.

Layout under ``model_dir``::

    <name>/<version>.npz   one model file per version (nextchar.core.modelfile)
    _default.json          {"name": ..., "version": ...}, replaced atomically

Where the files are the truth is a ModelFiles backend: this directory
(LocalModelFiles, the default), or the shared Redis with this directory as a cache
(nextchar.server.shared_models: replicas with separate directories see the same
models, versions and default). The registry's own files start with "_", which no
model name can (NAME_RE), so no model can collide with them; a pointer from before (``default.json``) is moved
there at start. Temporary files that a killed save left behind are removed at
start. A file that fails to load marks its version unavailable with the reason
(naming the file relative to model_dir: no server paths reach clients), and the
server starts anyway; a default that is unavailable gives way to the newest
available version. Sessions hold a ModelVersion by reference, so deleting or
replacing the default never disturbs a live session: it finishes on its version.

Every file is loaded and checked at start, but only the default and the versions
asked for within MODEL_IDLE hold their network (``release_idle``); ``require`` loads
a released one again, checked the same way: a registry lists every version ever
trained, and holding every network (about 2 MB each for the shipped GRU-256) would cost
every replica and trainer that much per version.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from nextchar.core.adapt import AdaptConfig, Rule, rule
from nextchar.core.atomic import atomic_write
from nextchar.core.config import ModelConfig
from nextchar.core.inference import initial_probs
from nextchar.core.model import CharRNN
from nextchar.core.modelfile import ModelFileError, load_model, save_model
from nextchar.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, shown

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEFAULT_NAME = "default"
POINTER = "_default.json"
LEGACY_POINTER = "default.json"  # where the pointer lived before: a model name could collide with it
STALE_TMP = 60.0  # seconds: a temporary file older than this belongs to a save that died
REFRESH_INTERVAL = 1.0  # seconds between directory scans for models written by other processes
MODEL_IDLE = 300.0  # seconds a version's network is held after it was last asked for (not the default's)
log = logging.getLogger("nextchar.server")
Ref = tuple[str, int]  # (name, version)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(f"model.name: {shown(name)} must be 1-64 characters of [a-z0-9_.-]")
    return name


@dataclass(eq=False)
class ModelVersion:
    """One version: what its file holds (metadata, history) when it loaded, else the reason it did
    not; and its network while it is held (see the module's docstring: require, release)."""

    name: str
    version: int
    path: Path
    net: CharRNN | None = None  # the network while held; None when released or unavailable
    reason: str = ""  # why the file does not load; "" when it does
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    initial_probs: np.ndarray | None = None  # (V,) the prediction before any character
    used: float = field(default_factory=time.monotonic)  # when require() last gave the network
    _loading: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _rule: Rule | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return not self.reason

    @property
    def checksum(self) -> str:
        return str(self.meta.get("checksum", ""))

    def require(self) -> CharRNN:
        """The network, loaded again if it was released (blocking: on the event loop, ask
        nextchar.server.catalog instead)."""
        net = self.net
        if net is None:
            net = self._reload()
        self.touch()
        return net

    def adapt_rule(self, net: CharRNN) -> Rule:
        """How this version's adaptive sessions step (its file's AdaptConfig, checked when the file
        loaded), made once: it depends on the weights' shapes, not their values."""
        if self._rule is None:
            self._rule = rule(net, AdaptConfig.from_dict(self.meta.get("adapt")))
        return self._rule

    def touch(self) -> None:
        """Asked for now: the idle sweep (Registry.release_idle) keeps the network."""
        self.used = time.monotonic()

    def release(self) -> None:
        """Let go of the network (sessions and batches that took it keep theirs); require() loads it again."""
        self.net = None

    def _reload(self) -> CharRNN:
        """The network from the file again, checked as at start; a file that no longer loads (or
        holds other weights) makes the version unavailable."""
        with self._loading:
            if self.net is None and not self.reason:
                loaded = ModelVersion.load(self.name, self.version, self.path)
                if loaded.reason or loaded.checksum != self.checksum:
                    self.reason = (
                        loaded.reason or f"{self.name}/{self.path.name}: changed since it was loaded"
                    )
                    log.warning("model %s v%d unavailable: %s", self.name, self.version, self.reason)
                else:
                    self.net = loaded.net
            if self.net is None:
                raise FailedPrecondition(f"model {self.name} v{self.version} is unavailable: {self.reason}")
            return self.net

    @classmethod
    def load(cls, name: str, version: int, path: Path, hold: bool = True) -> ModelVersion:
        """The version in path, checked; hold=False releases its network at once (only its
        metadata and first prediction stay)."""
        shown_path = f"{name}/{path.name}"  # relative to model_dir: reasons reach clients
        try:
            mf = load_model(path)
        except ModelFileError as exc:
            return cls(name, version, path, reason=str(exc).replace(str(path), shown_path))
        except Exception as exc:  # any damage must mark the version, not stop the server
            reason = f"{shown_path}: {type(exc).__name__}: {exc}".replace(str(path), shown_path)
            return cls(name, version, path, reason=reason)
        mv = cls.from_model(name, version, path, mf.model, mf.history, mf.summary, mf.meta)
        if not hold:
            mv.release()
        return mv

    @classmethod
    def from_model(
        cls,
        name: str,
        version: int,
        path: Path,
        net: CharRNN,
        history: list[dict[str, Any]],
        summary: dict[str, Any],
        meta: dict[str, Any],
    ) -> ModelVersion:
        meta = {"vocab": net.vocab.chars, **meta}  # what clients are told, with no network needed
        return cls(name, version, path, net, "", history, summary, meta, initial_probs(net))

    @property
    def vocab_chars(self) -> str:
        """The vocabulary, from the metadata (no network needed); "" when the file did not load."""
        return str(self.meta.get("vocab", "")) if self.available else ""

    @property
    def config(self) -> ModelConfig | None:
        """The model's configuration, from the metadata (checked at load); None when the file did not load."""
        return ModelConfig(**self.meta["config"]) if self.available and "config" in self.meta else None


class ModelFiles(Protocol):
    """Where the registry's files and default pointer are kept (blocking I/O)."""

    def files(self) -> dict[Ref, Path]:
        """Every model file, by (name, version), as a path on this machine."""

    def read_pointer(self) -> Ref | None:
        """The default as last written; None when there is none or it is unreadable."""

    def write_pointer(self, ref: Ref) -> bool:
        """Make ref the default; False when that version is gone."""

    def publish(self, ref: Ref, path: Path) -> bool:
        """The model file saved at path becomes version ref for every reader; False when another
        process took that version first (path is then left to the caller)."""

    def withdraw(self, ref: Ref, path: Path) -> bool:
        """Delete the version; False when it is the default."""


class LocalModelFiles:
    """The files in model_dir: ``<name>/<version>.npz`` and ``_default.json``."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    def files(self) -> dict[Ref, Path]:
        found: dict[Ref, Path] = {}
        for directory in sorted(p for p in self.model_dir.iterdir() if p.is_dir()):
            if not NAME_RE.match(directory.name):
                continue
            for path in sorted(directory.glob("*.npz")):
                if path.stem.isdigit() and int(path.stem) >= 1:
                    found[(directory.name, int(path.stem))] = path
        return found

    def read_pointer(self) -> Ref | None:
        try:
            data = json.loads((self.model_dir / POINTER).read_text())
            return (str(data["name"]), int(data["version"]))
        except (ValueError, KeyError, TypeError, OSError):  # missing, or damaged
            return None

    def write_pointer(self, ref: Ref) -> bool:
        with atomic_write(self.model_dir / POINTER) as f:
            f.write(json.dumps({"name": ref[0], "version": ref[1]}).encode())
        return True

    def publish(self, ref: Ref, path: Path) -> bool:
        return True  # saved in place, under the registry's lock

    def withdraw(self, ref: Ref, path: Path) -> bool:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the model's last version: no empty directory left
            path.parent.rmdir()
        return True


class Registry:
    """Thread-safe: jobs register from a worker thread while the event loop reads."""

    def __init__(self, model_dir: Path, files: ModelFiles | None = None) -> None:
        self.model_dir = model_dir
        self.files = files or LocalModelFiles(model_dir)
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], ModelVersion] = {}
        self._default: tuple[str, int] | None = None
        self._refreshed = -REFRESH_INTERVAL  # monotonic time of the last directory scan

    # ------------------------------------------------------------ loading

    def load_all(self) -> None:
        """Scan model_dir; every version loads or is marked unavailable."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self._tidy()
        pointer = self.files.read_pointer()  # its version keeps its network; the rest only metadata
        files = self.files.files()
        versions = {key: ModelVersion.load(*key, path, hold=key == pointer) for key, path in files.items()}
        with self._lock:
            self._versions = versions
            self._default = self._read_pointer()
        self._refreshed = time.monotonic()

    def _tidy(self) -> None:
        """Move a pointer from before to its name; remove what killed saves left behind."""
        legacy = self.model_dir / LEGACY_POINTER
        if legacy.is_file() and not (self.model_dir / POINTER).exists():
            legacy.replace(self.model_dir / POINTER)
        now = time.time()
        for tmp in [*self.model_dir.glob(".*.tmp"), *self.model_dir.glob("*/.*.tmp")]:
            with contextlib.suppress(OSError):  # another process may just have renamed it
                if now - tmp.stat().st_mtime > STALE_TMP:
                    tmp.unlink()

    def refresh(self, *, force: bool = False) -> int:
        """Follow what other processes changed since (``nextchar train --local``, other replicas on
        a shared store): load the versions they wrote, drop the ones they deleted, and take up the
        default they set; returns how many versions are new.

        Versions already loaded stay the same objects, so live sessions keep theirs.
        Unless forced (ListModels), at most one scan per REFRESH_INTERVAL, so
        unknown-model requests cannot turn into a scan each.
        """
        if not force and time.monotonic() - self._refreshed < REFRESH_INTERVAL:
            return 0
        self._refreshed = time.monotonic()
        files = self.files.files()
        pointer = self.files.read_pointer()
        new = {
            key: ModelVersion.load(*key, path, hold=key == pointer)
            for key, path in files.items()
            if key not in self._versions
        }
        with self._lock:
            for key in [k for k in self._versions if k not in files]:
                del self._versions[key]
            for key, mv in new.items():
                self._versions.setdefault(key, mv)
            self._default = self._read_pointer()
        return len(new)

    def _read_pointer(self) -> tuple[str, int] | None:
        """The pointer's version when it is usable, else the newest available one (a damaged
        pointer, or one naming a version that does not load)."""
        ref = self.files.read_pointer()
        if ref is not None and ref in self._versions and self._versions[ref].available:
            return ref
        available = [k for k, v in self._versions.items() if v.available]
        prefer = [k for k in available if k[0] == DEFAULT_NAME] or available
        return max(prefer, key=lambda k: k[1]) if prefer else None

    # ------------------------------------------------------------ queries

    @property
    def is_empty(self) -> bool:
        return not self._versions

    @property
    def default(self) -> ModelVersion | None:
        ref = self._default
        return self._versions.get(ref) if ref else None

    def versions(self) -> list[ModelVersion]:
        with self._lock:
            return [self._versions[k] for k in sorted(self._versions)]

    def release_idle(self, idle: float = MODEL_IDLE) -> int:
        """Release the networks of the versions not asked for within idle seconds, except the
        default's; returns how many."""
        now, default = time.monotonic(), self.default
        idle_versions = [
            mv for mv in self.versions() if mv is not default and mv.net is not None and now - mv.used > idle
        ]
        for mv in idle_versions:
            mv.release()
        return len(idle_versions)

    def check_room(self, limit: int) -> None:
        """Refuse (RESOURCE_EXHAUSTED) while the model files of every version, together, hold limit
        bytes or more: every job adds a version to the disk (and to every replica's cache).
        Blocking: a stat per version."""
        held = 0
        for mv in self.versions():
            with contextlib.suppress(OSError):  # deleted meanwhile
                held += mv.path.stat().st_size
        if held >= limit:
            raise ResourceExhausted(
                f"the registry holds {held >> 20} MiB of model files (max_model_bytes {limit >> 20} MiB); "
                "delete versions you no longer need (DeleteModel) and retry",
                limit="max_model_bytes",
            )

    def resolve(self, name: str, version: int, *, need_available: bool = True) -> ModelVersion:
        """name "" = the default model; version 0 = the newest available version of name.

        A miss looks on disk once more (refresh) before answering NOT_FOUND.
        """
        try:
            return self._resolve(name, version, need_available)
        except NotFound:
            if not self.refresh():
                raise
            return self._resolve(name, version, need_available)

    def lookup(self, name: str, version: int) -> ModelVersion:
        """What resolve answers from memory alone: no rescan, no load (NOT_FOUND for a version
        not seen yet)."""
        return self._resolve(name, version, need_available=False)

    def _resolve(self, name: str, version: int, need_available: bool) -> ModelVersion:
        with self._lock:
            if not name:
                if self._default is None:
                    raise NotFound(
                        "no default model: the registry is empty; train one first", subject="model"
                    )
                name, default_version = self._default
                version = version or default_version
            check_name(name)
            if version == 0:
                candidates = [v for (n, v), mv in self._versions.items() if n == name and mv.available]
                if not candidates:
                    raise NotFound(f"model {shown(name)}: no available version", subject="model")
                version = max(candidates)
            mv = self._versions.get((name, version))
        if mv is None:
            raise NotFound(f"model {shown(name)} version {version}: not in the registry", subject="model")
        if need_available:
            mv.require()
        return mv

    # ------------------------------------------------------------ changes

    def register(
        self,
        name: str,
        model: CharRNN,
        *,
        history: list[dict[str, Any]],
        summary: dict[str, Any],
        promote: bool = False,
        adapt: AdaptConfig | None = None,
    ) -> ModelVersion:
        """Save as the next version of name (atomic rename) and publish it; blocking file I/O.

        adapt: the model's tuned adaptation (nextchar.core.train.TrainResult.adapt), recorded in
        its file; without one, sessions of it adapt by the defaults (ModelFile.adapt)."""
        check_name(name)
        with self._lock:
            mv = self._save(name, itertools.count(self._next(name)), model, history, summary, promote, adapt)
        assert mv is not None  # count() never runs out
        return mv

    def next_version(self, name: str) -> int:
        """The version register would give name now (another process may take it first)."""
        with self._lock:
            return self._next(name)

    def _next(self, name: str) -> int:
        taken = [v for (n, v) in self._versions if n == name]
        on_disk = [int(p.stem) for p in (self.model_dir / name).glob("*.npz") if p.stem.isdigit()]
        return max([0, *taken, *on_disk]) + 1

    def register_as(
        self,
        name: str,
        version: int,
        model: CharRNN,
        *,
        history: list[dict[str, Any]],
        summary: dict[str, Any],
        adapt: AdaptConfig | None = None,
    ) -> ModelVersion | None:
        """Save and publish as exactly this version of name, or None when it is taken, here or by
        another process (the first to publish a version has it). Moves the default only into an
        empty registry: a training job reserves its version, then promotes only while it still
        holds the job (nextchar.server.training.pool)."""
        check_name(name)
        with self._lock:
            if (name, version) in self._versions or (self.model_dir / name / f"{version}.npz").exists():
                return None
            return self._save(name, iter((version,)), model, history, summary, False, adapt)

    def install(
        self,
        name: str,
        model: CharRNN,
        *,
        history: list[dict[str, Any]],
        summary: dict[str, Any],
        adapt: AdaptConfig | None = None,
    ) -> ModelVersion | None:
        """Register as version 1 of name and make it the default, unless this registry holds a
        version of name or a shared store's version 1 is taken: None then. Two replicas that
        start at once on one empty shared registry both install the shipped model; with
        register() the second would add it again as v2. (A file on disk is no reason to
        refuse: with shared models it may be a stale cache.)"""
        check_name(name)
        with self._lock:
            if any(n == name for (n, _) in self._versions):
                return None
            return self._save(name, iter((1,)), model, history, summary, True, adapt)

    def _save(
        self,
        name: str,
        versions: Iterator[int],
        model: CharRNN,
        history: list[dict[str, Any]],
        summary: dict[str, Any],
        promote: bool,
        adapt: AdaptConfig | None = None,
    ) -> ModelVersion | None:
        """Save and publish as the first of versions no other process took meanwhile (None when
        each was), under the registry's lock. The file is written beside its place and renamed
        into it once published: a replica sharing this directory that lost the race wrote over
        the winner's file, then unlinked it."""
        for version in versions:
            path = self.model_dir / name / f"{version}.npz"
            staged = path.with_name(f".{version}.{secrets.token_hex(4)}.npz.tmp")  # strays: _tidy's
            save_model(staged, model, history=history, summary=summary, adapt=adapt)
            try:
                meta = load_model(staged).meta  # read back: what sessions use is what is on disk
                if not self.files.publish((name, version), staged):
                    continue  # another replica registered this version meanwhile: its file stays
                staged.replace(path)
                try:
                    if promote or self._default is None:
                        self.files.write_pointer((name, version))
                except BaseException:  # a version is registered whole or not at all
                    path.unlink(missing_ok=True)
                    raise
            finally:
                staged.unlink(missing_ok=True)
            mv = ModelVersion.from_model(name, version, path, model, history, summary, meta)
            self._versions[(name, version)] = mv
            if promote or self._default is None:
                self._default = (name, version)
            return mv
        return None

    def set_default(self, name: str, version: int) -> tuple[ModelVersion, ModelVersion | None]:
        mv = self.resolve(name or DEFAULT_NAME, version)
        with self._lock:
            previous = self._versions.get(self._default) if self._default else None
            if not self.files.write_pointer((mv.name, mv.version)):
                raise NotFound(f"model {mv.name} version {mv.version}: deleted meanwhile", subject="model")
            self._default = (mv.name, mv.version)
        log.info("model %s v%d promoted to default", mv.name, mv.version)
        return mv, previous

    def delete(self, name: str, version: int) -> ModelVersion:
        if version == 0:
            raise InvalidArgument("model.version: give the version to delete")
        mv = self.resolve(name, version, need_available=False)
        with self._lock:
            is_default = self._default == (mv.name, mv.version)
            if is_default or not self.files.withdraw((mv.name, mv.version), mv.path):
                raise FailedPrecondition(
                    f"model {mv.name} v{mv.version} is the default; set another default first"
                )
            del self._versions[(mv.name, mv.version)]
        log.info("model %s v%d deleted", mv.name, mv.version)
        return mv
