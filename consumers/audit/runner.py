"""`run_audit`: read the topics, run every check, return the report. The one entry point of the
audit for the CLI, the tests and the processor's crash test."""
from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from consumers.audit.checks import DeterminismResult, Kind, LedgerReplay, StateSnapshot, Violation, account_view
from consumers.audit.log_reader import READ_TIMEOUT_S_DEFAULT, TopicLog, partition_count, read_topic, read_topics
from consumers.audit.report import AuditReport, TopicRead
from consumers.audit.workers import check_commands, replay_events, worker_count_default
from schemas.partitioning import partition_for
from streams.core.state import Account
from infra.secrets import leg_keys_text
from infra.settings import Settings
from schemas.leg_auth import LegKeyring

# The read model may be written while it is read; its offsets are read before and after its
# accounts, and the pair retried until they agree, at most this many times.
READ_MODEL_STABLE_READ_ATTEMPTS_MAX = 10
READ_MODEL_RETRY_WAIT_S = 0.2
PROGRESS_DELAY_S = 1.0  # a bar appears only on replays longer than this


class AuditSetupError(RuntimeError):
    """An input of the audit is unusable (a malformed state dump, an unreachable database)."""


def run_audit(settings: Settings, state_dumps: Sequence[Path | str | Mapping] = (), readmodel_db: str | None = None,
              check_determinism: bool = True, *, settled: bool = False, progress: bool = False,
              timeout_s: float = READ_TIMEOUT_S_DEFAULT, workers: int | None = None) -> AuditReport:
    """Replays the settings' topics from their first offset and checks every invariant.

    `state_dumps`: files written by `wallet processor dump-state` (or the same JSON already
    loaded): each partition's fold is compared with the dump at the dump's `events_offset`.
    `readmodel_db`: the read model's database URL; its accounts are compared the same way at
    the offsets it has stored. Take both BEFORE calling this (a state is never ahead of the
    log, so a snapshot taken before the log is read is always within it).
    `settled`: the pipeline has been drained; a transfer still in flight is then a violation.
    `progress`: tqdm bars on stderr for long reads and replays.
    `workers`: processes for the replays (default: one per core; large logs only, see workers.py).
    Raises LogReadError (broker, topics) and AuditSetupError (inputs).
    """
    started_s = time.monotonic()
    workers = workers if workers is not None else worker_count_default()
    report = AuditReport(settled=settled)
    bootstrap = settings.bootstrap
    count = partition_count(bootstrap, settings.events_topic)
    snapshots = [snapshot for source in state_dumps for snapshot in load_state_dump(source)]
    if readmodel_db is not None:
        snapshots += read_model_snapshots(readmodel_db, settings, count)

    def read(topics: list[str]) -> list[TopicLog]:
        with _progress(f"reading {', '.join(topics)}", None, progress) as update:
            logs = read_topics(bootstrap, topics, with_headers={settings.dlq_topic}, timeout_s=timeout_s,
                               on_progress=update)
        for log in logs.values():
            report.topics.append(TopicRead(log.topic, log.partition_count, log.record_count,
                                           {p: part.low_offset for p, part in log.partitions.items()},
                                           log.end_offsets(), log.read_s))
        return list(logs.values())

    # The events first: the outcomes, commands and dead letters read afterwards then hold
    # everything the events imply (an answer, a cause, a dead letter is committed with or
    # before the events of its transaction).
    [events] = read([settings.events_topic])
    if check_determinism:
        outcomes, commands, dead_letters = read([settings.outcomes_topic, settings.commands_topic, settings.dlq_topic])
    else:
        [outcomes], commands, dead_letters = read([settings.outcomes_topic]), None, None
    violations = [*_truncations(events), *_truncations(outcomes), *(_truncations(commands) if commands else [])]

    replay = LedgerReplay(settings.events_topic, settings.outcomes_topic, count)
    violations += [Violation(Kind.PARTITION_COUNT, f"{snapshot.source} has partition {snapshot.partition}; "
                             f"{settings.events_topic} has {count} partitions", settings.events_topic,
                             snapshot.partition)
                   for snapshot in snapshots if snapshot.partition not in events.partitions]

    def read_later_events() -> list[bytes | None]:
        later = read_topic(bootstrap, settings.events_topic, start_offsets=events.end_offsets(), timeout_s=timeout_s)
        return [value for log in later.partitions.values() for value in log.values]

    # The replays allocate millions of small objects that live until the audit ends: the cyclic
    # garbage collector's passes over them find nothing and cost about a tenth of the time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        replay_started_s = time.monotonic()
        with _progress("matching outcomes", outcomes.record_count, progress) as update:
            replay.index_outcomes(outcomes.partitions.values(), update)
        with _progress("replaying events", events.record_count, progress) as update:
            report.workers = replay_events(replay, events.partitions, snapshots, workers, update)
        report.in_flight, report.currencies = replay.finish(settled, read_later_events)
        report.replay_s = time.monotonic() - replay_started_s
        report.events_replayed = replay.events_replayed
        report.outcomes_checked = replay.outcomes_indexed
        report.snapshots_compared = replay.snapshots_compared
        report.explained_by_later_events = replay.explained_by_later_events
        report.accounts = sum(len(state.accounts) for state in replay.states.values())
        violations += replay.violations

        if commands is not None:
            started_determinism_s = time.monotonic()
            # The same leg verification as the processors', so a forged leg is expected in the DLQ.
            keyring = LegKeyring.parse(leg_keys_text(settings))
            report.determinism = _determinism(commands, events, dead_letters, settled, workers, progress, keyring)
            report.determinism_s = time.monotonic() - started_determinism_s
            violations += report.determinism.violations
            if settled:
                violations += [Violation(Kind.PENDING_WHEN_SETTLED, "this command (and every later one of its "
                                         "partition) has no events in the log although the pipeline was declared "
                                         "drained", settings.commands_topic, partition, offset)
                               for partition, offset in report.determinism.pending]
    finally:
        if gc_was_enabled:
            gc.enable()
    report.violations = violations
    report.total_s = time.monotonic() - started_s
    return report


