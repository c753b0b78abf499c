"""Where served requests are recorded for the monitor: append-only shard files per worker under a sink location.

The handler records a fraction of served requests as :class:`Record`\\ s with a :class:`ShardWriter`; the monitor
reads windows of them back with a :class:`ShardReader` and re-runs SpRAy on them. The sink is a local directory or
any fsspec URL (``s3://...``, ``memory://...``) so many replicas can share one. Layout::

    <sink>/<model>/<version>/<writer_id>-<seq:08d>.shard   closed shard: complete, immutable
    <sink>/<model>/<version>/<writer_id>-<seq:08d>.open    open shard of a live (or crashed) writer, local sinks only
    <sink>/<model>/<version>/<writer_id>-<gen:08d>.journal sampled instances not yet in a shard, local sinks only

A shard is a run of framed records. Each frame is ``MAGIC | u32 payload length | u32 crc32(payload) | payload``
(little endian), so a reader detects a torn tail (a frame cut short by a crash) and corrupt bytes (CRC mismatch)
and resynchronises on the next magic instead of giving up. The payload is ``u32 header length | JSON header |
raw array bytes``: the header carries the scalars and each array's dtype and shape, the arrays follow in order.

Why these choices:

* Local sinks are written in place (``.open``), ``fsync``-ed on every flush and renamed with ``os.replace`` on
  rotation, so a crash loses at most what was not yet flushed and a closed name only ever holds a complete shard.
* Object stores cannot rename atomically or append, so the open shard is buffered in memory and written in one put
  on rotation: readers only ever see whole shards, and a crash loses at most the open shard (bound it with
  ``max_shard_seconds``).
* A sampled instance is answered before its relevance is computed (off the request path), so a killed worker would
  lose the instances it had answered and not yet recorded. The sampler appends each one, model input included, to
  its :class:`Journal` with one ``write`` before the answer leaves (in the kernel's hands: a killed process loses
  nothing, a machine crash the unflushed tail); the next worker on the host finds the journals of writers whose
  process is gone and records what their shards lack (:func:`orphaned_journals`).
* Positions are keyed by ``<version>/<writer_id>`` and a shard's sequence number, never by its file name, so a
  position taken while a shard was ``.open`` stays valid after it is renamed: the bytes and offsets do not change.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

MAGIC = b"\xabUHR"
FRAME = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
HEADER_LENGTH = struct.Struct("<I")
MAX_PAYLOAD = 64 << 20  # a larger declared length is corruption, not a record
FORMAT = 1
CLOSED, OPEN = ".shard", ".open"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_SHARD = re.compile(r"^(?P<writer>.+)-(?P<seq>\d{8,})(?P<suffix>\.shard|\.open)$")
JOURNAL = ".journal"
_JOURNAL = re.compile(r"^(?P<writer>.+)-(?P<gen>\d{8,})\.journal$")


class CorruptRecord(ValueError):
    """Bytes that are not a valid record: wrong magic, length, checksum or payload."""


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{kind} {value!r}: use letters, digits, '.', '_' and '-' (no '/', not starting with '.')")
    return value


def _array_spec(array: np.ndarray) -> list:
    return [array.dtype.str, list(array.shape)]


@dataclass
class Record:
    """One recorded request: what the model predicted, the relevance it was explained with, and a small thumbnail.

    ``relevance`` is stored as float16 (precision enough for clustering relevance maps, half the bytes), divided by its
    largest magnitude first (header ``relevance_scale``): a real model's maps, about 1e-8 a pixel, would underflow
    float16 to zeros; it is read back as float32 at its own scale. ``thumbnail`` is stored as uint8. Either may be None
    when the handler had none to record. ``latent`` is the relevance at the archive's monitor layer summed over positions,
    one value per channel (float32: a few hundred values, exact), which the monitor compares across classes; records
    written before it existed, or by an explainer without a monitor layer, have None.
    """

    prediction: int
    target: int
    probabilities: list[float]
    relevance: np.ndarray | None
    thumbnail: np.ndarray | None
    score: float | None
    timestamp: float
    model: str
    version: str
    request_id: str
    input: np.ndarray | None = None  # the model input itself, float32: journal entries only (see :class:`Journal`)
    latent: np.ndarray | None = None  # (C,) relevance per channel at the monitor layer

    def to_bytes(self) -> bytes:
        """The framed record (magic, length, CRC, payload), ready to append to a shard."""
        arrays, scale = [], 1.0
        if self.relevance is not None:
            magnitude = float(np.abs(np.asarray(self.relevance, np.float32)).max()) if np.size(self.relevance) else 0.0
            scale = magnitude if np.isfinite(magnitude) and magnitude > 0 else 1.0
            arrays.append(("relevance", np.ascontiguousarray(np.asarray(self.relevance, np.float32) / scale, dtype="<f2")))
        if self.thumbnail is not None:
            arrays.append(("thumbnail", np.ascontiguousarray(self.thumbnail, dtype=np.uint8)))
        if self.input is not None:
            arrays.append(("input", np.ascontiguousarray(self.input, dtype="<f4")))
        if self.latent is not None:
            arrays.append(("latent", np.ascontiguousarray(self.latent, dtype="<f4").ravel()))
        header = {
            "format": FORMAT,
            "prediction": int(self.prediction),
            "target": int(self.target),
            "probabilities": [float(p) for p in self.probabilities],
            "score": None if self.score is None else float(self.score),
            "timestamp": float(self.timestamp),
            "model": str(self.model),
            "version": str(self.version),
            "request_id": str(self.request_id),
            "relevance_scale": scale,
            "arrays": [[name, *_array_spec(a)] for name, a in arrays],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        payload = b"".join([HEADER_LENGTH.pack(len(head)), head, *(a.tobytes() for _, a in arrays)])
        return FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "Record":
        """Parse one whole frame; raises :class:`CorruptRecord` when it is torn, altered or not a record."""
        if len(data) < FRAME.size:
            raise CorruptRecord("shorter than a frame header")
        magic, length, crc = FRAME.unpack_from(data)
        if magic != MAGIC or length > MAX_PAYLOAD or len(data) != FRAME.size + length:
            raise CorruptRecord("bad magic or length")
        payload = bytes(data[FRAME.size:])
        if zlib.crc32(payload) != crc:
            raise CorruptRecord("checksum mismatch")
        return cls._from_payload(payload)

    @classmethod
    def _from_payload(cls, payload: bytes) -> "Record":
        try:
            (head_length,) = HEADER_LENGTH.unpack_from(payload)
            header = json.loads(payload[HEADER_LENGTH.size:HEADER_LENGTH.size + head_length])
            offset = HEADER_LENGTH.size + head_length
            arrays = {}
            for name, dtype, shape in header["arrays"]:
                dtype = np.dtype(dtype)
                count = int(np.prod(shape, dtype=np.int64))
                end = offset + count * dtype.itemsize
                if end > len(payload):
                    raise CorruptRecord(f"array {name} runs past the payload")
                arrays[name] = np.frombuffer(payload, dtype, count, offset).reshape(shape).copy()
                offset = end
            if offset != len(payload):
                raise CorruptRecord("trailing bytes in the payload")
            relevance = arrays.get("relevance")
            if relevance is not None:
                relevance = relevance.astype(np.float32) * np.float32(header.get("relevance_scale", 1.0))
            return cls(prediction=int(header["prediction"]), target=int(header["target"]),
                       probabilities=[float(p) for p in header["probabilities"]], relevance=relevance,
                       thumbnail=arrays.get("thumbnail"), score=header["score"], timestamp=float(header["timestamp"]),
                       model=header["model"], version=header["version"], request_id=header["request_id"],
                       input=arrays.get("input"), latent=arrays.get("latent"))
        except CorruptRecord:
            raise
        except (ValueError, KeyError, TypeError, struct.error) as error:
            raise CorruptRecord(f"payload does not parse: {error}") from error


def _mtime(info: dict) -> float:
    """Modification time from an fsspec info dict, whatever the backend calls it; 0 when it has none."""
    for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


@dataclass(order=True)
class _Shard:
    seq: int
    name: str = field(compare=False)
    path: str = field(compare=False)
    closed: bool = field(compare=False)
    size: int = field(compare=False)
    mtime: float = field(compare=False)
    writer: str = field(compare=False)


def _ls(fs, directory: str) -> list[dict]:
    try:
        return fs.ls(directory, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _shards(fs, directory: str) -> list[_Shard]:
    """Shards in one version directory, closed and open; other files are ignored."""
    found = []
    for info in _ls(fs, directory):
        if info.get("type") != "file":
            continue
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        match = _SHARD.match(name)
        if match:
            found.append(_Shard(int(match["seq"]), name, info["name"], match["suffix"] == CLOSED,
                                int(info.get("size") or 0), _mtime(info), match["writer"]))
    return found


def _versions(fs, root: str, model: str) -> list[str]:
    return sorted(info["name"].rstrip("/").rsplit("/", 1)[-1] for info in _ls(fs, f"{root}/{model}")
                  if info.get("type") == "directory")


def _rename(fs, source: str, target: str) -> None:
    if isinstance(fs, LocalFileSystem):
        os.replace(source, target)
    else:
        fs.mv(source, target)


class ShardWriter:
    """Append-only writer of one worker: records go to ``<sink>/<model>/<version>/<writer_id>-<seq:08d>.shard``.

    Each writer owns its shards, so many workers and replicas share a sink without coordination as long as their
    ``writer_id``\\ s differ: e.g. ``f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"``, the start time
    because container restarts reuse host names and pids (a writer that finds shards of its own id continues
    their sequence, but an id reused after :func:`prune` removed all its shards would start again at 0).

    Appends are buffered and flushed every ``flush_every`` records or ``flush_seconds``; a local flush is fsync-ed,
    so a crash loses at most the unflushed tail. The open shard is rotated (closed under its final name, atomically)
    when the next record would push it past ``max_shard_bytes`` or when it is older than ``max_shard_seconds``; time
    only passes for the writer when it is called, so call :meth:`poll` from time to time when traffic may stop.
    After each rotation the oldest closed shards of this writer are deleted while they exceed ``max_total_bytes`` or
    ``max_shards``.

    On an object store the open shard lives in memory until rotation (one put, never a partial object), so a crash
    loses the open shard: keep ``max_shard_seconds`` short there. Thread-safe.
    """

    def __init__(self, url: str, model: str, version: str, writer_id: str, *, max_shard_bytes: int = 8 << 20,
                 max_shard_seconds: float = 60.0, max_total_bytes: int = 1 << 30, max_shards: int | None = None,
                 flush_every: int = 32, flush_seconds: float = 1.0, fsync: bool = True, clock=time.time):
        if max_shard_bytes <= 0 or max_shard_seconds <= 0 or flush_every < 1:
            raise ValueError("max_shard_bytes, max_shard_seconds and flush_every must be positive")
        if max_total_bytes < max_shard_bytes:
            raise ValueError("max_total_bytes must hold at least one shard (>= max_shard_bytes)")
        self.url, (self.fs, root) = url, fsspec.core.url_to_fs(url)
        self.model, self.version = _check_name("model", model), _check_name("version", version)
        self.writer_id = _check_name("writer_id", writer_id)
        self.directory = f"{root.rstrip('/')}/{model}/{version}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.max_shard_bytes, self.max_shard_seconds = int(max_shard_bytes), float(max_shard_seconds)
        self.max_total_bytes, self.max_shards = int(max_total_bytes), max_shards
        self.flush_every, self.flush_seconds = int(flush_every), float(flush_seconds)
        self.fsync, self.clock = fsync, clock
        self._lock = threading.Lock()
        self.fs.makedirs(self.directory, exist_ok=True)
        own = sorted(s for s in _shards(self.fs, self.directory) if s.writer == writer_id)
        # a previous process with this id crashed: its open shard is final now (the reader counts a torn tail)
        for shard in own:
            if not shard.closed:
                _rename(self.fs, shard.path, shard.path[:-len(OPEN)] + CLOSED)
                shard.closed, shard.path = True, shard.path[:-len(OPEN)] + CLOSED
        self._closed: deque[tuple[str, int]] = deque((s.path, s.size) for s in own)
        self._seq = own[-1].seq + 1 if own else 0
        self._file = None  # local: the open shard's file; remote: None
        self._pending = bytearray()  # remote: the flushed part of the open shard
        self._buffer = bytearray()  # appended, not yet flushed
        self._buffered = 0
        self._shard_bytes = 0
        self._opened_at: float | None = None
        self._flushed_at = self.clock()
        self.closed = False

    def _path(self, suffix: str) -> str:
        return f"{self.directory}/{self.writer_id}-{self._seq:08d}{suffix}"

    def append(self, record: Record) -> None:
        """Add one record to the open shard (opening or rotating one as needed); flushes when a flush is due."""
        frame = record.to_bytes()
        with self._lock:
            if self.closed:
                raise ValueError("append to a closed ShardWriter")
            now = self.clock()
            if self._opened_at is not None and (now - self._opened_at >= self.max_shard_seconds
                                                or self._shard_bytes + len(frame) > self.max_shard_bytes):
                self._rotate()
            if self._opened_at is None:
                self._opened_at = now
                if self.local:
                    self._file = open(self._path(OPEN), "xb")
            self._buffer += frame
            self._buffered += 1
            self._shard_bytes += len(frame)
            if self._buffered >= self.flush_every or now - self._flushed_at >= self.flush_seconds:
                self._flush()

    def poll(self) -> None:
        """Flush and rotate if due by time: call it now and then so an idle worker still closes its shard."""
        with self._lock:
            if self.closed or self._opened_at is None:
                return
            now = self.clock()
            if now - self._opened_at >= self.max_shard_seconds:
                self._rotate()
            elif self._buffered and now - self._flushed_at >= self.flush_seconds:
                self._flush()

    def flush(self) -> None:
        """Make appended records durable in the open shard (local: written and fsync-ed; remote: buffered)."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        self._flushed_at = self.clock()
        if not self._buffer:
            return
        if self._file is not None:
            self._file.write(self._buffer)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        else:
            self._pending += self._buffer
        self._buffer.clear()
        self._buffered = 0

    def _rotate(self) -> None:
        """Close the open shard under its final name in one atomic step, then apply retention."""
        if self._opened_at is None:
            return
        self._flush()
        final = self._path(CLOSED)
        if self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self._path(OPEN), final)
            if self.fsync:  # make the rename itself durable
                fd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        else:
            self.fs.pipe_file(final, bytes(self._pending))
            self._pending = bytearray()
        self._closed.append((final, self._shard_bytes))
        self._seq += 1
        self._opened_at, self._shard_bytes = None, 0
        self._retain()

    def _retain(self) -> None:
        total = sum(size for _, size in self._closed)
        while len(self._closed) > 1 and (total > self.max_total_bytes
                                         or (self.max_shards is not None and len(self._closed) > self.max_shards)):
            path, size = self._closed.popleft()
            total -= size
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:  # pruned by someone else already
                pass

    def rotate(self) -> None:
        """Close the open shard now (if any); the next append opens a new one."""
        with self._lock:
            self._rotate()

    def close(self) -> None:
        """Flush and close the open shard under its final name. Idempotent."""
        with self._lock:
            if not self.closed:
                self._rotate()
                self.closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Position:
    """How far a consumer has read: per ``<version>/<writer_id>``, the shard sequence number and byte offset consumed.

    Shards of a writer before ``seq`` are consumed entirely, shard ``seq`` up to ``offset``. Keys do not depend on
    whether a shard was open or closed, so a persisted position resumes exactly after rotation. ``to_json`` /
    ``from_json`` (or ``to_dict``) persist it.
    """

    writers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        writers = {key: [seq, offset] for key, (seq, offset) in sorted(self.writers.items())}
        return {"format": FORMAT, "writers": writers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "Position":
        return cls({str(key): (int(seq), int(offset)) for key, (seq, offset) in data.get("writers", {}).items()})

    @classmethod
    def from_json(cls, text: str) -> "Position":
        return cls.from_dict(json.loads(text))

    @classmethod
    def of(cls, value: "Position | dict | str | None") -> "Position":
        if value is None:
            return cls()
        if isinstance(value, Position):
            return cls(dict(value.writers))
        if isinstance(value, str):
            return cls.from_json(value)
        return cls.from_dict(value)


@dataclass
class ReaderStats:
    """What a reader skipped, so the monitor can export it instead of crashing or silently losing samples."""

    records: int = 0  # records yielded
    torn_records: int = 0  # frames cut short at the end of a closed shard (a writer crashed mid-write)
    corrupt_records: int = 0  # runs of bytes that failed magic, length, checksum or parsing (skipped, resynced)
    other_version_shards: int = 0  # shards of other model versions, when a version was asked for
    other_version_records: int = 0  # records inside this version's directory that name another version or model
    missing_shards: int = 0  # shards deleted (retention) after the position reached their writer, before being read


class ShardReader:
    """Reads the records of one model (and version, if given) in a stable order, from a :class:`Position`.

    Each writer's shards are read in sequence order; writers are interleaved by shard modification time so a
    window of records is roughly a window of time. Only closed shards are read unless ``include_open``: the
    flushed part of open shards (local sinks) is read too, up to its last complete record, and the position stays
    valid when that shard is later closed. Torn and corrupt records are skipped and counted in :attr:`stats`
    (each once per reader), never raised. After iterating, :attr:`position` holds the position past everything
    consumed, including skipped bytes; each yielded position is the one just after that record.
    """

    def __init__(self, url: str, model: str, version: str | None = None, *, include_open: bool = False,
                 writer_id: str | None = None):
        self.writer_id = writer_id  # only this writer's shards, when given
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.model = _check_name("model", model)
        self.version = None if version is None else _check_name("version", version)
        self.include_open = include_open
        self.stats = ReaderStats()
        self.position = Position()
        self._counted: set[tuple] = set()
        self._other_shards: set[str] = set()

    def _count(self, kind: str, *where) -> None:
        if (kind, *where) not in self._counted:
            self._counted.add((kind, *where))
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)

    def _listing(self) -> dict[str, list[_Shard]]:
        """Per ``<version>/<writer_id>``, its shards in sequence order."""
        writers: dict[str, list[_Shard]] = {}
        for version in _versions(self.fs, self.root, self.model):
            shards = _shards(self.fs, f"{self.root}/{self.model}/{version}")
            if self.version is not None and version != self.version:
                self._other_shards.update(f"{version}/{s.name[:-len(CLOSED if s.closed else OPEN)]}" for s in shards)
                continue
            for shard in shards:
                if (shard.closed or self.include_open) and self.writer_id in (None, shard.writer):
                    writers.setdefault(f"{version}/{shard.writer}", []).append(shard)
        self.stats.other_version_shards = len(self._other_shards)
        for shards in writers.values():
            shards.sort()
        return writers

    def read(self, position: Position | dict | str | None = None,
             limit: int | None = None) -> Iterator[tuple[Position, Record]]:
        """Yield ``(position after the record, record)`` from ``position`` on, at most ``limit`` records."""
        self.position = Position.of(position)
        if limit is not None and limit <= 0:
            return
        heap = []
        for key, shards in self._listing().items():
            seq, _ = self.position.writers.get(key, (0, 0))
            pending = deque(s for s in shards if s.seq >= seq)
            if pending:
                heap.append((pending[0].mtime, key, pending))
        heapq.heapify(heap)
        yielded = 0
        while heap:
            _, key, pending = heapq.heappop(heap)
            shard = pending.popleft()
            if key in self.position.writers:
                seq, offset = self.position.writers[key]
                for missing in range(seq + 1, shard.seq):  # deleted by retention before they were read
                    self._count("missing_shards", key, missing)
            else:
                seq, offset = -1, 0
            start = offset if shard.seq == seq else 0
            for end, record in self._scan(key, shard, start):
                self.position.writers[key] = (shard.seq, end)
                if record is None:
                    continue
                if record.version != key.split("/", 1)[0] or record.model != self.model:
                    self._count("other_version_records", key, shard.seq, end)
                    continue
                self.stats.records += 1
                yielded += 1
                yield Position(dict(self.position.writers)), record
                if limit is not None and yielded >= limit:
                    return
            if pending:
                heapq.heappush(heap, (pending[0].mtime, key, pending))

    def _scan(self, key: str, shard: _Shard, start: int) -> Iterator[tuple[int, Record | None]]:
        """``(end offset, record)`` for each valid record from ``start``; ``(end, None)`` to consume skipped bytes."""
        try:
            data = self.fs.cat_file(shard.path, start=start) if start < shard.size or not shard.closed else b""
        except FileNotFoundError:
            if shard.closed:  # deleted by retention between listing and reading
                self._count("missing_shards", key, shard.seq)
                return
            try:  # rotated between listing and reading: same bytes under the closed name
                shard.path, shard.closed = shard.path[:-len(OPEN)] + CLOSED, True
                data = self.fs.cat_file(shard.path, start=start)
            except FileNotFoundError:
                return
        at, bad_from = 0, None  # bad_from: where a run of unparseable bytes began
        size = len(data)
        while at < size:
            if data[at:at + len(MAGIC)] == MAGIC and at + FRAME.size <= size:
                _, length, crc = FRAME.unpack_from(data, at)
                end = at + FRAME.size + length
                if length <= MAX_PAYLOAD and end <= size and zlib.crc32(data[at + FRAME.size:end]) == crc:
                    try:
                        record = Record._from_payload(bytes(data[at + FRAME.size:end]))
                    except CorruptRecord:
                        record = None
                    if record is not None:
                        if bad_from is not None:
                            self._count("corrupt_records", key, shard.seq, start + bad_from)
                            bad_from = None
                        yield start + end, record
                        at = end
                        continue
            if bad_from is None:
                bad_from = at
            next_magic = data.find(MAGIC, at + 1)
            at = size if next_magic < 0 else next_magic
        if bad_from is None:
            return
        if not shard.closed:
            return  # an open shard may be mid-write: stop before the incomplete bytes, read them later
        tail = data[bad_from:]
        torn = (MAGIC.startswith(tail[:len(MAGIC)]) and (len(tail) < FRAME.size
                or FRAME.size + FRAME.unpack_from(tail)[1] > len(tail)))
        self._count("torn_records" if torn else "corrupt_records", key, shard.seq, start + bad_from)
        yield start + size, None


