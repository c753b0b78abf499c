"""The request sink: shard files that survive crashes, rotate atomically, and resume exactly from a saved position."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import numpy as np
import pytest

from unhans.handlers.sink import CLOSED, OPEN, FRAME, Position, Record, ShardReader, ShardWriter, prune, seal_stale


def record(i: int, version: str = "1", model: str = "m") -> Record:
    """Record i; all records (i < 10000) frame to the same number of bytes, so shard sizes are predictable."""
    rng = np.random.default_rng(i)
    probabilities = [0.05] * 10
    probabilities[i % 10] = 0.55
    return Record(prediction=i % 10, target=(i + 1) % 10, probabilities=probabilities,
                  relevance=rng.normal(size=(28, 28)).astype(np.float32),
                  thumbnail=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), score=i % 10 + 0.5,
                  timestamp=1.7e9 + i, model=model, version=version, request_id=f"r{i:04d}")


@pytest.fixture(params=["local", "memory"])
def sink(request, tmp_path):
    """A sink URL: a local directory, or a fresh in-memory fsspec filesystem (stands in for an object store)."""
    if request.param == "local":
        yield str(tmp_path / "sink")
    else:
        url = f"memory://sink-{uuid.uuid4().hex}"
        yield url
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def files(url, model="m", version="1"):
    fs, root = fsspec.core.url_to_fs(url)
    directory = f"{root.rstrip('/')}/{model}/{version}"
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False)) if fs.exists(directory) else []


def ids(pairs):
    """The numbers of the records read."""
    return [int(r.request_id[1:]) for _, r in pairs]


def test_round_trip_keeps_every_field():
    original = record(4)
    copy = Record.from_bytes(original.to_bytes())
    assert (copy.prediction, copy.target, copy.score, copy.timestamp, copy.model, copy.version, copy.request_id) == \
           (original.prediction, original.target, original.score, original.timestamp, "m", "1", "r0004")
    assert copy.probabilities == original.probabilities
    assert copy.relevance.dtype == np.float32 and copy.relevance.shape == (28, 28)
    np.testing.assert_allclose(copy.relevance, original.relevance, rtol=1e-3, atol=1e-3)
    # a real model's map (1e-8 a pixel) is far below float16's smallest number: kept through its scale
    tiny = Record(1, 1, [], original.relevance * 1e-8, None, None, 0.0, "m", "1", "")
    np.testing.assert_allclose(Record.from_bytes(tiny.to_bytes()).relevance, tiny.relevance, rtol=2e-3, atol=2e-3 * 1e-8 * np.abs(original.relevance).max())
    assert copy.thumbnail.dtype == np.uint8 and np.array_equal(copy.thumbnail, original.thumbnail)
    assert copy.probabilities == original.probabilities and copy.score == 4.5
    empty = Record(1, 1, [], None, None, None, 0.0, "m", "1", "")  # no arrays, no score
    assert Record.from_bytes(empty.to_bytes()) == empty


def test_write_and_read_back(sink):
    with ShardWriter(sink, "m", "1", "w0") as writer:
        for i in range(20):
            writer.append(record(i))
    assert files(sink) == ["w0-00000000.shard"]
    reader = ShardReader(sink, "m", "1")
    got = list(reader.read())
    assert ids(got) == list(range(20))
    np.testing.assert_array_equal(got[7][1].thumbnail, record(7).thumbnail)
    assert reader.stats.records == 20 and reader.stats.torn_records == reader.stats.corrupt_records == 0


def test_rotation_by_size_and_time_and_retention(sink):
    size = len(record(0).to_bytes())
    now = [0.0]
    writer = ShardWriter(sink, "m", "1", "w0", max_shard_bytes=3 * size, max_total_bytes=9 * size, flush_every=1,
                         max_shard_seconds=10, clock=lambda: now[0])
    for i in range(6):
        writer.append(record(i))
    # three records fill a shard; the fourth opened the second one
    assert [f for f in files(sink) if f.endswith(CLOSED)] == ["w0-00000000.shard"]
    now[0] = 11.0
    writer.append(record(6))  # the open shard is too old: rotated before this record
    assert [f for f in files(sink) if f.endswith(CLOSED)] == ["w0-00000000.shard", "w0-00000001.shard"]
    now[0] = 30.0
    writer.poll()  # an idle writer closes its shard when polled
    assert files(sink) == ["w0-00000000.shard", "w0-00000001.shard", "w0-00000002.shard"]
    for i in range(7, 16):
        writer.append(record(i))
    writer.close()
    # retention: at most 9 records' bytes of closed shards, the oldest deleted first
    names = files(sink)
    assert names[0] != "w0-00000000.shard" and all(n.endswith(CLOSED) for n in names)
    fs, root = fsspec.core.url_to_fs(sink)
    assert sum(fs.size(f"{root}/m/1/{n}") for n in names) <= 9 * size
    got = ids(ShardReader(sink, "m").read())
    assert got == list(range(16 - len(got), 16)) and len(got) >= 6


def test_closed_shards_are_never_partial_while_a_writer_rotates(sink):
    size = len(record(0).to_bytes())
    done = threading.Event()

    def write():
        with ShardWriter(sink, "m", "1", "w0", max_shard_bytes=4 * size, flush_every=1) as writer:
            for i in range(120):
                writer.append(record(i % 8))
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    reads = 0
    while not done.is_set() or reads == 0:
        reader = ShardReader(sink, "m", "1")
        got = list(reader.read())
        assert len(got) % 4 == 0  # closed shards only, each complete
        assert reader.stats.torn_records == reader.stats.corrupt_records == 0
        reads += 1
    thread.join()
    assert len(list(ShardReader(sink, "m").read())) == 120


def test_open_shard_is_invisible_until_closed_unless_asked(tmp_path):
    sink = str(tmp_path / "sink")
    writer = ShardWriter(sink, "m", "1", "w0", flush_every=2)
    for i in range(5):
        writer.append(record(i))
    assert files(sink) == ["w0-00000000.open"]
    assert list(ShardReader(sink, "m").read()) == []
    assert ids(ShardReader(sink, "m", include_open=True).read()) == [0, 1, 2, 3]  # flushed ones
    writer.close()
    assert files(sink) == ["w0-00000000.shard"]


CHILD = """
import sys, time
import numpy as np
from unhans.handlers.sink import Record, ShardWriter
writer = ShardWriter(sys.argv[1], "m", "1", "crashy", max_shard_bytes=20000, flush_every=10**9, flush_seconds=1e9)
relevance = np.ones((28, 28), np.float32)
i = 0
while True:
    writer.append(Record(i % 10, i % 10, [1.0], relevance * i, None, None, time.time(), "m", "1", str(i)))
    i += 1
    if i % 5 == 0:
        writer.flush()
        print(i, flush=True)  # records 0 .. i-1 are durable
