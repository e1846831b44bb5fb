"""RedisJobStore: jobs in the shared Redis, so every replica and every trainer sees every job.

``nextchar serve --store redis://…`` and ``nextchar trainer --store redis://…``
(docs/deploy.md). Layout, all keys under ``nextchar:``::

    jobs                  zset    job id -> created: ListJobs, oldest first
    job:{id}              hash    rec (the record, JSON), owner (the claim that may write), cancel
    job:{id}:records      list    its progress records (JSON), appended
    job:{id}:text         blob    its training text (nextchar.server.blobs)
    job:{id}:checkpoint   blob    the latest checkpoint its trainer took
    jobs:queue            stream  one entry {job: id} per turn in the queue; consumer group "trainers"
    jobs:changes          channel "state:{id}" or "progress:{id}" after each change (pub/sub)

An ended job beyond the newest ``max_finished_jobs`` goes with all its keys (``remove``).

The queue is a Redis Stream read by a consumer group: a trainer takes an entry
with XREADGROUP (each entry goes to one trainer), and the entry stays in the
group's pending list, owned by that trainer, until the trainer releases it
(XACK; a requeue adds a new entry first). The pending entry is the trainer's
**lease**: a live trainer renews it every few seconds (XCLAIM of its own entry,
which resets the entry's idle time), and a trainer that finds an entry idle for
longer than the lease takes it over (XAUTOCLAIM): its trainer died, and the job
resumes from the checkpoint blob. Taking a job writes the claim into the job's
``owner``; every write a trainer makes names its claim and is refused once the
owner is another, so a trainer given up for dead (a long pause) stops instead of
overwriting the job.

Each change is published on ``jobs:changes`` (by the same script or transaction as
the change), and each process's store has one thread subscribed to it that tells
its listeners (``subscribe``): watchers and idle trainers hear of changes made by
any replica or trainer as they happen. Pub/sub may drop messages while a
connection is down, so after every (re)subscription the listeners hear "any job".
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import redis
from nextchar.server.blobs import Blobs, file_sha256, reaching
from nextchar.server.errors import NotFound, shown
from nextchar.server.training.store import (
    CHECKPOINT_FILE,
    PROGRESS,
    STATE,
    TEXT_FILE,
    Change,
    Claim,
    Job,
    Listener,
)
from redis.exceptions import RedisError, ResponseError

PREFIX = "nextchar:"
INDEX, QUEUE, GROUP = PREFIX + "jobs", PREFIX + "jobs:queue", "trainers"
CHANGES = PREFIX + "jobs:changes"
RESUBSCRIBE = 1.0  # seconds between tries to subscribe again while Redis is down
log = logging.getLogger("nextchar.server")

# KEYS: job:{id}; ARGV: owner ("" = no claim), channel, message, field, value, ... Writes (and
# publishes message) only while owner holds the job.
FENCED_HSET = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS: job:{id}, job:{id}:records; ARGV: owner, record, channel, message
FENCED_RPUSH = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: queue, job:{id}; ARGV: group, consumer, entry, owner. Renews the lease (resets the entry's
# idle time) if this trainer still holds the entry and the job.
RENEW = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[2], 'owner') ~= ARGV[4] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


# KEYS: job:{id}, job:{id}:records, jobs; ARGV: id. Removes the job only while it is ended: 1, else 0.
REMOVE = """
local rec = redis.call('HGET', KEYS[1], 'rec')
if not rec then return 0 end
local state = cjson.decode(rec)['state']
if state ~= 'succeeded' and state ~= 'failed' and state ~= 'cancelled' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""


def job_key(job_id: str, part: str = "") -> str:
    """The job's hash, or its part: "records", "text" or "checkpoint"."""
    return f"{PREFIX}job:{job_id}" + (f":{part}" if part else "")


def owner(claim: Claim) -> str:
    return f"{claim.trainer}/{claim.entry}"


def change(job_id: str, what: Change = STATE) -> str:
    """The message published on CHANGES."""
    return f"{what}:{job_id}"