def _determinism(commands: TopicLog, events: TopicLog, dead_letters: TopicLog, settled: bool, workers: int,
                 progress: bool, keyring=None) -> DeterminismResult:
    if commands.partition_count != events.partition_count:
        result = DeterminismResult()
        result.violations.append(Violation(
            Kind.PARTITION_COUNT, f"{commands.topic} has {commands.partition_count} partitions and {events.topic} "
            f"{events.partition_count}: they must be co-partitioned", commands.topic))
        return result
    sources = set()
    for log in dead_letters.partitions.values():
        for headers in log.headers:
            named = dict(headers or ())
            if named.get("source_topic", b"").decode() == commands.topic:
                sources.add((int(named["source_partition"]), int(named["source_offset"])))
    with _progress("re-deciding commands", commands.record_count, progress) as update:
        return check_commands(commands.partitions, events.partitions, commands.partition_count, commands.topic,
                              events.topic, sources, settled, workers, update, keyring)


def _truncations(log: TopicLog) -> list[Violation]:
    return [Violation(Kind.LOG_TRUNCATED, f"the partition starts at offset {part.low_offset}, not 0: records were "
                      f"deleted, so nothing after them can be proved from the log", log.topic, number,
                      part.low_offset)
            for number, part in sorted(log.partitions.items()) if part.low_offset > 0]


def load_state_dump(source: Path | str | Mapping) -> list[StateSnapshot]:
    """The snapshots of a `wallet processor dump-state` JSON (a file, or the parsed document)."""
    if isinstance(source, Mapping):
        document, name = source, "state dump"
    else:
        path = Path(source)
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise AuditSetupError(f"cannot read state dump {path}: {error}") from None
        name = f"state dump {path}"
    try:
        return [StateSnapshot("state_dump", name, int(partition), int(part["events_offset"]),
                              {account_id: {field: fields[field] for field in ("currency", "kind", "status", "balance",
                                                                               "seq")}
                               for account_id, fields in part["accounts"].items()})
                for partition, part in document["partitions"].items()]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise AuditSetupError(f"{name} is not a dump-state document ({type(error).__name__}: {error}); expected "
                              '{"partitions": {"<p>": {"events_offset": N, "accounts": {"<id>": {"currency", '
                              '"kind", "status", "balance", "seq"}}}}}') from None


def read_model_snapshots(db_url: str, settings: Settings, count: int) -> list[StateSnapshot]:
    """The read model's accounts, per partition, at the events offsets it has stored.

    Read through the read model's own store module. Its offsets are read before and after the
    accounts; if a consumer is writing meanwhile they differ and the pair is read again.
    """
    from consumers.readmodel.store import DatabaseUrlError, ReadModelStore, describe_db_url

    try:
        store = ReadModelStore(db_url)
    except (DatabaseUrlError, OSError) as error:
        raise AuditSetupError(f"cannot open the read model at {db_url}: {error}") from None
    except Exception as error:  # noqa: BLE001 - the driver's own errors (psycopg, sqlite3) name the cause
        raise AuditSetupError(f"cannot open the read model: {type(error).__name__}: {error}") from None
    name = f"read model {describe_db_url(db_url)}"
    try:
        for _ in range(READ_MODEL_STABLE_READ_ATTEMPTS_MAX):
            offsets_before = store.offsets()
            rows = store.table_rows("accounts")
            if store.offsets() == offsets_before:
                break
            time.sleep(READ_MODEL_RETRY_WAIT_S)
        else:
            raise AuditSetupError(f"{name} kept changing over {READ_MODEL_STABLE_READ_ATTEMPTS_MAX} reads; "
                                  f"stop its consumer or audit again")
    except AuditSetupError:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. no tables yet: the read model was never built
        raise AuditSetupError(f"cannot read {name}: {type(error).__name__}: {error}") from None
    finally:
        store.close()
    by_partition: dict[int, dict[str, dict]] = {number: {} for number in range(count)}
    for account_id, currency, kind, status, balance_minor, sequence in rows:
        view = account_view(Account(currency, kind, status, balance_minor, sequence))
        by_partition[partition_for(account_id, count)][account_id] = view
    return [StateSnapshot("read_model", name, number, offsets_before.get((settings.events_topic, number), 0), accounts)
            for number, accounts in by_partition.items()]


@contextmanager
def _progress(description: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    bar = tqdm(total=total, desc=description, unit=" rec", unit_scale=True, file=sys.stderr, delay=PROGRESS_DELAY_S,
               leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
