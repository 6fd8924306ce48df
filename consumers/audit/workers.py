"""The per-partition halves of the audit in forked worker processes, one per core.

Folding the events and re-deciding the commands are pure CPU work on partitions that do not
depend on each other, and Python runs one thread at a time, so the partitions are split
between processes. The workers are forked after the log has been read: they inherit the
records (and the index of outcomes) instead of receiving them through a pipe, and only what
they found travels back. Below `PARALLEL_RECORDS_MIN` records the audit stays in one process,
where forking would cost more than it saves.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import TypeVar

from consumers.audit.determinism import DeterminismResult, check_determinism
from consumers.audit.ledger import LedgerReplay
from consumers.audit.snapshots import StateSnapshot
from infra.log_reader import PartitionLog
from schemas.leg_auth import LegKeyring

PARALLEL_RECORDS_MIN = 100_000
PROGRESS_POLL_S = 0.2  # how often the parent reads the workers' shared progress counter

Result = TypeVar("Result")
# (task, progress counter) for the forked workers to find: set in the parent only while a pool runs.
_inherited: tuple | None = None


def worker_count_default() -> int:
    return os.cpu_count() or 1


def replay_events(
    replay: LedgerReplay,
    logs: dict[int, PartitionLog],
    snapshots: Iterable[StateSnapshot],
    workers: int,
    on_progress: Callable[[int], None] | None,
) -> int:
    """`replay.replay(logs, snapshots)`, with the partitions split between up to `workers`
    processes; returns how many were used. Call after `replay.index_outcomes`: the workers
    match against the index they inherit."""
    snapshots = list(snapshots)
    groups = _groups(logs, workers)
    if len(groups) <= 1:
        replay.replay(logs, snapshots, on_progress)
        return 1

    def task(index: int, progress: Callable[[int], None]):
        replay.replay(groups[index], snapshots, progress)
        # In the parent (index 0) the replay already holds its share; a worker sends its own.
        return replay.summary() if index else None

    for part in _run_forked(task, len(groups), on_progress)[1:]:
        replay.absorb(part)
    return len(groups)


def check_commands(
    commands: dict[int, PartitionLog],
    events: dict[int, PartitionLog],
    partition_count: int,
    commands_topic: str,
    events_topic: str,
    dead_lettered: set[tuple[int, int]],
    settled: bool,
    workers: int,
    on_progress: Callable[[int], None] | None,
    keyring: LegKeyring,
) -> DeterminismResult:
    """`check_determinism` for every partition, split between `workers` processes."""
    groups = _groups(commands, workers)

    def task(index: int, progress: Callable[[int], None] | None) -> DeterminismResult:
        result = DeterminismResult()
        for number in sorted(groups[index]):
            check_determinism(
                commands[number],
                events[number],
                partition_count,
                commands_topic,
                events_topic,
                dead_lettered,
                result,
                keyring=keyring,
                settled=settled,
                on_progress=progress,
            )
        return result

    if len(groups) <= 1:
        return task(0, on_progress)
    result = DeterminismResult()
    for part in _run_forked(task, len(groups), on_progress):
        result.absorb(part)
    return result


def _groups(logs: dict[int, PartitionLog], workers: int) -> list[dict[int, PartitionLog]]:
    """The partitions dealt round-robin between the workers (one group if the log is small)."""
    if workers <= 1 or sum(len(log) for log in logs.values()) < PARALLEL_RECORDS_MIN:
        return [logs]
    numbers = sorted(logs)
    return [{number: logs[number] for number in numbers[index::workers]} for index in range(min(workers, len(numbers)))]


def _run_forked(
    task: Callable[[int, Callable[[int], None]], Result], count: int, on_progress: Callable[[int], None] | None
) -> list[Result]:
    """task(0) in this process, task(1) ... task(count - 1) in forked workers; their results in order.

    The parent takes a share of the work itself: one process fewer to fork, and one result
    fewer to send back and take apart.
    """
    global _inherited
    context = multiprocessing.get_context("fork")
    counter = context.Value("q", 0)  # records done by the workers, for the progress bar
    reported = 0

    def report_workers() -> None:
        nonlocal reported
        if on_progress is not None and counter.value > reported:
            on_progress(counter.value - reported)
            reported = counter.value

    def progress_here(records: int) -> None:
        if on_progress is not None:
            on_progress(records)
        report_workers()

    _inherited = (task, counter)
    try:
        with ProcessPoolExecutor(count - 1, mp_context=context) as pool:
            futures = [pool.submit(_run_inherited, index) for index in range(1, count)]
            results = [task(0, progress_here)]
            while True:
                done, pending = wait(futures, timeout=PROGRESS_POLL_S, return_when=FIRST_EXCEPTION)
                report_workers()
                if not pending or any(future.exception() is not None for future in done):
                    break
            return results + [future.result() for future in futures]
    finally:
        _inherited = None


def _run_inherited(index: int):
    assert _inherited is not None  # set by the parent before it forks the pool
    task, counter = _inherited

    def progress(records: int) -> None:
        with counter.get_lock():
            counter.value += records

    return task(index, progress)