class RedisJobStore:
    """The JobStore protocol on Redis; lease: seconds a trainer's claim lasts without renewal."""

    def __init__(self, client: redis.Redis, url: str, lease: float, cache: Path) -> None:
        self.redis, self.url = client, url
        self.cache = cache  # model_dir/_jobs: the texts and checkpoints of jobs trained here
        self.blobs = Blobs(client)
        self.lease_ms = int(lease * 1000)
        self._fenced_hset = client.register_script(FENCED_HSET)
        self._fenced_rpush = client.register_script(FENCED_RPUSH)
        self._renew = client.register_script(RENEW)
        self._remove = client.register_script(REMOVE)
        self._group_ready = False
        self._listeners: list[Listener] = []
        self._listening: threading.Thread | None = None

    def __str__(self) -> str:
        return f"job store {self.url}"

    def load(self) -> list[Job]:
        with reaching(str(self)):
            self._group()
        return []  # a dead trainer's jobs come back through its lease, to any trainer

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self._listening is None:
            self._listening = threading.Thread(target=self._listen, name="job-changes", daemon=True)
            self._listening.start()

    def _listen(self) -> None:
        """Tell the listeners of every change published, for as long as the process lives."""
        failing = False
        while True:
            try:
                with contextlib.closing(self.redis.pubsub(ignore_subscribe_messages=True)) as pubsub:
                    pubsub.subscribe(CHANGES)
                    self._tell("", STATE)  # whatever happened while nobody listened
                    failing = False
                    while True:
                        message = pubsub.get_message(timeout=RESUBSCRIBE)
                        if message is not None:
                            what, _, job_id = message["data"].decode().partition(":")
                            self._tell(job_id, PROGRESS if what == PROGRESS else STATE)
            except RedisError as exc:
                if not failing:  # once per outage
                    log.warning("%s: job changes not heard (%s); subscribing again", self, exc)
                failing = True
                time.sleep(RESUBSCRIBE)

    def _tell(self, job_id: str, what: Change) -> None:
        for listener in self._listeners:
            listener(job_id, what)

    def _group(self) -> None:
        """The consumer group, made on first use (with its stream); another process may have made it."""
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # ------------------------------------------------------------ records

    def add(self, job: Job, text: Path) -> None:
        with reaching(str(self)):
            self._group()
            self.blobs.put(job_key(job.id, "text"), text)
            pipe = self.redis.pipeline()
            pipe.hset(job_key(job.id), mapping={"rec": json.dumps(job.record()), "owner": ""})
            pipe.zadd(INDEX, {job.id: job.created})
            pipe.xadd(QUEUE, {"job": job.id})
            pipe.publish(CHANGES, change(job.id))
            pipe.execute()
        text.unlink(missing_ok=True)

    def get(self, job_id: str) -> Job:
        jobs = self._read([job_id])
        if not jobs:
            raise NotFound(f"job {shown(job_id)}: no such job", subject="job")
        return jobs[0]

    def all(self) -> list[Job]:
        with reaching(str(self)):
            ids = [i.decode() for i in cast(list[bytes], self.redis.zrange(INDEX, 0, -1))]
        return self._read(ids)

    def _read(self, ids: list[str]) -> list[Job]:
        with reaching(str(self)):
            pipe = self.redis.pipeline()
            for job_id in ids:
                pipe.hget(job_key(job_id), "rec")
                pipe.lindex(job_key(job_id, "records"), -1)
            replies = pipe.execute()
        jobs = []
        for rec, latest in zip(replies[::2], replies[1::2], strict=True):
            if rec is None:
                continue
            job = Job.from_record(json.loads(rec))
            job.latest = json.loads(latest) if latest else None
            jobs.append(job)
        return jobs

    def records(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        with reaching(str(self)):
            raw = cast(list[bytes], self.redis.lrange(job_key(job_id, "records"), start, -1))
        return [json.loads(r) for r in raw]

    def save(self, job: Job, claim: Claim | None = None) -> bool:
        with reaching(str(self)):
            fence = owner(claim) if claim else ""
            return bool(
                self._fenced_hset(
                    [job_key(job.id)], [fence, CHANGES, change(job.id), "rec", json.dumps(job.record())]
                )
            )

    def requeue(self, job: Job) -> None:
        with reaching(str(self)):
            self._group()
            self.save(job)
            self.redis.xadd(QUEUE, {"job": job.id})
            self.redis.publish(CHANGES, change(job.id))  # in the queue now: a trainer may take it

    def request_cancel(self, job_id: str) -> None:
        with reaching(str(self)):
            pipe = self.redis.pipeline()
            pipe.hset(job_key(job_id), "cancel", 1)
            pipe.publish(CHANGES, change(job_id))
            pipe.execute()

    def cancel_requested(self, job_id: str) -> bool:
        with reaching(str(self)):
            return self.redis.hget(job_key(job_id), "cancel") is not None

    # ------------------------------------------------------------ the queue

    @contextlib.contextmanager
    def _queue_call(self) -> Iterator[None]:
        """A call on the queue's stream: UNAVAILABLE when Redis fails; when Redis lost the stream
        (a restart without persistence), the next call makes it and its group again."""
        with reaching(str(self)):
            self._group()
            try:
                yield
            except ResponseError as exc:
                if "NOGROUP" in str(exc) or "no such key" in str(exc):
                    self._group_ready = False
                raise

    def take(self, trainer: str) -> Claim | None:
        with self._queue_call():
            return self._take(trainer)

    def _take(self, trainer: str) -> Claim | None:
        # a lease run out first: that job's trainer died, and it waits for nobody else
        cursor: Any = "0-0"
        while True:  # each call looks at a few pending entries: go through all of them
            cursor, entries, _ = self.redis.xautoclaim(QUEUE, GROUP, trainer, self.lease_ms, cursor, count=1)
            if entries or cursor in (b"0-0", "0-0"):
                break
        if not entries:
            read = cast(list[Any], self.redis.xreadgroup(GROUP, trainer, {QUEUE: ">"}, count=1))
            entries = read[0][1] if read else []
        if not entries:
            return None
        entry, fields = entries[0]
        claim = Claim(fields[b"job"].decode(), entry.decode(), trainer)
        self.redis.hset(job_key(claim.job_id), "owner", owner(claim))
        return claim

    def queue(self) -> list[str]:
        """The stream's entries no trainer has read yet, in stream order (what XREADGROUP hands
        out next; a requeued job's new entry is at the end). A job whose trainer died is not
        among them: its entry is pending, and the next take resumes it first."""
        with self._queue_call():
            groups = self.redis.xinfo_groups(QUEUE)
            last = next(
                (g["last-delivered-id"] for g in groups if g["name"] in (GROUP, GROUP.encode())), b"0-0"
            )
            last = last.decode() if isinstance(last, bytes) else str(last)
            entries = cast(list[Any], self.redis.xrange(QUEUE, min=f"({last}", max="+"))
        return [fields[b"job"].decode() for _, fields in entries]

    def renew(self, claim: Claim) -> bool:
        with reaching(str(self)):
            return bool(
                self._renew([QUEUE, job_key(claim.job_id)], [GROUP, claim.trainer, claim.entry, owner(claim)])
            )

    def holder(self, job_id: str) -> str | None:
        with reaching(str(self)):
            rec, held = cast(list[bytes | None], self.redis.hmget(job_key(job_id), ["rec", "owner"]))
        if rec is None:
            return None
        return (held or b"").decode().rpartition("/")[0]  # owner() is "trainer/entry"

    def release(self, claim: Claim, requeue: bool) -> None:
        with reaching(str(self)):
            pipe = self.redis.pipeline()
            if requeue:
                pipe.xadd(QUEUE, {"job": claim.job_id})
            pipe.xack(QUEUE, GROUP, claim.entry)
            pipe.xdel(QUEUE, claim.entry)
            pipe.execute()
            self._fenced_hset(
                [job_key(claim.job_id)], [owner(claim), CHANGES, change(claim.job_id), "owner", ""]
            )

    def append(self, claim: Claim, record: dict[str, Any]) -> bool:
        keys = [job_key(claim.job_id), job_key(claim.job_id, "records")]
        with reaching(str(self)):
            return bool(
                self._fenced_rpush(
                    keys, [owner(claim), json.dumps(record), CHANGES, change(claim.job_id, PROGRESS)]
                )
            )

    def trim(self, job_id: str, keep: int) -> None:
        with reaching(str(self)):
            if keep:
                self.redis.ltrim(job_key(job_id, "records"), 0, keep - 1)
            else:  # LTRIM 0 -1 would keep them all
                self.redis.delete(job_key(job_id, "records"))
            self.redis.publish(CHANGES, change(job_id, PROGRESS))

    # ------------------------------------------------------------ files

    def fetch(self, job: Job) -> Path:
        directory = self.cache / job.id
        directory.mkdir(parents=True, exist_ok=True)
        text, checkpoint = directory / TEXT_FILE, directory / CHECKPOINT_FILE
        with reaching(str(self)):
            sha = self.blobs.sha256(job_key(job.id, "text"))
            if sha is None:
                raise FileNotFoundError(f"job {job.id}: its text is gone from {self.url}")
            if not text.is_file() or file_sha256(text) != sha:  # a trainer that ran it before keeps it
                self.blobs.get(job_key(job.id, "text"), text)
            if self.blobs.get(job_key(job.id, "checkpoint"), checkpoint) is None:
                checkpoint.unlink(missing_ok=True)  # none taken yet: the run starts afresh
        return directory

    def keep_checkpoint(self, claim: Claim, path: Path) -> bool:
        with reaching(str(self)):
            if self.redis.hget(job_key(claim.job_id), "owner") != owner(claim).encode():
                return False
            self.blobs.put(job_key(claim.job_id, "checkpoint"), path)
            return True

    def discard(self, job_id: str) -> None:
        with reaching(str(self)):
            for part in ("text", "checkpoint"):
                self.blobs.delete(job_key(job_id, part))
        shutil.rmtree(self.cache / job_id, ignore_errors=True)

    def remove(self, job_id: str) -> bool:
        with reaching(str(self)):
            keys = [job_key(job_id), job_key(job_id, "records"), INDEX]
            if not self._remove(keys, [job_id]):
                return False
            self.redis.publish(CHANGES, change(job_id))
        self.discard(job_id)  # a failed job's text and checkpoint, kept for its resume
        return True
