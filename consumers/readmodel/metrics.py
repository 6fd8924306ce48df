"""The read model's Prometheus metrics, every one defined here.

Counted once per applied batch (one database transaction), after it committed. The lag is
computed when Prometheus asks, on the metrics server's thread: one ListOffsets request for the
last stable offsets of both topics against the offsets the consumer has applied, so the write
path never waits for it; when Kafka does not answer within `LAG_TIMEOUT_S` the lag is left out
of that scrape (an absent series, not a made-up 0).

- `wallet_readmodel_records_applied_total` (counter; kind (`events`, `outcomes`)): records written to the
  database
- `wallet_readmodel_batches_applied_total` (counter): database transactions committed
- `wallet_readmodel_batch_apply_duration_seconds` (histogram): one batch's database transaction
- `wallet_readmodel_lag_records` (gauge; kind, partition): committed records of the topic not yet in the
  database
- `wallet_readmodel_transfers_in_flight` (gauge; currency): transfers debited and neither credited nor refunded,
  over every partition the read model has applied
- `wallet_readmodel_money_in_flight_minor` (gauge; currency): their amount, in the currency's minor units

Money in flight is the read model's figure because only a reader of every partition knows it: a sender's
partition never hears of the credit on the receiver's (its processor exports its open debits instead,
`wallet_processor_debits_open`). It starts from one scan of the stored entries and follows every applied
batch. Partitions are read unevenly, so a credit can be applied a moment before its debit: the figure
may dip below the truth for that moment, and equals the audit's in-flight list whenever the read model
is caught up. A shard (`--shard I/N`, N > 1) reports its partitions' share: the debits of its accounts
minus their credits and refunds, which may be negative; the sum over the N shards is the money in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from consumers.readmodel.consumer import ReadModelError, read_lag
from consumers.readmodel.store import Batch, TopicPartitionKey
from infra.metrics import LATENCY_BUCKETS_S
from infra.settings import Settings
from schemas.events import TransferCredited, TransferDebited, TransferRefunded
from streams.core.money import canonical_minor

log = logging.getLogger("wallet.readmodel")

LAG_TIMEOUT_S = 2.0
EVENTS, OUTCOMES = "events", "outcomes"
# What each transfer event does to the money in flight.
_IN_FLIGHT_SIGN = {TransferDebited: 1, TransferCredited: -1, TransferRefunded: -1}


class _Lag(Collector):
    def __init__(
        self, admin: AdminClient, settings: Settings, applied: Callable[[], dict[TopicPartitionKey, int | None]]
    ) -> None:
        self._admin = admin
        self._settings = settings
        self._applied = applied

    def collect(self):
        family = GaugeMetricFamily(
            "wallet_readmodel_lag_records",
            "committed records not yet in the read model's database, per partition",
            labels=["kind", "partition"],
        )
        applied = self._applied()  # the partitions this process owns (a shard owns some)
        stored = {key: offset for key, offset in applied.items() if offset is not None}
        try:
            lags = read_lag(self._admin, self._settings, stored, LAG_TIMEOUT_S)
        except (KafkaException, ReadModelError) as error:
            log.warning("the read model's lag is left out of this scrape: %s", error)
            lags = []
        for item in (item for item in lags if (item.topic, item.partition) in applied):
            kind = EVENTS if item.topic == self._settings.events_topic else OUTCOMES
            family.add_metric([kind, str(item.partition)], item.lag)
        yield family


class ReadModelMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._registry = registry if registry is not None else CollectorRegistry()
        self.records_applied = Counter(
            "wallet_readmodel_records_applied_total",
            "records written to the database, by kind",
            ["kind"],
            registry=self._registry,
        )
        self.batches_applied = Counter(
            "wallet_readmodel_batches_applied_total", "database transactions committed", registry=self._registry
        )
        self.apply_duration = Histogram(
            "wallet_readmodel_batch_apply_duration_seconds",
            "one batch's database transaction",
            buckets=LATENCY_BUCKETS_S,
            registry=self._registry,
        )
        self.transfers_in_flight = Gauge(
            "wallet_readmodel_transfers_in_flight",
            "transfers debited and neither credited nor refunded, by currency, as far as the read model has read",
            ["currency"],
            registry=self._registry,
        )
        self.money_in_flight = Gauge(
            "wallet_readmodel_money_in_flight_minor",
            "the amount of those transfers, in the currency's minor units",
            ["currency"],
            registry=self._registry,
        )
        self._events_applied = self.records_applied.labels(EVENTS)
        self._outcomes_applied = self.records_applied.labels(OUTCOMES)
        self._in_flight: dict[str, list[int]] = {}  # currency -> [transfers, minor units]

    def start_in_flight(self, totals: dict[str, tuple[int, int]]) -> None:
        """What the stored entries hold in flight (`ReadModelStore.transfers_in_flight`), before the first batch."""
        self._in_flight = {currency: [count, amount_minor] for currency, (count, amount_minor) in totals.items()}
        for currency in self._in_flight:
            self._publish_in_flight(currency)

    def applied(self, batch: Batch, apply_s: float) -> None:
        """A batch committed to the database: its records, its time and what it moved in or out of flight."""
        self._events_applied.inc(len(batch.events))
        self._outcomes_applied.inc(len(batch.outcomes))
        self.batches_applied.inc()
        self.apply_duration.observe(apply_s)
        changed: set[str] = set()
        for event in batch.events:
            sign = _IN_FLIGHT_SIGN.get(type(event))
            if sign is not None:
                if TYPE_CHECKING:  # the lookup above, told to mypy
                    assert isinstance(event, (TransferDebited, TransferCredited, TransferRefunded))
                totals = self._in_flight.setdefault(event.currency, [0, 0])
                totals[0] += sign
                totals[1] += sign * canonical_minor(event.amount, event.currency)
                changed.add(event.currency)
        for currency in changed:
            self._publish_in_flight(currency)

    def _publish_in_flight(self, currency: str) -> None:
        count, amount_minor = self._in_flight[currency]
        self.transfers_in_flight.labels(currency).set(count)
        self.money_in_flight.labels(currency).set(amount_minor)

    def watch_lag(
        self, admin: AdminClient, settings: Settings, applied: Callable[[], dict[TopicPartitionKey, int | None]]
    ) -> None:
        """Report the lag of the offsets `applied()` returns (the consumer's, read at each scrape)."""
        self._registry.register(_Lag(admin, settings, applied))
