"""The snapshot's writer thread: the processor's loop copies the values of the keys each batch
changed right after its commit (`PartitionSnapshot.take`, bounded per batch), and each flush hands
what gathered since the last one here as one unit; this thread encodes and writes it, and drops
what the clock forgot, while the loop goes on consuming and committing.

At most one unit is in flight and there is no queue: while one is being written the loop keeps
its changes for the next interval (`busy`). Every partition of a unit is written in one RocksDB
write batch with its checkpoint (`StateStore.write`), so a crash at any moment leaves each
partition's snapshot at one committed events offset. A write that fails is a bug or a broken
disk: the failure is kept and raised to the loop at its next look (`busy`, `wait`), which crashes
the processor; after it nothing more is written, since the loop's checkpoints already counted the
lost unit (the next start restores from the last good snapshot and the log).

rocksdict (0.3.29) holds the GIL while it writes a batch (measured: a loop on another thread
stood still for the whole write), so the thread hides the encoding, which the interpreter
interleaves with the loop every switch interval, not the write itself: each partition is written
as a batch of its own, so the loop waits at most one partition's write at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from streams.runtime.store import SnapshotWrite, StateStore


@dataclass
class SnapshotUnit:
    """One flush: the partitions' captured changes, and the partitions whose memory horizon
    moved, with the clock to drop expired segments and forgotten holds at."""

    writes: list[SnapshotWrite] = field(default_factory=list)
    horizons_moved: list[tuple[int, int]] = field(default_factory=list)  # (partition, clock_ms)

    def __bool__(self) -> bool:
        return bool(self.writes or self.horizons_moved)


class SnapshotWriteFailed(RuntimeError):
    """A snapshot write failed earlier: nothing more may be written by this process."""


class SnapshotWriter:
    """The single writer: each unit is written by a daemon thread started for it, and no unit is
    started while the last one's thread is alive (a thread that hangs on a stalled disk then
    never holds up the process's exit)."""

    def __init__(self, store: StateStore, wait_timeout_s: float, on_written: Callable[[float], None]) -> None:
        self._store = store
        self._wait_timeout_s = wait_timeout_s
        self._on_written = on_written  # the unit's duration on the thread, in seconds
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # set by the thread, read once it ended
        self._failure: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def busy(self) -> bool:
        """True while a unit is being written; raises if the last one failed."""
        if self._thread is not None and self._thread.is_alive():
            return True
        self._settle()
        return False

    def submit(self, unit: SnapshotUnit) -> None:
        """Starts writing `unit`; the caller has seen `busy()` false (one unit in flight at most)."""
        assert not self.busy(), "a snapshot unit is still being written: one in flight at most"
        if unit:
            self._thread = threading.Thread(target=self._write, args=(unit,), name="snapshot-writer", daemon=True)
            self._thread.start()

    def wait(self, why: str) -> None:
        """Returns once no unit is in flight; raises if it failed or outlasts the timeout."""
        if self._thread is not None:
            self._thread.join(self._wait_timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(
                    f"the snapshot write in flight did not finish within {self._wait_timeout_s:g} s "
                    f"({why}): the disk under the state store is stalled"
                )
        self._settle()

    def close(self) -> None:
        """Waits for the unit in flight, if any (a failure was raised already)."""
        if self._failure is None:
            self.wait("closing the state store")

    def _settle(self) -> None:
        """Takes the ended unit's result; a failure is kept and raised now and at every later call."""
        if self._thread is not None:
            self._thread = None
            if self._error is not None:
                self._failure, self._error = self._error, None
        if self._failure is not None:
            raise SnapshotWriteFailed(f"writing the state snapshot failed: {self._failure!r}") from self._failure

    def _write(self, unit: SnapshotUnit) -> None:
        try:
            started_s = time.monotonic()
            for write in unit.writes:
                self._store.write(write)
            for partition, clock_ms in unit.horizons_moved:
                self._store.drop_expired_segments(partition, clock_ms)
                self._store.drop_forgotten_holds(partition, clock_ms)
            self._on_written(time.monotonic() - started_s)
        except BaseException as error:  # raised on the loop by its next look (bugs crash)
            self._error = error
