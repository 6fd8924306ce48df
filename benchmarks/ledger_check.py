"""The bench's check of a stage's ledger: an events topic read whole, once its stage is quiet.

The same check for every stage that writes the project's events (ours, the Kafka Streams peer,
the saga ceiling), beside the outcome checks of `pipeline_bench`:
- sequences gap-free: every account's changes carry seq 1, 2, 3, ... in log order;
- balances chain: each money event's balance is the previous one plus or minus its amount (a hold's
  place, void and expiry move none; its capture is a debit);
- money conserved: the accounts' final balances add up to what came in minus what went out
  (with every transfer answered, nothing is in flight: every debit was credited or refunded);
- the wire format and placement: the first FORMAT_SAMPLE events decode with the project's own
  decoder (`schemas.codec.decode_event`), so a peer cannot pass with messages of its own shape,
  and sit on their account's partition by the project's partitioner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from infra.kafka_clients import kafka_security
from schemas.codec import SchemaError, decode_event
from schemas.partitioning import partition_for

FORMAT_SAMPLE = 2_000
READ_BATCH_MAX = 10_000
READ_TIMEOUT_S = 120.0
PROBLEMS_SHOWN_MAX = 5
# The sign of each money event's amount in its account's balance.
SIGN = {
    "deposited": 1,
    "withdrawn": -1,
    "transfer_debited": -1,
    "transfer_credited": 1,
    "transfer_refunded": 1,
    "hold_captured": -1,  # a capture leaves the balance as a debit does (placing or releasing a hold does not)
}
INFLOW, OUTFLOW = "deposited", "withdrawn"


class _Entry(msgspec.Struct, gc=False):
    """The fields of any event that the check reads; the others are skipped by the decoder."""

    type: str
    account_id: str
    seq: int | None = None
    amount: str | None = None
    balance: str | None = None


_decode_entry = msgspec.json.Decoder(_Entry).decode


def _minor(text: str) -> int:
    whole, _, fraction = text.partition(".")
    return int(whole) * 100 + int(fraction.ljust(2, "0") or 0)


@dataclass
class LedgerReport:
    events: int = 0
    accounts: int = 0
    money_in_minor: int = 0
    balances_minor: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "events": self.events,
            "accounts": self.accounts,
            "money_in_minor": self.money_in_minor,
            "balances_minor": self.balances_minor,
            "problems": self.problems,
        }


def check_ledger(bootstrap: str, topic: str, partitions: int, group_id: str) -> LedgerReport:
    """Reads `topic` (read_committed) to its end and checks it; problems are in the report."""
    consumer = Consumer(
        {
            **kafka_security("admin"),
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in range(partitions)])
    report = LedgerReport()
    seq_of: dict[str, int] = {}
    balance_of: dict[str, int] = {}
    # Counted in full, shown by their first few.
    gaps: list[str] = []
    gap_count = 0
    chain_breaks: list[str] = []
    chain_break_count = 0
    at_end: set[int] = set()
    deadline_s = time.monotonic() + READ_TIMEOUT_S
    try:
        while len(at_end) < partitions:
            if time.monotonic() > deadline_s:
                report.problems.append(
                    f"{topic}: not read to its end within {READ_TIMEOUT_S:.0f} s ({report.events:,} events read)"
                )
                return report
            for record in consumer.consume(READ_BATCH_MAX, 0.5):
                error = record.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(record.partition() or 0)
                        continue
                    raise KafkaException(error)
                value = record.value() or b""
                if report.events < FORMAT_SAMPLE:
                    try:
                        decode_event(value)
                    except SchemaError as schema_error:
                        if len(report.problems) < PROBLEMS_SHOWN_MAX:
                            report.problems.append(
                                f"{topic}: not the project's event format: {schema_error}: {value[:200]!r}"
                            )
                report.events += 1
                entry = _decode_entry(value)
                if report.events <= FORMAT_SAMPLE and len(report.problems) < PROBLEMS_SHOWN_MAX:
                    owner_partition = partition_for(entry.account_id, partitions)
                    if record.partition() != owner_partition:
                        report.problems.append(
                            f"{topic}: an event of {entry.account_id} on partition "
                            f"{record.partition()}, not {owner_partition}"
                        )
                if entry.seq is None:  # a decision event (command_rejected): no change
                    continue
                account_id = entry.account_id
                previous_seq = seq_of.get(account_id, 0)
                if entry.seq != previous_seq + 1:
                    gap_count += 1
                    if len(gaps) < PROBLEMS_SHOWN_MAX:
                        gaps.append(f"{account_id}: seq {entry.seq} after {previous_seq}")
                seq_of[account_id] = entry.seq
                balance_minor = _minor(entry.balance) if entry.balance is not None else balance_of.get(account_id, 0)
                sign = SIGN.get(entry.type)
                if sign is not None:
                    amount_minor = _minor(entry.amount) if entry.amount is not None else 0
                    expected = balance_of.get(account_id, 0) + sign * amount_minor
                    if balance_minor != expected or entry.amount is None:
                        chain_break_count += 1
                        if len(chain_breaks) < PROBLEMS_SHOWN_MAX:
                            chain_breaks.append(
                                f"{account_id} seq {entry.seq}: balance {entry.balance}, amount "
                                f"{entry.amount}, expected {expected / 100:.2f}"
                            )
                    if entry.type == INFLOW:
                        report.money_in_minor += amount_minor
                    elif entry.type == OUTFLOW:
                        report.money_in_minor -= amount_minor
                balance_of[account_id] = balance_minor
    finally:
        consumer.close()
    report.accounts = len(seq_of)
    report.balances_minor = sum(balance_of.values())
    if gap_count:
        report.problems.append(f"{topic}: {gap_count} sequence gaps, e.g. {gaps}")
    if chain_break_count:
        report.problems.append(
            f"{topic}: {chain_break_count} balances that are not the previous one plus the change, e.g. {chain_breaks}"
        )
    if report.balances_minor != report.money_in_minor:
        report.problems.append(
            f"{topic}: money not conserved: balances add up to {report.balances_minor / 100:.2f}, "
            f"{report.money_in_minor / 100:.2f} came in"
        )
    if report.events == 0:
        report.problems.append(f"{topic}: no events")
    return report
