"""Per-class accumulation: a class too thin in one window is tested once its recent samples are enough.

A 1,000-class model's traffic brings a few samples of a class per window, and the per-class SpRAy test needs
``min_samples`` of them. The samples of a class the reference can test (its capacity reaches ``min_samples``) that a
window could not analyse wait here, and join the next windows' samples of their class until the class is analysed;
then they are dropped. They wait at most ``max_windows`` windows (a strategy of long ago is not today's traffic), and
at most ``max_records`` of them in all, the oldest dropped first.

Why these choices: the carried samples are whole :class:`~unhans.handlers.sink.Record` s in the sink's own framing,
so the evidence page of a class analysed on carried samples shows them like any other. The file is named by the
window after which it holds (``carry-<window>.bin``) and ``state.json`` names the current one: a monitor killed
between writing it and committing the window resumes with the carry of the last committed window, and nothing is
counted twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from unhans.handlers.sink import Record, read_journal

CARRY_WINDOWS = 10  # default: windows a thin class's samples wait for more of their class
MAX_CARRIED = 1000  # default: samples waiting, all classes together (about 110 KB each at 224 px: the whole map is kept for evidence)
PREFIX, SUFFIX = "carry-", ".bin"


@dataclass
class Carry:
    """Samples waiting for more of their class: ``records`` and the window each came from."""

    records: list[Record] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)
    file: str | None = None  # the state folder's file that holds exactly these records, once written

    @classmethod
    def load(cls, state_dir: Path, state: dict) -> "Carry":
        """The carry that ``state.json`` (read as ``state``) names; none before the first window."""
        entry = state.get("carry")
        if not entry:
            return cls()
        records = read_journal(str(state_dir / entry["file"]))
        return cls(records, list(entry["windows"])[:len(records)], entry["file"])

    def update(self, window_index: int, records: list[Record], analysed: set[int], testable, max_windows: int,
               max_records: int) -> "Carry":
        """What waits after window ``window_index``: this carry and the window's ``records`` (in that order, as the
        window was analysed), less the classes ``analysed`` now, the classes the reference cannot test
        (``testable(class) -> bool``), samples older than ``max_windows`` windows, and the oldest beyond ``max_records``."""
        kept = [(r, w) for r, w in zip(self.records + records, self.windows + [window_index] * len(records))
                if r.prediction not in analysed and window_index - w < max_windows and testable(r.prediction)]
        kept = kept[max(len(kept) - max_records, 0):]
        if len(kept) == len(self.records) and all(r is old for (r, _), old in zip(kept, self.records)):
            return self  # nothing came or went: its file stays as written
        return Carry([r for r, _ in kept], [w for _, w in kept])

    def save(self, state_dir: Path, window_index: int) -> dict | None:
        """Write this carry for the state after ``window_index``; the entry ``state.json`` keeps (None: nothing waits)."""
        if not self.records:
            return None
        if self.file is not None:
            return {"file": self.file, "windows": self.windows}
        name = f"{PREFIX}{window_index:08d}{SUFFIX}"
        partial = state_dir / (name + ".partial")
        with open(partial, "wb") as file:
            for record in self.records:
                file.write(record.to_bytes())
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, state_dir / name)
        self.file = name
        return {"file": name, "windows": self.windows}


def remove_stale(state_dir: Path, current: dict | None) -> None:
    """Delete carry files other than the one ``state.json`` now names (called after it is replaced)."""
    keep = current["file"] if current else None
    for path in state_dir.glob(f"{PREFIX}*{SUFFIX}*"):
        if path.name != keep:
            path.unlink(missing_ok=True)