"""


def test_sigkill_loses_at_most_the_unflushed_tail(tmp_path):
    sink = str(tmp_path / "sink")
    child = subprocess.Popen([sys.executable, "-c", CHILD, sink], stdout=subprocess.PIPE, text=True)
    try:
        flushed = 0
        while flushed < 400:
            flushed = int(child.stdout.readline())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    names = files(sink)
    assert names[-1].endswith(OPEN) and len(names) > 3  # rotated several times, killed with a shard open
    reader = ShardReader(sink, "m", "1", include_open=True)
    got = [int(r.request_id) for _, r in reader.read()]
    assert got == list(range(len(got))) and len(got) >= flushed  # every flushed record, in order, no gaps
    position = reader.position
    # the monitor seals the dead writer's shard; the position still holds, nothing is read twice
    assert len(seal_stale(sink, "m", older_than_s=0)) == 1
    assert all(n.endswith(CLOSED) for n in files(sink))
    assert list(ShardReader(sink, "m").read(position)) == []
    again = ShardReader(sink, "m")
    assert [int(r.request_id) for _, r in again.read()] == got
    assert again.stats.torn_records <= 1 and again.stats.corrupt_records == 0


def _one_shard(sink, records: int):
    """One worker's first shard of model "m" version "1" with ``records`` records: its filesystem and path."""
    with ShardWriter(sink, "m", "1", "w0") as writer:
        for i in range(records):
            writer.append(record(i))
    fs, root = fsspec.core.url_to_fs(sink)
    return fs, f"{root}/m/1/w0-00000000.shard"


