"""`run_audit`: read the topics, run every check, return the report. The one entry point of the
audit for the CLI, the tests and the processor's crash test."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from consumers.audit.conservation import sharded_merchants
from consumers.audit.determinism import DeterminismResult
from consumers.audit.holds import EXPIRED, OPEN
from consumers.audit.ledger import LedgerReplay
from consumers.audit.report import AuditReport, TopicRead
from consumers.audit.snapshots import AuditSetupError, StateSnapshot, load_state_dump, read_model_snapshots
from consumers.audit.violations import Kind, Violation
from consumers.audit.workers import check_commands, replay_events, worker_count_default
from infra.log_reader import READ_TIMEOUT_S_DEFAULT, TopicLog, partition_count, read_topic, read_topics
from infra.secrets import leg_keys_text
from infra.settings import Settings
from schemas.leg_auth import LegKeyError, LegKeyring

PROGRESS_DELAY_S = 1.0  # a bar appears only on replays longer than this


def run_audit(
    settings: Settings,
    state_dumps: Sequence[Path | str | Mapping] = (),
    readmodel_db: str | None = None,
    check_determinism: bool = True,
    *,
    settled: bool = False,
    progress: bool = False,
    timeout_s: float = READ_TIMEOUT_S_DEFAULT,
    workers: int | None = None,
    movements: bool = False,
) -> AuditReport:
    """Replays the settings' topics from their first offset and checks every invariant.

    `state_dumps`: files written by `wallet processor dump-state` (or the same JSON already
    loaded): each partition's fold is compared with the dump at the dump's `events_offset`.
    `readmodel_db`: the read model's database URL; its accounts are compared the same way at
    the offsets it has stored. Take both BEFORE calling this (a state is never ahead of the
    log, so a snapshot taken before the log is read is always within it).
    `settled`: the pipeline has been drained; a transfer still in flight is then a violation.
    `progress`: tqdm bars on stderr for long reads and replays.
    `workers`: processes for the replays (default: one per core; large logs only, see workers.py).
    `movements`: list every money event with its actor in the report (who moved money).
    Raises LogReadError (broker, topics) and snapshots.AuditSetupError (inputs).
    """
    started_s = time.monotonic()
    workers = workers if workers is not None else worker_count_default()
    report = AuditReport(settled=settled)
    count = partition_count(settings.bootstrap, settings.events_topic)
    snapshots = [snapshot for source in state_dumps for snapshot in load_state_dump(source)]
    if readmodel_db is not None:
        snapshots += read_model_snapshots(readmodel_db, settings, count)
    logs = _read_logs(settings, report, check_determinism, progress, timeout_s)
    violations = [
        *_truncations(logs.events),
        *_truncations(logs.outcomes),
        *(_truncations(logs.commands) if logs.commands else []),
    ]
    violations += [
        Violation(
            Kind.PARTITION_COUNT,
            f"{snapshot.source} has partition {snapshot.partition}; {settings.events_topic} has {count} partitions",
            settings.events_topic,
            snapshot.partition,
        )
        for snapshot in snapshots
        if snapshot.partition not in logs.events.partitions
    ]

    # The replays allocate millions of small objects that live until the audit ends: the cyclic
    # garbage collector's passes over them find nothing and cost about a tenth of the time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        violations += _replay_ledger(settings, logs, snapshots, report, count, workers, progress, timeout_s, movements)
        if logs.commands is not None:
            violations += _check_determinism(settings, logs, report, workers, progress)
    finally:
        if gc_was_enabled:
            gc.enable()
    report.violations = violations
    report.total_s = time.monotonic() - started_s
    return report


class _Logs:
    """The topics as read, in the order that makes the checks exact on a live log."""

    __slots__ = ("events", "outcomes", "commands", "dead_letters")

    def __init__(
        self, events: TopicLog, outcomes: TopicLog, commands: TopicLog | None, dead_letters: TopicLog | None
    ) -> None:
        self.events, self.outcomes, self.commands, self.dead_letters = events, outcomes, commands, dead_letters


def _read_logs(settings: Settings, report: AuditReport, with_commands: bool, progress: bool, timeout_s: float) -> _Logs:
    def read(topics: list[str]) -> list[TopicLog]:
        with _progress(f"reading {', '.join(topics)}", None, progress) as update:
            logs = read_topics(
                settings.bootstrap,
                topics,
                with_headers={settings.dlq_topic},
                with_timestamps={settings.commands_topic},
                timeout_s=timeout_s,
                on_progress=update,
            )
        for log in logs.values():
            report.topics.append(
                TopicRead(
                    log.topic,
                    log.partition_count,
                    log.record_count,
                    {p: part.low_offset for p, part in log.partitions.items()},
                    log.end_offsets(),
                    log.read_s,
                )
            )
        return list(logs.values())

    # The events first: the outcomes, commands and dead letters read afterwards then hold
    # everything the events imply (an answer, a cause, a dead letter is committed with or
    # before the events of its transaction).
    [events] = read([settings.events_topic])
    if not with_commands:
        [outcomes] = read([settings.outcomes_topic])
        return _Logs(events, outcomes, None, None)
    outcomes, commands, dead_letters = read([settings.outcomes_topic, settings.commands_topic, settings.dlq_topic])
    return _Logs(events, outcomes, commands, dead_letters)


def _replay_ledger(
    settings: Settings,
    logs: _Logs,
    snapshots: list[StateSnapshot],
    report: AuditReport,
    count: int,
    workers: int,
    progress: bool,
    timeout_s: float,
    movements: bool,
) -> list[Violation]:
    """Folds wallet.events against wallet.outcomes and the snapshots; fills the report's ledger part."""
    replay = LedgerReplay(settings.events_topic, settings.outcomes_topic, count, record_movements=movements)
    events, outcomes = logs.events, logs.outcomes

    def read_later_events() -> list[bytes | None]:
        later = read_topic(
            settings.bootstrap, settings.events_topic, start_offsets=events.end_offsets(), timeout_s=timeout_s
        )
        return [value for log in later.partitions.values() for value in log.values]

    started_s = time.monotonic()
    with _progress("matching outcomes", outcomes.record_count, progress) as update:
        replay.index_outcomes(outcomes.partitions.values(), update)
    with _progress("replaying events", events.record_count, progress) as update:
        report.workers = replay_events(replay, events.partitions, snapshots, workers, update)
    report.in_flight, report.currencies = replay.finish(report.settled, read_later_events)
    report.holds_open = replay.holds.of_state(OPEN)
    report.holds_expired = replay.holds.of_state(EXPIRED)
    report.holds_ended = len(replay.holds.holds) - len(report.holds_open)
    report.replay_s = time.monotonic() - started_s
    report.events_replayed = replay.events_replayed
    report.outcomes_checked = replay.outcomes_indexed
    report.snapshots_compared = replay.snapshots_compared
    report.explained_by_later_events = replay.explained_by_later_events
    report.accounts = sum(len(state.accounts) for state in replay.states.values())
    report.sharded_merchants = sharded_merchants(replay.states.values())
    if replay.movements is not None:
        report.movements = sorted(replay.movements)
    return replay.violations


