"""The processor's Prometheus metrics, every one defined here.

The hot path stays cheap: a batch counts its decisions in plain ints (`BatchTally`), and the
Prometheus counters are added to once per batch, after its transaction committed. So the counters
count committed work only: a batch that aborts is counted once, when it is redone. The gauges of
state (lag, money in flight) are computed between batches, on the processor's own thread, every
`STATE_GAUGES_INTERVAL_S`, and read by the metrics server's thread as one immutable snapshot.

- `wallet_processor_commands_decided_total` (counter; command, status, reason): commands the core decided,
  by type and by the outcome they answered (`continues`: no answer yet, the saga goes on with a leg)
- `wallet_processor_events_produced_total` (counter): events written to `wallet.events`
- `wallet_processor_legs_produced_total` (counter): saga legs written to `wallet.commands`
- `wallet_processor_outcomes_produced_total` (counter): answers written to `wallet.outcomes` (dead-letter
  answers included)
- `wallet_processor_dead_letters_total` (counter): records written to `wallet.dlq`
- `wallet_processor_batch_commands` (histogram): commands per committed batch
- `wallet_processor_transaction_commit_duration_seconds` (histogram): send_offsets + commit of a batch's
  transaction; its `_count` is the commit rate
- `wallet_processor_transactions_aborted_total` (counter): batches whose transaction failed: state rebuilt
  from the log
- `wallet_processor_restore_duration_seconds` (histogram): one restore (snapshot + tail of `wallet.events`)
  of newly owned partitions
- `wallet_processor_restore_events_folded_total` (counter): events folded by restores
- `wallet_processor_restore_last_events_folded` (gauge): events the last restore folded (a takeover from
  the standby folds only the tail since its copy)
- `wallet_processor_restore_standby_partitions_total` (counter): partitions a restore took from the standby
  instead of the snapshot
- `wallet_processor_standby_partitions` (gauge): partitions of `wallet.events` the standby follows
- `wallet_processor_standby_lag_offsets` (gauge): the offsets of `wallet.events` the standby is behind, summed
  over the partitions it follows (from the cached high watermarks)
- `wallet_processor_standby_events_folded_total` (counter): events the standby folded
- `wallet_processor_restore_remaining_offsets` (gauge): offsets of `wallet.events` the running restore still
  has to read (0 when none runs)
- `wallet_processor_snapshot_flush_duration_seconds` (histogram): one flush of the RocksDB snapshot on its
  writer thread (encoding and writing the changed keys, dropping what the clock forgot)
- `wallet_processor_snapshot_capture_duration_seconds` (histogram): what one flush costs the processor's
  loop: handing the values staged since the last one to the writer thread
- `wallet_processor_partitions_owned` (gauge): partitions of `wallet.commands` this instance owns
- `wallet_processor_consumer_lag_records` (gauge; partition): records of `wallet.commands` not yet consumed,
  per owned partition
- `wallet_processor_debits_open` (gauge; currency): transfers the owned partitions debited and still hold
  open: the core's `in_flight`, what a refund could still come back for (neither refunded nor forgotten)
- `wallet_processor_debits_open_minor` (gauge; currency): their amount, in the currency's minor units
  (integers: exact up to 2^53)

A sender's partition never hears of its transfer's credit on the receiver's, so an open debit stays open
after a successful credit until the idempotency window forgets it (24 h of command time): the open debits
are an upper bound of the money in flight, not the money in flight itself, which only a reader of every
partition knows (`wallet_readmodel_money_in_flight_minor`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from infra.metrics import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from streams.core.machine import Decision
    from streams.core.state import State

STATE_GAUGES_INTERVAL_S = 2.0
BATCH_COMMANDS_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)
RESTORE_BUCKETS_S = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SAGA_CONTINUES = "continues"  # the status label of a decision without an answer that sent a leg on
NO_OUTCOME = "none"


class BatchTally:
    """What one batch decided, counted in plain ints on the hot path; added to the metrics once it commits."""

    __slots__ = ("decided", "legs", "outcomes", "dead_letters")

    def __init__(self) -> None:
        self.decided: dict[tuple[type, str, str], int] = {}
        self.legs = 0
        self.outcomes = 0
        self.dead_letters = 0

    def decision(self, command_class: type, decision: Decision) -> None:
        outcome = decision.outcome
        key: tuple[type, str, str]
        if outcome is not None:
            key = (command_class, outcome.status, outcome.reason or "")
            self.outcomes += 1
        else:
            key = (command_class, SAGA_CONTINUES if decision.follow_ups else NO_OUTCOME, "")
        self.decided[key] = self.decided.get(key, 0) + 1
        if decision.follow_ups:
            self.legs += len(decision.follow_ups)

    def dead_letter(self) -> None:
        self.dead_letters += 1


def open_debits_by_currency(states: Iterable[State]) -> dict[str, tuple[int, int]]:
    """currency -> (open debits, their amount in minor units), over the accounts of `states`."""
    totals: dict[str, tuple[int, int]] = {}
    for state in states:
        for account in state.accounts.values():
            if account.in_flight_count:
                count, amount_minor = totals.get(account.currency, (0, 0))
                totals[account.currency] = (count + account.in_flight_count, amount_minor + account.in_flight_minor)
    return totals


class _StateGauges(Collector):
    """The gauges of the processor's state, from the last snapshot `set` handed over (a reference swap,
    so a scrape on another thread never sees half an update and never touches the live state)."""

    def __init__(self) -> None:
        self._lag: Mapping[int, int] = {}
        self._open_debits: Mapping[str, tuple[int, int]] = {}
        self._owned = 0

    def set(self, owned: int, lag: Mapping[int, int], open_debits: Mapping[str, tuple[int, int]]) -> None:
        self._owned, self._lag, self._open_debits = owned, dict(lag), dict(open_debits)

    def collect(self):
        owned, lag, open_debits = self._owned, self._lag, self._open_debits
        yield GaugeMetricFamily(
            "wallet_processor_partitions_owned", "partitions of wallet.commands this instance owns", value=owned
        )
        lag_family = GaugeMetricFamily(
            "wallet_processor_consumer_lag_records",
            "records of wallet.commands not yet consumed, per owned partition",
            labels=["partition"],
        )
        for partition, records in sorted(lag.items()):
            lag_family.add_metric([str(partition)], records)
        yield lag_family
        transfers = GaugeMetricFamily(
            "wallet_processor_debits_open",
            "transfers debited by the owned partitions and neither refunded nor forgotten yet, by currency",
            labels=["currency"],
        )
        money = GaugeMetricFamily(
            "wallet_processor_debits_open_minor",
            "the amount of those debits, in the currency's minor units",
            labels=["currency"],
        )
        for currency, (count, amount_minor) in sorted(open_debits.items()):
            transfers.add_metric([currency], count)
            money.add_metric([currency], amount_minor)
        yield transfers
        yield money


class ProcessorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.commands_decided = Counter(
            "wallet_processor_commands_decided_total",
            "commands decided, by type and by the status and reason of the outcome they answered",
            ["command", "status", "reason"],
            registry=registry,
        )
        self.events_produced = Counter(
            "wallet_processor_events_produced_total", "events written to wallet.events", registry=registry
        )
        self.legs_produced = Counter(
            "wallet_processor_legs_produced_total", "saga legs written to wallet.commands", registry=registry
        )
        self.outcomes_produced = Counter(
            "wallet_processor_outcomes_produced_total", "answers written to wallet.outcomes", registry=registry
        )
        self.dead_letters = Counter(
            "wallet_processor_dead_letters_total", "records written to wallet.dlq", registry=registry
        )
        self.batch_commands = Histogram(
            "wallet_processor_batch_commands",
            "commands per committed batch",
            buckets=BATCH_COMMANDS_BUCKETS,
            registry=registry,
        )
        self.commit_duration = Histogram(
            "wallet_processor_transaction_commit_duration_seconds",
            "sending the offsets and committing one batch's transaction",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.transactions_aborted = Counter(
            "wallet_processor_transactions_aborted_total",
            "batches whose transaction did not commit: the state was rebuilt from the log",
            registry=registry,
        )
        self.restore_duration = Histogram(
            "wallet_processor_restore_duration_seconds",
            "one restore of newly owned partitions: snapshot, then the tail of wallet.events",
            buckets=RESTORE_BUCKETS_S,
            registry=registry,
        )
        self.restore_events_folded = Counter(
            "wallet_processor_restore_events_folded_total", "events folded by restores", registry=registry
        )
        self.restore_remaining = Gauge(
            "wallet_processor_restore_remaining_offsets",
            "offsets of wallet.events the running restore has still to read",
            registry=registry,
        )
        self.restore_last_events_folded = Gauge(
            "wallet_processor_restore_last_events_folded", "events the last restore folded", registry=registry
        )
        self.restore_standby_partitions = Counter(
            "wallet_processor_restore_standby_partitions_total",
            "partitions a restore took from the standby instead of the snapshot",
            registry=registry,
        )
        self.standby_partitions = Gauge(
            "wallet_processor_standby_partitions", "partitions of wallet.events the standby follows", registry=registry
        )
        self.standby_lag = Gauge(
            "wallet_processor_standby_lag_offsets",
            "offsets of wallet.events the standby is behind, summed over the partitions it follows",
            registry=registry,
        )
        self.standby_events_folded = Counter(
            "wallet_processor_standby_events_folded_total", "events the standby folded", registry=registry
        )
        self.snapshot_flush_duration = Histogram(
            "wallet_processor_snapshot_flush_duration_seconds",
            "one flush of the RocksDB snapshot, on its writer thread",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.snapshot_capture_duration = Histogram(
            "wallet_processor_snapshot_capture_duration_seconds",
            "what one flush costs the loop: handing the values staged since the last one to the writer thread",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._state = _StateGauges()
        registry.register(self._state)
        self._command_names: dict[type, str] = {}

    def committed(self, tally: BatchTally, commands: int, events: int, commit_s: float) -> None:
        """One batch's transaction committed: its figures become the metrics' (once per batch)."""
        for (command_class, status, reason), count in tally.decided.items():
            self.commands_decided.labels(self._command_name(command_class), status, reason).inc(count)
        self.events_produced.inc(events)
        self.legs_produced.inc(tally.legs)
        self.outcomes_produced.inc(tally.outcomes)
        if tally.dead_letters:
            self.dead_letters.inc(tally.dead_letters)
        self.batch_commands.observe(commands)
        self.commit_duration.observe(commit_s)

    def restore_progress(self, events_folded: int, remaining_offsets: int) -> None:
        self.restore_events_folded.inc(events_folded)
        self.restore_remaining.set(remaining_offsets)

    def restored(self, duration_s: float, events_folded: int, from_standby: int) -> None:
        self.restore_duration.observe(duration_s)
        self.restore_last_events_folded.set(events_folded)
        self.restore_standby_partitions.inc(from_standby)

    def standby_lagging(self, partitions: int, offsets_behind: int) -> None:
        """Called from the standby's thread: prometheus_client's metrics take their own locks."""
        self.standby_partitions.set(partitions)
        self.standby_lag.set(offsets_behind)

    def set_state(self, states: Collection[State], lag: Mapping[int, int]) -> None:
        """The state gauges, from the committed state of the owned partitions between batches (the
        processor's thread); `lag` leaves out a partition whose offsets could not be read."""
        self._state.set(len(states), lag, open_debits_by_currency(states))

    def _command_name(self, command_class: type) -> str:
        name = self._command_names.get(command_class)
        if name is None:
            name = self._command_names[command_class] = str(command_class.__struct_config__.tag)  # type: ignore[attr-defined]
        return name