def writer_alive(writer_id: str) -> bool | None:
    """Whether the process of a writer id made as ``f"{hostname}-{pid}-{start}"`` runs: None when it ran on another
    host (or the id has another form), where only time tells."""
    host, _, rest = writer_id.rpartition("-")[0].rpartition("-")
    pid = rest if host else ""
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    try:  # a killed worker stays a zombie until its parent (TorchServe's frontend) reaps it: dead all the same
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def seal_stale(url: str, model: str, older_than_s: float, *, now: float | None = None) -> list[str]:
    """Close ``.open`` shards whose writer has died (a killed worker): at once where the writer ran on this host and
    its process is gone, else when not written for ``older_than_s`` seconds.

    Run it from the monitor, with a bound well above the writers' ``flush_seconds`` and ``max_shard_seconds``, so
    records of crashed workers get read by closed-only readers and count towards retention. Returns the new paths.
    """
    _check_name("model", model)
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    now = time.time() if now is None else now
    sealed = []
    for version in _versions(fs, root, model):
        for shard in _shards(fs, f"{root}/{model}/{version}"):
            dead = isinstance(fs, LocalFileSystem) and writer_alive(shard.writer) is False
            if not shard.closed and (dead or now - shard.mtime >= older_than_s):
                target = shard.path[:-len(OPEN)] + CLOSED
                try:
                    _rename(fs, shard.path, target)
                except FileNotFoundError:  # its writer closed it meanwhile
                    continue
                sealed.append(target)
    return sealed