def _check_determinism(
    settings: Settings, logs: _Logs, report: AuditReport, workers: int, progress: bool
) -> list[Violation]:
    """Re-decides wallet.commands; fills the report's determinism part."""
    started_s = time.monotonic()
    # Only called when the logs were read with_commands, which reads both.
    assert logs.commands is not None and logs.dead_letters is not None
    report.determinism = _determinism(
        logs.commands, logs.events, logs.dead_letters, report.settled, workers, progress, _leg_keyring(settings)
    )
    report.determinism_s = time.monotonic() - started_s
    violations = list(report.determinism.violations)
    if report.settled:
        violations += [
            Violation(
                Kind.PENDING_WHEN_SETTLED,
                "this command (and every later one of its partition) "
                "has no events in the log although the pipeline was declared drained",
                settings.commands_topic,
                partition,
                offset,
            )
            for partition, offset in report.determinism.pending
        ]
    return violations


def _leg_keyring(settings: Settings) -> LegKeyring:
    """The processors' leg keys: the audit verifies every leg exactly as they do, so a forged leg
    is expected in the DLQ, never decided."""
    try:
        return LegKeyring.parse(leg_keys_text(settings))
    except (LegKeyError, OSError) as error:
        raise AuditSetupError(f"cannot read the processors' leg keys: {error}") from None


def _determinism(
    commands: TopicLog,
    events: TopicLog,
    dead_letters: TopicLog,
    settled: bool,
    workers: int,
    progress: bool,
    keyring: LegKeyring,
) -> DeterminismResult:
    if commands.partition_count != events.partition_count:
        result = DeterminismResult()
        result.violations.append(
            Violation(
                Kind.PARTITION_COUNT,
                f"{commands.topic} has {commands.partition_count} partitions and {events.topic} "
                f"{events.partition_count}: they must be co-partitioned",
                commands.topic,
            )
        )
        return result
    with _progress("re-deciding commands", commands.record_count, progress) as update:
        return check_commands(
            commands.partitions,
            events.partitions,
            commands.partition_count,
            commands.topic,
            events.topic,
            _dead_letter_sources(dead_letters, commands.topic),
            settled,
            workers,
            update,
            keyring,
        )


def _dead_letter_sources(dead_letters: TopicLog, source_topic: str) -> set[tuple[int, int]]:
    """(partition, offset) of every record of `source_topic` that the DLQ holds."""
    sources = set()
    for log in dead_letters.partitions.values():
        assert log.headers is not None  # the DLQ is read with its headers: they name each source
        for headers in log.headers:
            named = dict(headers or ())
            if named.get("source_topic", b"").decode() == source_topic:
                sources.add((int(named["source_partition"]), int(named["source_offset"])))
    return sources


def _truncations(log: TopicLog) -> list[Violation]:
    return [
        Violation(
            Kind.LOG_TRUNCATED,
            f"the partition starts at offset {part.low_offset}, not 0: records were "
            f"deleted, so nothing after them can be proved from the log",
            log.topic,
            number,
            part.low_offset,
        )
        for number, part in sorted(log.partitions.items())
        if part.low_offset > 0
    ]


@contextmanager
def _progress(description: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    bar = tqdm(
        total=total,
        desc=description,
        unit=" rec",
        unit_scale=True,
        file=sys.stderr,
        delay=PROGRESS_DELAY_S,
        leave=False,
    )
    try:
        yield bar.update
    finally:
        bar.close()
