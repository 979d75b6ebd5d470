"""The checkpoint directory: naming, commit records, `latest()`, retention.

A checkpoint counts only once its ``COMMIT.json`` exists; that file is written after every
rank finished writing. Retention removes ``COMMIT.json`` first, so a delete interrupted half-way
leaves an uncommitted directory that :meth:`CheckpointStore.latest` ignores.

Lines: ``checkpoint.uri`` holds the job's checkpoints (``step-NNNNNNNNN/``) and, once a run was
started with ``--fresh``, lines of their own (``fresh-YYYYmmdd-HHMMSS/step-.../``) and a
``LINE.json`` naming the newest. A store opened on the URI follows ``LINE.json``; one opened
with a line uses it (a requeued fresh job keeps its line even after a newer one was started).
Nothing is deleted to start fresh.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace

from shipyard import storage
from shipyard.errors import CheckpointError

COMMIT = "COMMIT.json"
LINE = "LINE.json"  # {"line": "fresh-..."}: the line a store opened on the bare URI follows
_STEP_DIR = re.compile(r"^step-(\d{9})$")
_LINE = re.compile(r"^fresh-\d{8}-\d{6}$")
MAX_LINE_BYTES = 1024
# COMMIT.json is read back from storage, which is untrusted: at most this many bytes. It holds
# every rank's data state (a few hundred bytes each) and ``ctx.state``'s JSON (at most 1 MiB).
MAX_COMMIT_BYTES = 16 * 2**20


def new_line(now: float | None = None) -> str:
    """A new line's name, from the UTC time (what ``--fresh`` sets as ``checkpoint.line``)."""
    return time.strftime("fresh-%Y%m%d-%H%M%S", time.gmtime(now))


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


@dataclass(frozen=True)
class CommitRecord:
    step: int
    epoch: int
    world: int
    strategy: str
    time: float
    data: list[dict] = field(default_factory=list)   # per-rank data-stream state, by rank
    files: dict[str, int] = field(default_factory=dict)  # relative name -> bytes
    parts: list[str] = field(default_factory=list)  # names of the prepared parts saved ("" the unnamed one)
    # ``ctx.state``: {"json": {key: value}, "tensors": {key: {"shape": [...], "dtype": "float32"}}}
    # (the tensors themselves are DCP's ``state.<key>``; see runtime/user_state.py)
    state: dict = field(default_factory=dict)
    # Set by ``ctx.stop`` / a break out of ``ctx.batches()``: {"reason": str, "epochs": int}, the
    # dataset epochs the stopped run had (a later run with more epochs goes on; see runtime/stopping.py)
    finished: dict | None = None
    uri: str = ""

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


@dataclass(frozen=True)
class Listed:
    step: int
    uri: str
    committed: bool
    record: CommitRecord | None