class Journal:
    """Write-ahead log of one writer's sampled instances: each :meth:`append` is one ``write`` of a framed
    :class:`Record` (model input included, relevance not yet) to ``<writer_id>-<gen:08d>.journal``.

    Generations of ``max_entries`` records let the sampler drop what its shards hold: :meth:`release` deletes the
    generations before the one given. Local sinks only (an object store cannot append). Thread-safe.
    """

    def __init__(self, url: str, model: str, version: str, writer_id: str, *, max_entries: int = 256):
        fs, root = fsspec.core.url_to_fs(url)
        if not isinstance(fs, LocalFileSystem):
            raise ValueError(f"{url}: a journal needs a local sink (an object store cannot append)")
        self.directory = f"{root.rstrip('/')}/{_check_name('model', model)}/{_check_name('version', version)}"
        self.writer_id, self.max_entries = _check_name("writer_id", writer_id), max_entries
        os.makedirs(self.directory, exist_ok=True)
        self._lock = threading.Lock()
        self._generation, self._entries, self._fd = 0, 0, None

    def _path(self, generation: int) -> str:
        return f"{self.directory}/{self.writer_id}-{generation:08d}{JOURNAL}"

    def append(self, record: Record) -> int:
        """Hand one record to the kernel; returns its generation."""
        frame = record.to_bytes()
        with self._lock:
            if self._fd is not None and self._entries >= self.max_entries:
                os.close(self._fd)
                self._fd, self._generation, self._entries = None, self._generation + 1, 0
            if self._fd is None:
                self._fd = os.open(self._path(self._generation), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self._fd, frame)
            self._entries += 1
            return self._generation

    def release(self, generation: int) -> None:
        """Delete the generations before ``generation``: their records are in shards now."""
        with self._lock:
            for old in range(max(generation - 1, 0), -1, -1):
                try:
                    os.remove(self._path(old))
                except FileNotFoundError:
                    break  # released before, and so are all older ones

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def orphaned_journals(url: str, model: str, version: str) -> dict[str, list[str]]:
    """Journal files (oldest first) of this host's writers whose process is gone, by writer id."""
    fs, root = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        return {}
    directory = f"{root.rstrip('/')}/{_check_name('model', model)}/{_check_name('version', version)}"
    found: dict[str, list[tuple[int, str]]] = {}
    for info in _ls(fs, directory):
        match = _JOURNAL.match(info["name"].rsplit("/", 1)[-1])
        if match and writer_alive(match["writer"]) is False:
            found.setdefault(match["writer"], []).append((int(match["gen"]), info["name"]))
    return {writer: [path for _, path in sorted(paths)] for writer, paths in found.items()}


