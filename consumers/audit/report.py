"""What an audit found, as a readable text and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from consumers.audit.conservation import CurrencyTotals, ShardedMerchant
from consumers.audit.determinism import DeterminismResult
from consumers.audit.holds import LoggedHold
from consumers.audit.ledger import MoneyMovement
from consumers.audit.transfers import InFlight
from consumers.audit.violations import Violation

# The text report shows this many violations of each kind; the JSON report has them all.
TEXT_VIOLATIONS_PER_KIND_MAX = 20
TEXT_IN_FLIGHT_MAX = 50


@dataclass(frozen=True, slots=True)
class TopicRead:
    topic: str
    partitions: int
    records: int
    low_offsets: dict[int, int]
    end_offsets: dict[int, int]
    read_s: float

    def to_json(self) -> dict:
        return {
            "topic": self.topic,
            "partitions": self.partitions,
            "records": self.records,
            "low_offsets": {str(p): o for p, o in sorted(self.low_offsets.items())},
            "end_offsets": {str(p): o for p, o in sorted(self.end_offsets.items())},
            "read_s": round(self.read_s, 3),
        }


@dataclass(slots=True)
class AuditReport:
    settled: bool
    topics: list[TopicRead] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    in_flight: list[InFlight] = field(default_factory=list)
    holds_open: list[LoggedHold] = field(default_factory=list)  # their money is in the balances, not in flight
    holds_expired: list[LoggedHold] = field(default_factory=list)
    holds_ended: int = 0  # captured, voided or expired
    currencies: list[CurrencyTotals] = field(default_factory=list)
    accounts: int = 0
    sharded_merchants: list[ShardedMerchant] = field(default_factory=list)  # their shards are among the accounts
    events_replayed: int = 0
    replay_s: float = 0.0
    outcomes_checked: int = 0
    snapshots_compared: int = 0
    determinism: DeterminismResult | None = None
    determinism_s: float = 0.0
    explained_by_later_events: int = 0  # findings a record written during the audit explained
    workers: int = 1  # processes the replay of the events was split between
    movements: list[MoneyMovement] | None = None  # every money event with its actor, when asked for
    total_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def replay_events_per_s(self) -> float:
        return self.events_replayed / self.replay_s if self.replay_s > 0 else 0.0

    @property
    def determinism_commands_per_s(self) -> float:
        if self.determinism is None or self.determinism_s <= 0:
            return 0.0
        return self.determinism.commands_replayed / self.determinism_s

    def kinds(self) -> set[str]:
        return {violation.kind for violation in self.violations}

    def of_kind(self, kind: str) -> list[Violation]:
        return [violation for violation in self.violations if violation.kind == kind]

    def to_json(self) -> dict:
        determinism = None
        if self.determinism is not None:
            determinism = {
                "commands_replayed": self.determinism.commands_replayed,
                "events_reproduced": self.determinism.events_reproduced,
                "commands_dead_lettered": self.determinism.commands_dead_lettered,
                "commands_pending": self.determinism.commands_pending,
                "seconds": round(self.determinism_s, 3),
                "commands_per_s": round(self.determinism_commands_per_s),
            }
        return {
            "passed": self.passed,
            "settled": self.settled,
            "violation_count": len(self.violations),
            "violations": [violation.to_json() for violation in _ordered(self.violations)],
            "conservation": [row.to_json() for row in self.currencies],
            "in_flight": [entry.to_json() for entry in self.in_flight],
            "holds": {
                "open": [hold.to_json() for hold in self.holds_open],
                "expired": [hold.to_json() for hold in self.holds_expired],
                "ended": self.holds_ended,
            },
            "accounts": self.accounts,
            "sharded_merchants": [merchant.to_json() for merchant in self.sharded_merchants],
            "events_replayed": self.events_replayed,
            "replay_s": round(self.replay_s, 3),
            "replay_events_per_s": round(self.replay_events_per_s),
            "outcomes_checked": self.outcomes_checked,
            "snapshots_compared": self.snapshots_compared,
            "determinism": determinism,
            "explained_by_later_events": self.explained_by_later_events,
            "topics": [topic.to_json() for topic in self.topics],
            "workers": self.workers,
            "total_s": round(self.total_s, 3),
            **(
                {"movements": [movement.to_json() for movement in self.movements]} if self.movements is not None else {}
            ),
        }

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def render_text(self) -> str:
        lines = ["Streamwallet audit"]
        for topic in self.topics:
            lines.append(
                f"  read {topic.topic}: {topic.records:,} records from {topic.partitions} partitions "
                f"in {topic.read_s:.2f} s"
            )
        processes = f" in {self.workers} processes" if self.workers > 1 else ""
        lines.append(
            f"  replayed {self.events_replayed:,} events of {self.accounts:,} accounts and matched "
            f"{self.outcomes_checked:,} outcomes in {self.replay_s:.2f} s{processes} "
            f"({self.replay_events_per_s:,.0f} events/s)"
        )
        if self.determinism is not None:
            d = self.determinism
            lines.append(
                f"  determinism: {d.commands_replayed:,} commands re-decided in {self.determinism_s:.2f} s "
                f"({self.determinism_commands_per_s:,.0f} commands/s), {d.events_reproduced:,} events "
                f"byte-identical; {d.commands_dead_lettered:,} dead-lettered, "
                f"{d.commands_pending:,} not processed yet"
            )
        else:
            lines.append("  determinism: not checked (--no-determinism)")
        lines.append(f"  state snapshots compared: {self.snapshots_compared}")
        if self.explained_by_later_events:
            lines.append(f"  {self.explained_by_later_events} finding(s) explained by events written during the audit")
        lines.append("")
        lines.append("Conservation per currency (balances + in flight = deposited - withdrawn):")
        for row in self.currencies:
            j = row.to_json()
            lines.append(
                f"  {row.currency}  accounts {row.accounts:,}  deposited {j['deposited']}  withdrawn "
                f"{j['withdrawn']}  balances {j['balances']}  in flight {j['in_flight']}  "
                + ("holds" if row.created_minor == 0 else f"DOES NOT HOLD ({j['created']} created)")
            )
        if not self.currencies:
            lines.append("  (no money events)")
        for merchant in self.sharded_merchants[:TEXT_IN_FLIGHT_MAX]:
            lines.append(
                f"  sharded merchant {merchant.merchant}: {merchant.to_json()['balance']} {merchant.currency} "
                f"in {merchant.shards} shards (accounts above)"
            )
        lines.append("")
        lines.append(
            f"In flight: {len(self.in_flight)} transfer(s)"
            + (" (a violation: the pipeline was declared drained)" if self.settled and self.in_flight else "")
        )
        for entry in self.in_flight[:TEXT_IN_FLIGHT_MAX]:
            state = f"refund pending ({entry.refused_reason})" if entry.refused_reason else "credit pending"
            lines.append(
                f"  {entry.transaction_id}  {entry.amount} {entry.currency}  {entry.from_account} -> "
                f"{entry.to_account}  debited at partition {entry.debited_at[0]} offset "
                f"{entry.debited_at[1]}  {state}"
            )
        if len(self.in_flight) > TEXT_IN_FLIGHT_MAX:
            lines.append(f"  ... and {len(self.in_flight) - TEXT_IN_FLIGHT_MAX} more (see --json)")
        lines.append("")
        lines.append(
            f"Holds: {len(self.holds_open)} open (their money counts in the balances), "
            f"{self.holds_ended} ended, {len(self.holds_expired)} of them expired"
        )
        for title, holds in (("open", self.holds_open), ("expired", self.holds_expired)):
            for hold in holds[:TEXT_IN_FLIGHT_MAX]:
                j = hold.to_json()
                lines.append(
                    f"  {title:7}  {hold.hold_id}  {j['held']} of {j['amount']} {hold.currency} held  "
                    f"{hold.account_id} -> {hold.to_account}  captured {j['captured']}  expires_ms {hold.expires_ms}"
                )
            if len(holds) > TEXT_IN_FLIGHT_MAX:
                lines.append(f"  ... and {len(holds) - TEXT_IN_FLIGHT_MAX} more {title} (see --json)")
        lines.append("")
        if self.violations:
            lines.append(f"Violations: {len(self.violations)}")
            by_kind: dict[str, list[Violation]] = {}
            for violation in _ordered(self.violations):
                by_kind.setdefault(violation.kind, []).append(violation)
            for kind, violations in by_kind.items():
                lines.append(f"  {kind} ({len(violations)}):")
                for violation in violations[:TEXT_VIOLATIONS_PER_KIND_MAX]:
                    lines.append(f"    {_where(violation)}: {violation.message}")
                if len(violations) > TEXT_VIOLATIONS_PER_KIND_MAX:
                    lines.append(f"    ... and {len(violations) - TEXT_VIOLATIONS_PER_KIND_MAX} more (see --json)")
        lines.append(
            f"RESULT: {'PASS' if self.passed else 'FAIL'}"
            + (f" ({len(self.violations)} violation(s))" if self.violations else "")
        )
        return "\n".join(lines)


def _ordered(violations: list[Violation]) -> list[Violation]:
    """Kinds in the order first found; within a kind, the first offending offset first."""
    kind_rank: dict[str, int] = {}
    for violation in violations:
        kind_rank.setdefault(violation.kind, len(kind_rank))
    return sorted(
        violations,
        key=lambda v: (
            kind_rank[v.kind],
            v.topic or "",
            -1 if v.partition is None else v.partition,
            -1 if v.offset is None else v.offset,
        ),
    )


def _where(violation: Violation) -> str:
    parts = []
    if violation.topic is not None:
        parts.append(violation.topic)
    if violation.partition is not None:
        parts.append(f"partition {violation.partition}")
    if violation.offset is not None:
        parts.append(f"offset {violation.offset}")
    if violation.account_id is not None:
        parts.append(f"account {violation.account_id}")
    if violation.transaction_id is not None:
        parts.append(f"transaction {violation.transaction_id}")
    return " ".join(parts) if parts else "log"
