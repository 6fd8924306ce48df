"""Comparison with states kept elsewhere: a processor's state dump and the read model.

A snapshot is what some other reader of the log says the accounts of one partition are after
the events below an offset; the replay folds the log to that offset and compares. Loading the
snapshots (a dump-state file, the read model's database) is here too, so that what is compared
and how it is read sit side by side.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from consumers.audit.violations import Kind, Violation
from infra.settings import Settings
from schemas.partitioning import partition_for
from streams.core.money import format_amount
from streams.core.state import Account, State

# The read model may be written while it is read; its offsets are read before and after its
# accounts, and the pair retried until they agree, at most this many times.
READ_MODEL_STABLE_READ_ATTEMPTS_MAX = 10
READ_MODEL_RETRY_WAIT_S = 0.2
_ACCOUNT_FIELDS = ("currency", "kind", "status", "balance", "held", "seq")


class AuditSetupError(RuntimeError):
    """An input of the audit is unusable (a malformed state dump, an unreachable database)."""


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """A state to compare with the fold: a processor's state dump or the read model, for one partition."""

    kind: str  # "state_dump" | "read_model"
    source: str  # file name or database URL, for messages
    partition: int
    events_offset: int  # the snapshot is the fold of the events at offsets below this
    accounts: dict[str, dict]  # account id -> {"currency", "kind", "status", "balance", "held", "seq"}


def account_view(account: Account) -> dict:
    """An account as state dumps and the read model show it."""
    return {
        "currency": account.currency,
        "kind": account.kind,
        "status": account.status,
        "balance": format_amount(account.balance_minor, account.currency),
        "held": format_amount(account.held_minor, account.currency),
        "seq": account.seq,
    }


def accounts_view(state: State) -> dict[str, dict]:
    return {account_id: account_view(account) for account_id, account in sorted(state.accounts.items())}


def compare_accounts(snapshot: StateSnapshot, folded: dict[str, dict], events_topic: str) -> list[Violation]:
    """One violation per account where `snapshot` differs from the fold of the log at its offset."""
    kind = Kind.snapshot_mismatch(snapshot.kind)
    where = f"{snapshot.source}, partition {snapshot.partition} at events offset {snapshot.events_offset}"
    violations = []
    for account_id in sorted(set(folded) | set(snapshot.accounts)):
        mine, theirs = folded.get(account_id), snapshot.accounts.get(account_id)
        if mine is not None and theirs is not None:
            mine = {name: mine[name] for name in theirs}  # what the snapshot states, all of it
        if mine == theirs:
            continue
        if theirs is None:
            detail = f"account missing; the log has {mine}"
        elif mine is None:
            detail = f"account {theirs} that the log never opened"
        else:
            detail = "; ".join(
                f"{name} {theirs.get(name)!r}, the log gives {mine[name]!r}"
                for name in mine
                if theirs.get(name) != mine[name]
            )
        violations.append(
            Violation(kind, f"{where}: {detail}", events_topic, snapshot.partition, snapshot.events_offset, account_id)
        )
    return violations


def compare_snapshot(snapshot: StateSnapshot, state: State, log_end_offset: int, events_topic: str) -> list[Violation]:
    """`snapshot` against `state`, the fold of its partition's events below `snapshot.events_offset`."""
    if snapshot.events_offset > log_end_offset:
        return [
            Violation(
                Kind.SNAPSHOT_AHEAD,
                f"{snapshot.source}, partition {snapshot.partition} at events offset "
                f"{snapshot.events_offset}: the log of this partition ends at {log_end_offset}; a state "
                f"must never be ahead of what Kafka committed",
                events_topic,
                snapshot.partition,
                snapshot.events_offset,
            )
        ]
    return compare_accounts(snapshot, accounts_view(state), events_topic)


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
        return [
            StateSnapshot(
                "state_dump",
                name,
                int(partition),
                int(part["events_offset"]),
                {
                    account_id: {field: fields[field] for field in _ACCOUNT_FIELDS}
                    for account_id, fields in part["accounts"].items()
                },
            )
            for partition, part in document["partitions"].items()
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise AuditSetupError(
            f"{name} is not a dump-state document ({type(error).__name__}: {error}); expected "
            '{"partitions": {"<p>": {"events_offset": N, "accounts": {"<id>": {"currency", '
            '"kind", "status", "balance", "held", "seq"}}}}}'
        ) from None


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
        offsets_before, rows = _stable_accounts(store, name)
    finally:
        store.close()
    by_partition: dict[int, dict[str, dict]] = {number: {} for number in range(count)}
    for row in rows:
        held_minor = getattr(row, "held_minor", None)
        view = account_view(
            Account(row.currency, row.kind, row.status, row.balance_minor, row.sequence, held_minor=held_minor or 0)
        )
        if held_minor is None:
            del view["held"]  # a read model whose rows do not state the held total is compared on the rest
        by_partition[partition_for(row.account_id, count)][row.account_id] = view
    return [
        StateSnapshot("read_model", name, number, offsets_before.get((settings.events_topic, number), 0), accounts)
        for number, accounts in by_partition.items()
    ]


def _stable_accounts(store, name: str) -> tuple[dict, list]:
    """(offsets, account rows) read while no batch was written in between."""
    from consumers.readmodel.projection import AccountRow

    try:
        for _ in range(READ_MODEL_STABLE_READ_ATTEMPTS_MAX):
            offsets_before = store.offsets()
            rows = [AccountRow(*row) for row in store.table_rows("accounts")]
            if store.offsets() == offsets_before:
                return offsets_before, rows
            time.sleep(READ_MODEL_RETRY_WAIT_S)
    except Exception as error:  # noqa: BLE001 - e.g. no tables yet: the read model was never built
        raise AuditSetupError(f"cannot read {name}: {type(error).__name__}: {error}") from None
    raise AuditSetupError(
        f"{name} kept changing over {READ_MODEL_STABLE_READ_ATTEMPTS_MAX} reads; stop its consumer or audit again"
    )
