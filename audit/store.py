"""The audit's relevance store: one HDF5 file per batch, so an interrupted audit resumes where it stopped.

A batch file is written under a temporary name and renamed into place only when complete, so a crash (even
SIGKILL in the middle of a write) loses at most the batch in flight and never leaves a torn file behind; a single
HDF5 file being written when the process dies can be unreadable as a whole. The store remembers what it was
computed for (model, data, composite, layer): resuming with other inputs is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from unhans.core.errors import InputError


class RelevanceStore:
    """A folder of ``batch-NNNNN.h5`` files, each holding one float32 array per name (e.g. ``input``, ``logits``)."""

    def __init__(self, path: str | Path, n: int, batch_size: int, fingerprint: dict[str, str]):
        self.path = Path(path)
        self.n = n
        self.batch_size = batch_size
        wanted = {**fingerprint, "n": n, "batch_size": batch_size}
        meta = self.path / "meta.json"
        if meta.exists():
            stored = json.loads(meta.read_text())
            differs = sorted(k for k in wanted if stored.get(k) != wanted[k])
            if differs:
                raise InputError(str(self.path), f"was written for another audit (differs in {differs})", "pass a new --out folder or --restart")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(wanted, indent=1))

    @classmethod
    def discard(cls, path: str | Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @property
    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    def _file(self, batch: int) -> Path:
        return self.path / f"batch-{batch:05d}.h5"

    def pending(self) -> list[int]:
        """Batches still to compute."""
        return [b for b in range(self.num_batches) if not self._file(b).exists()]

    def rows(self, batch: int) -> slice:
        return slice(batch * self.batch_size, min((batch + 1) * self.batch_size, self.n))

    def write(self, batch: int, arrays: dict[str, np.ndarray]) -> None:
        partial = self._file(batch).with_suffix(".partial")
        with h5py.File(partial, "w") as f:
            for name, values in arrays.items():
                f.create_dataset(name, data=np.asarray(values, np.float32), compression="lzf")
        os.replace(partial, self._file(batch))

    def read(self) -> dict[str, np.ndarray]:
        """Every batch, concatenated in row order."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"{self.path} still has {len(missing)} batches to compute")
        parts: dict[str, list[np.ndarray]] = {}
        for batch in range(self.num_batches):
            with h5py.File(self._file(batch), "r") as f:
                for name in f:
                    parts.setdefault(name, []).append(f[name][:])
        return {name: np.concatenate(values) for name, values in parts.items()}


def open_store(path: str | Path) -> "StoredRelevance":
    """A finished store, for reading only (e.g. by ``unhans audit --select`` after the audit)."""
    return StoredRelevance(path)


class StoredRelevance:
    """Read access to a complete :class:`RelevanceStore` without knowing its fingerprint: rows batch by batch, so a
    large audit is never loaded whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / "meta.json"
        if not meta.is_file():
            raise InputError(str(self.path), "holds no stored relevance (meta.json)", "run 'unhans audit' into its folder first")
        stored = json.loads(meta.read_text())
        self.n, self.batch_size = int(stored["n"]), int(stored["batch_size"])
        self.fingerprint = {k: v for k, v in stored.items() if k not in ("n", "batch_size")}
        self.num_batches = -(-self.n // self.batch_size)
        missing = [b for b in range(self.num_batches) if not self._file(b).exists()]
        if missing:
            raise InputError(str(self.path), f"still has {len(missing)} of {self.num_batches} batches to compute", "let 'unhans audit' finish first")

    def _file(self, batch: int) -> Path:
        return self.path / f"batch-{batch:05d}.h5"

    def rows(self, name: str, rows) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(row numbers, array[name] of those rows)`` for the wanted rows, one batch file at a time, in row order."""
        rows = np.unique(np.asarray(rows, np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= self.n):
            raise IndexError(f"rows outside 0..{self.n - 1}")
        for batch in np.unique(rows // self.batch_size):
            wanted = rows[rows // self.batch_size == batch]
            with h5py.File(self._file(int(batch)), "r") as f:
                if name not in f:
                    raise KeyError(f"{self._file(int(batch))} has no array {name!r} (it has {sorted(f)})")
                yield wanted, f[name][(wanted - batch * self.batch_size).tolist()]