def test_a_torn_tail_is_counted_not_raised(sink):
    fs, path = _one_shard(sink, 3)
    frame = record(3).to_bytes()
    for cut in (2, FRAME.size - 1, len(frame) // 2, len(frame) - 1):  # torn inside the magic, the header, the payload
        fs.pipe_file(path.replace("00000000", f"{cut:08d}"), fs.cat_file(path) + frame[:cut])
    reader = ShardReader(sink, "m", "1")
    got = list(reader.read())
    assert len(got) == 5 * 3 and reader.stats.torn_records == 4 and reader.stats.corrupt_records == 0
    # the torn tails are consumed by the reader's position: resuming counts them no more
    again = ShardReader(sink, "m", "1")
    assert list(again.read(reader.position)) == [] and again.stats.torn_records == 0


def test_corrupt_bytes_are_skipped_and_reading_resyncs(sink):
    fs, path = _one_shard(sink, 10)
    data = bytearray(fs.cat_file(path))
    size = len(record(0).to_bytes())
    data[3 * size + 100] ^= 0xFF  # payload of record 3: checksum fails
    data[6 * size + 1] ^= 0xFF  # magic of record 6: not a frame start
    data[8 * size + 5] ^= 0x7F  # length of record 8: frame runs wrong
    fs.pipe_file(path, bytes(data + b"garbage in the middle" + record(10).to_bytes()))
    reader = ShardReader(sink, "m", "1")
    got = ids(reader.read())
    assert got == [0, 1, 2, 4, 5, 7, 9, 10]
    assert reader.stats.corrupt_records == 4 and reader.stats.torn_records == 0


def test_position_resumes_exactly_while_writers_append_and_rotate(sink, tmp_path):
    size = len(record(0).to_bytes())
    writer = ShardWriter(sink, "m", "1", "w0", max_shard_bytes=4 * size, flush_every=1)
    include_open = not sink.startswith("memory://")  # local sinks can read the open tail too
    for i in range(10):
        writer.append(record(i))
    first = ShardReader(sink, "m", "1", include_open=include_open)
    taken = list(first.read(limit=6))
    assert ids(taken) == list(range(6))
    saved = tmp_path / "position.json"
    saved.write_text(taken[-1][0].to_json())
    for i in range(10, 25):
        writer.append(record(i))
    writer.close()
    second = ShardReader(sink, "m", "1", include_open=include_open)
    rest = ids(second.read(Position.from_json(saved.read_text())))
    assert rest == list(range(6, 25))
    assert json.loads(second.position.to_json()) == second.position.to_dict()


def test_position_taken_in_an_open_shard_survives_its_rename(tmp_path):
    sink = str(tmp_path / "sink")
    writer = ShardWriter(sink, "m", "1", "w0", flush_every=1)
    for i in range(4):
        writer.append(record(i))
    reader = ShardReader(sink, "m", include_open=True)
    assert ids(reader.read()) == [0, 1, 2, 3]
    position = json.loads(reader.position.to_json())
    for i in range(4, 7):
        writer.append(record(i))
    writer.close()  # .open renamed to .shard
    assert ids(ShardReader(sink, "m").read(position)) == [4, 5, 6]


def test_other_versions_are_skipped_and_counted(sink):
    for version, count in (("1", 3), ("2", 4)):
        with ShardWriter(sink, "m", version, "w0", max_shard_bytes=2 * len(record(0).to_bytes())) as writer:
            for i in range(count):
                writer.append(record(i, version=version))
    # a record that claims another version, inside version 1's directory
    with ShardWriter(sink, "m", "1", "stray") as writer:
        writer.append(record(99, version="2"))
    reader = ShardReader(sink, "m", "1")
    assert ids(reader.read()) == [0, 1, 2]
    assert reader.stats.other_version_shards == 2 and reader.stats.other_version_records == 1
    list(reader.read())  # counted once per reader, not once per read
    assert reader.stats.other_version_shards == 2
    every = ShardReader(sink, "m")
    assert sorted(ids(every.read())) == sorted([0, 1, 2, 0, 1, 2, 3])
    assert set(every.position.writers) == {"1/w0", "2/w0", "1/stray"}


def test_many_writers_share_a_sink(sink):
    writers = [ShardWriter(sink, "m", "1", f"host-a-{pid}", max_shard_bytes=3 * len(record(0).to_bytes()))
               for pid in (101, 102, 103)]
    for i in range(30):
        writers[i % 3].append(record(i))
    for writer in writers:
        writer.close()
    reader = ShardReader(sink, "m", "1")
    got = list(reader.read())
    assert sorted(ids(got)) == list(range(30))
    assert set(reader.position.writers) == {"1/host-a-101", "1/host-a-102", "1/host-a-103"}
    for writer_id in ("host-a-101", "host-a-102", "host-a-103"):  # each writer's records in its own order
        own = [i for i in ids(got) if i % 3 == int(writer_id[-1]) - 1]
        assert own == sorted(own)


def test_restarted_writer_continues_its_sequence_and_retention_misses_are_counted(sink):
    size = len(record(0).to_bytes())
    with ShardWriter(sink, "m", "1", "w0", max_shard_bytes=size, flush_every=1) as writer:
        writer.append(record(0))
    reader = ShardReader(sink, "m")
    assert ids(reader.read()) == [0]
    with ShardWriter(sink, "m", "1", "w0", max_shard_bytes=size, max_total_bytes=2 * size, flush_every=1) as writer:
        for i in range(1, 6):
            writer.append(record(i))
    assert files(sink) == ["w0-00000004.shard", "w0-00000005.shard"]
    later = ShardReader(sink, "m")
    assert ids(later.read(reader.position)) == [4, 5] and later.stats.missing_shards == 3


def test_prune_bounds_the_whole_sink(sink):
    size = len(record(0).to_bytes())
    for writer_id in ("dead-1", "dead-2"):
        with ShardWriter(sink, "m", "1", writer_id, max_shard_bytes=size) as writer:
            for i in range(3):
                writer.append(record(i))
    assert len(prune(sink, "m", max_total_bytes=4 * size)) == 2
    assert len(files(sink)) == 4
    assert len(prune(sink, "m", max_age_s=0.0, now=time.time() + 1)) == 4


def test_bad_names_are_refused(sink):
    with pytest.raises(ValueError):
        ShardWriter(sink, "m", "../1", "w0")
    with pytest.raises(ValueError):
        ShardWriter(sink, "m", "1", "w/0")


SAMPLING_WORKER = """
import socket, sys, time, numpy as np
from unhans.handlers.relevance import Sampler
from unhans.handlers.sink import Journal, ShardWriter
sink, writer_id = sys.argv[1], f"{socket.gethostname()}-{__import__('os').getpid()}-1"
class NeverDone:  # the relevance of a killed worker's sampler is never finished
    def with_latent(self, images, targets):
        time.sleep(3600)
sampler = Sampler(ShardWriter(sink, "m", "1", writer_id), NeverDone(), 1.0, "m", "1", batch=2, cpu_budget=1.0,
                  journal=Journal(sink, "m", "1", writer_id, max_entries=3))
inputs = np.random.default_rng(0).random((7, 1, 4, 4), dtype=np.float32)
sampler.offer(inputs, np.arange(7) % 3, np.full((7, 3), 1 / 3), None, [f"req-{k}" for k in range(7)])
print("answered", flush=True)  # the handler answers now
time.sleep(3600)
"""


def test_instances_a_killed_sampler_had_accepted_are_recorded_by_the_next(tmp_path):
    """SIGKILL right after the answer: the journal (one write per instance, in the kernel's hands) lets the next
    writer on the host record every instance, each once, and the dead writer's open shard is sealed at once."""
    from unhans.handlers.relevance import Sampler
    from unhans.handlers.sink import Journal, orphaned_journals, read_journal, writer_alive

    sink = str(tmp_path / "sink")
    worker = subprocess.Popen([sys.executable, "-c", SAMPLING_WORKER, sink], stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "answered"
    dead_id = f"{__import__('socket').gethostname()}-{worker.pid}-1"
    assert writer_alive(dead_id) is True
    worker.send_signal(signal.SIGKILL)
    time.sleep(1)  # killed, not yet reaped by its parent (us, as TorchServe's frontend for a worker): a zombie, dead
    assert writer_alive(dead_id) is False
    worker.wait()
    journals = orphaned_journals(sink, "m", "1")[dead_id]
    assert writer_alive(dead_id) is False and len(journals) == 3  # generations of 3 entries
    first = read_journal(journals[0])[0]  # as if the dead writer had recorded it in its open shard: it must not come twice
    first.relevance, first.input = np.ones((4, 4), np.float32), None
    ShardWriter(sink, "m", "1", dead_id, flush_every=1).append(first)
    assert [p.name for p in (tmp_path / "sink" / "m" / "1").glob("*" + OPEN)] == [f"{dead_id}-00000000{OPEN}"]
    live = ShardWriter(sink, "m", "1", f"{__import__('socket').gethostname()}-{os.getpid()}-0", flush_every=1)
    live.append(record(1))  # a live writer's open shard, as fresh: stays open
    sealed = seal_stale(sink, "m", older_than_s=300)  # the monitor's call: the dead writer's shard is final at once
    assert [os.path.basename(p) for p in sealed] == [f"{dead_id}-00000000{CLOSED}"]

    class Explain:  # the explainer's interface the sampler uses: relevance and the monitor layer's per channel
        def with_latent(self, images, targets):
            return None, np.ones((len(images), 1, 4, 4), np.float32), None, np.ones((len(images), 5), np.float32)

    writer_id = f"{__import__('socket').gethostname()}-{os.getpid()}-2"
    sampler = Sampler(ShardWriter(sink, "m", "1", writer_id), Explain(), 1.0, "m", "1", cpu_budget=1.0,
                      journal=Journal(sink, "m", "1", writer_id))
    deadline, records = time.monotonic() + 30, []
    while len(records) < 8 and time.monotonic() < deadline:  # the dead writer's first, the live one's, 6 recovered
        time.sleep(0.1)
        records = [r for _, r in ShardReader(sink, "m", include_open=True).read()]
    assert not orphaned_journals(sink, "m", "1") and not list((tmp_path / "sink" / "m" / "1").glob("*.journal*"))
    assert sorted(r.request_id for r in records if r.request_id.startswith("req")) == [f"req-{k}" for k in range(7)]
    assert all(r.relevance is not None and r.input is None for r in records) and len(records) == 8
    assert sorted(r.latent.shape for r in records if r.latent is not None) == [(5,)] * 6  # the recovered ones, with their latent
    assert sampler.take_counts()["recovered"] == 6