def claim_journal(path: str, claimant: str) -> str | None:
    """Take a dead writer's journal file for ``claimant`` (an atomic rename, so two live workers never both record it);
    the claimed path, or None when another took it first."""
    claimed = f"{path}.{claimant}"
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None
    return claimed


def read_journal(path: str) -> list[Record]:
    """A journal's records up to the first incomplete one (a write cut short by a crash ends it)."""
    with open(path, "rb") as file:
        data = file.read()
    records, at = [], 0
    while at + FRAME.size <= len(data):
        _, length, _ = FRAME.unpack_from(data, at)
        try:
            records.append(Record.from_bytes(data[at:at + FRAME.size + length]))
        except CorruptRecord:
            break
        at += FRAME.size + length
    return records


def prune(url: str, model: str, *, max_total_bytes: int | None = None, max_age_s: float | None = None,
          now: float | None = None) -> list[str]:
    """Delete the oldest closed shards of a model (all versions, all writers) beyond a total size or an age.

    Writers only bound their own shards; shards of workers that died (and whose ids never come back) are bounded
    only by this, so the monitor should run it now and then. Returns the deleted paths.
    """
    _check_name("model", model)
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    now = time.time() if now is None else now
    shards = sorted((s for v in _versions(fs, root, model) for s in _shards(fs, f"{root}/{model}/{v}") if s.closed),
                    key=lambda s: (s.mtime, s.name))
    total = sum(s.size for s in shards)
    deleted = []
    for shard in shards:
        too_old = max_age_s is not None and now - shard.mtime > max_age_s
        too_big = max_total_bytes is not None and total > max_total_bytes
        if not (too_old or too_big):
            continue
        try:
            fs.rm_file(shard.path)
        except FileNotFoundError:
            pass
        total -= shard.size
        deleted.append(shard.path)
    return deleted