class CheckpointStore:
    """The checkpoints of one line under ``uri`` (``line``, else the one ``LINE.json`` names,
    else the URI itself); ``self.uri`` and ``self.root`` are that line's."""

    def __init__(self, uri: str, line: str | None = None):
        self.base_uri = uri.rstrip("/")
        try:
            self.fs, self.base_root = storage.filesystem(self.base_uri)
        except ValueError as e:
            raise CheckpointError(f"checkpoint.uri: {e}") from None
        self.line = line if line is not None else self._followed_line()
        self.uri = storage.join(self.base_uri, self.line) if self.line else self.base_uri
        self.root = storage.join(self.base_root, self.line) if self.line else self.base_root

    def _followed_line(self) -> str | None:
        """The line ``LINE.json`` names (checked: a file in a bucket is anyone's), or None."""
        path = storage.join(self.base_root, LINE)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read(MAX_LINE_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise CheckpointError(f"checkpoint.uri: {self.base_uri}: cannot read {LINE} ({e})") from None
        try:
            line = json.loads(raw)["line"] if len(raw) <= MAX_LINE_BYTES else None
        except (ValueError, KeyError, TypeError):
            line = None
        if not isinstance(line, str) or not _LINE.match(line):
            raise CheckpointError(f"checkpoint.uri: {self.base_uri}/{LINE} is not a line record shipyard wrote "
                                  f"(expected {{\"line\": \"fresh-YYYYmmdd-HHMMSS\"}}, at most {MAX_LINE_BYTES} bytes)")
        return line

    def follow_here(self) -> None:
        """Make this store's line the one later runs of the bare URI follow, unless a newer line
        already is (a requeued job of an older fresh start must not take it back)."""
        if not self.line:
            return
        current = CheckpointStore(self.base_uri).line
        if current is not None and current >= self.line:
            return
        storage.ensure_dir(self.fs, self.base_root)
        self.fs.pipe_file(storage.join(self.base_root, LINE), json.dumps({"line": self.line}).encode())

    def uri_for(self, step: int) -> str:
        return storage.join(self.uri, step_dir(step))

    def path_for(self, step: int) -> str:
        return storage.join(self.root, step_dir(step))

    def check_writable(self) -> None:
        """Fail early, naming the URI, when checkpoints cannot be written there (a probe object)."""
        probe = storage.join(self.root, ".shipyard-write-probe")
        try:
            storage.ensure_dir(self.fs, self.root)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint.uri: {self.uri}: bucket or directory does not exist") from None
        except PermissionError as e:
            raise CheckpointError(f"checkpoint.uri: {self.uri}: access denied ({e})") from None
        except OSError as e:
            raise CheckpointError(f"checkpoint.uri: {self.uri}: not writable ({e})") from None

    def _steps(self) -> list[int]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        steps = []
        for e in entries:
            m = _STEP_DIR.match(e.rstrip("/").rsplit("/", 1)[-1])
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def read_record(self, step: int) -> CommitRecord | None:
        """The commit record at ``step``, or None when there is none. A record larger than
        :data:`MAX_COMMIT_BYTES` or not of the shape shipyard writes is a CheckpointError: storage
        is anyone's who can write the bucket, so nothing is believed before it is checked."""
        path = storage.join(self.path_for(step), COMMIT)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read(MAX_COMMIT_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(raw) > MAX_COMMIT_BYTES:
            raise CheckpointError(f"{self.uri_for(step)}/{COMMIT}: larger than {MAX_COMMIT_BYTES} bytes; not a "
                                  "commit record shipyard wrote")
        try:
            body = json.loads(raw)
            known = {f.name for f in fields(CommitRecord)} - {"uri"}
            if not isinstance(body, dict) or not set(body) <= known:
                raise ValueError(f"unknown keys {sorted(set(body) - known) if isinstance(body, dict) else body!r}")
            record = CommitRecord(**{**body, "uri": self.uri_for(step)})
            _check_record(record)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{self.uri_for(step)}/{COMMIT}: not a commit record shipyard wrote ({e})") from None
        return record

    def list(self) -> list[Listed]:
        out = []
        for step in self._steps():
            rec = self.read_record(step)
            out.append(Listed(step, self.uri_for(step), rec is not None, rec))
        return out

    def latest(self) -> CommitRecord | None:
        """The newest committed checkpoint, or None. Uncommitted directories are ignored."""
        for step in reversed(self._steps()):
            rec = self.read_record(step)
            if rec is not None:
                return rec
        return None

    def clear(self, step: int) -> None:
        """Remove whatever a crashed save left at ``step`` (it was never committed)."""
        path = self.path_for(step)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def commit(self, record: CommitRecord) -> CommitRecord:
        """Write the commit record for a fully written checkpoint; the checkpoint now exists."""
        path = self.path_for(record.step)
        sizes = {}
        for f, info in self.fs.find(path, detail=True).items():
            sizes[f[len(path) + 1:]] = int(info.get("size") or 0)
        record = CommitRecord(**{**asdict(record), "files": sizes, "time": record.time or time.time(),
                                 "uri": self.uri_for(record.step)})
        body = {k: v for k, v in asdict(record).items() if k != "uri"}
        self.fs.pipe_file(storage.join(path, COMMIT), json.dumps(body, indent=1).encode())
        return record

    def mark_finished(self, record: CommitRecord, finished: dict) -> CommitRecord:
        """Rewrite the committed ``record`` as finished (a stop at a step already checkpointed).
        One object written whole: the record before or the record after, never neither."""
        record = replace(record, finished=finished)
        body = {k: v for k, v in asdict(record).items() if k != "uri"}
        self.fs.pipe_file(storage.join(self.path_for(record.step), COMMIT), json.dumps(body, indent=1).encode())
        return record

    def prune(self, keep_last: int | None) -> list[int]:
        """Keep the newest ``keep_last`` committed checkpoints; drop older and abandoned ones."""
        listed = self.list()
        committed = [c.step for c in listed if c.committed]
        if not committed:
            return []
        doomed = committed[:-keep_last] if keep_last else []
        newest = committed[-1]
        doomed += [c.step for c in listed if not c.committed and c.step < newest]
        for step in sorted(doomed):
            commit = storage.join(self.path_for(step), COMMIT)
            if self.fs.exists(commit):
                self.fs.rm_file(commit)  # invisible first, then gone
            self.fs.rm(self.path_for(step), recursive=True)
        return sorted(doomed)


def _check_record(r: CommitRecord) -> None:
    """The types of what a commit record holds (ValueError/TypeError naming what is wrong)."""
    for name in ("step", "epoch", "world"):
        if not isinstance(getattr(r, name), int) or getattr(r, name) < 0:
            raise ValueError(f"{name}: not a non-negative integer")
    if not isinstance(r.data, list) or not all(isinstance(d, dict) for d in r.data):
        raise ValueError("data: not a list of per-rank states")
    if not isinstance(r.parts, list) or not all(isinstance(p, str) for p in r.parts):
        raise ValueError("parts: not a list of names")
    if not isinstance(r.state, dict):
        raise ValueError("state: not an object")
    if r.finished is not None and not (isinstance(r.finished, dict) and isinstance(r.finished.get("reason"), str)
                                       and isinstance(r.finished.get("epochs"), int)):
        raise ValueError('finished: not {"reason": str, "epochs": int}')
