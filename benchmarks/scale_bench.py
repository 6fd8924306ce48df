"""`wallet bench scale`: how the pipeline scales out over real `wallet processor` processes.

For each count of `--processors` (default 1,2,4), on fresh topics of `--partitions` partitions
(default 16, under a prefix of its own): that many `wallet processor` processes join one consumer
group, each with its own instance id (so its own transactional id) and its own RocksDB folder.
Once the group is stable with every partition owned, the input of `wallet bench` (`--accounts`
accounts opened and funded, then `--transfers` transfers, the same seed every time, so the same
records) is produced, and the window runs from the first record produced to the last transfer's
outcome seen by a read_committed consumer of wallet.outcomes. The input is produced while the
processors run (they cannot be paused), alike for every count. Each count is checked as
`wallet bench` checks ours: every request exactly one outcome, the expected one, and the events
topic read whole (sequences gap-free, balances chained, money conserved).

Then, on the last count's topics with its processes still running:

- rebalance (`--rebalance-seconds S`, 0 skips): transfers are offered at half the rate that count
  measured; after `REBALANCE_SETTLE_S` one more processor starts (join); once the group is stable
  with it and every partition has progressed since (at most S seconds), the first one gets SIGTERM
  (leave), and the same wait follows. For each event: when the group was stable again, the
  longest gap between committed outcomes (any partition), the longest stall of one partition (the
  time between two of its events seen read_committed on wallet.events, whose partition is the
  commands partition that decided them) and how long after the event every partition had
  progressed past its longest stall. Then the load's transfers are checked like the input's.
- takeover: every processor stopped, and once the group is empty, one processor with an EMPTY
  RocksDB folder takes every partition and folds their whole history from wallet.events; its
  restore time comes from its own metrics (`wallet_processor_restore_duration_seconds`,
  `wallet_processor_restore_events_folded_total`) and is given per million events. Then the
  same instance restarts on the snapshot it kept.
- takeover after SIGKILL (`--skip-kill-takeover` skips it), twice, on fresh topics each: 2
  processors without standby, then 2 with `--standby`. Each is first measured like a count
  (so the rate with and without standby comes from the same run), then transfers are offered at
  half that rate; after `REBALANCE_SETTLE_S` the second processor gets SIGKILL. Measured: when
  every partition progressed again after the kill (its session timeout, 10 s, comes first), the
  longest one-partition stall, and from the survivor's metrics its restore: seconds, events
  folded, partitions taken from its standby, and the standby's lag just before the kill. The
  load's transfers are then checked like the rebalance's.

With no broker configured the bench starts one (`--brokers 1`) or a 3-node KRaft cluster
(`--brokers 3`, as `wallet kafka start --brokers 3` makes: replication factor 3, two in-sync
replicas) on free ports, and stops it at the end; everything it started is stopped and its topics
deleted at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from benchmarks.pipeline_bench import (
    ACCOUNTS_DEFAULT,
    KAFKA_TIMEOUT_S,
    LATENCY,
    MESSAGES_OURS,
    STALL_TIMEOUT_S,
    TRANSFER,
    Bench,
    BenchError,
    BenchOptions,
    Child,
    OutcomeTally,
    StageResult,
    _failure_of,
    _InputProducer,
    _interrupt,
    _positive_int,
    transfer_records,
)
from benchmarks.support.local_broker import broker_for
from infra.admin import BrokerUnavailableError, TopicProvisioningError, admin_client, ensure_topics
from infra.kafka_clients import kafka_security, processor_producer_config
from infra.metrics import ScrapeError, scrape
from infra.ports import free_loopback_ports
from infra.settings import Settings
from streams.runtime.processor import ProcessorConfig
from wallet.stack import processors_not_ready

PROCESSORS_DEFAULT = "1,2,4"
PARTITIONS_DEFAULT = 16
# Small enough that the whole run (three counts, the rebalance and the takeover) stays within
# about 4 minutes on a 2-core machine.
TRANSFERS_DEFAULT = 50_000
BROKER_CHOICES = (1, 3)
# The longest wait after each event for the group to be stable and every partition to progress
# (a killed member's partitions wait for its session timeout, 10 s, first).
REBALANCE_SECONDS_DEFAULT = 60.0
REBALANCE_SETTLE_S = 5.0  # load flows this long before the join
REBALANCE_TAIL_S = 2.0  # and this long after every partition progressed again
REBALANCE_LOAD_SHARE = 0.5  # the offered load, as a share of the rate the last count measured
LOAD_TICK_S = 0.005
WATCH_POLL_S = 0.01
EVENTS_BATCH_SIZE_MAX = 10_000
# Each member joining a group makes a rebalance; on a loaded machine each Python start takes seconds.
GROUP_TIMEOUT_S = 120.0
# Stopped processors leave the group at once; killed ones at their session timeout.
GROUP_EMPTY_TIMEOUT_S = 60.0
GROUP_POLL_S = 0.5
TRANSACTIONS_READY_TIMEOUT_S = 180.0
# The takeover's restore may fold the whole log; the processor's own bound is 600 s.
TAKEOVER_TIMEOUT_S = ProcessorConfig(instance_id="", store_path=Path()).restore_timeout_s + GROUP_TIMEOUT_S
TAKEOVER_INSTANCE_ID = "takeover"
RESTORE_SECONDS = "wallet_processor_restore_duration_seconds"
RESTORE_EVENTS = "wallet_processor_restore_events_folded_total"
RESTORE_FROM_STANDBY = "wallet_processor_restore_standby_partitions_total"
STANDBY_LAG = "wallet_processor_standby_lag_offsets"
KILL_PROCESSORS = 2
KILL_WAIT_S = 60.0  # the longest wait after the SIGKILL for every partition to progress again


@dataclass(frozen=True)
class ScaleOptions:
    processors: tuple[int, ...]
    brokers: int | None
    rebalance_seconds: float  # 0: no rebalance phase
    takeover: bool
    kill_takeover: bool


class ScaleStage(Bench):
    """One process count on its own topics: `wallet bench`'s topics, input, processes and checks."""

    def __init__(self, base: Settings, options: BenchOptions, processors: int, standby: bool = False) -> None:
        super().__init__(base, options)
        self.processors = processors
        self.standby = standby
        self.running: list[Child] = []
        self.metrics_urls: dict[str, str] = {}  # child name -> its metrics
        self._started = 0
        self.tally: OutcomeTally | None = None

    @property
    def name(self) -> str:
        return f"{self.processors} processor{'s' if self.processors > 1 else ''}" + (
            " with standby" if self.standby else ""
        )

    def start_member(self) -> Child:
        """One more processor of the group: its own instance id, RocksDB folder and metrics port."""
        self._started += 1
        index = self._started
        (port,) = free_loopback_ports(1)
        child = self.start_processor(
            f"processor-{index}",
            instance_id=f"p{index}",
            store=f"store-p{index}",
            metrics_port=port,
            extra_args=("--standby",) if self.standby else (),
        )
        self.metrics_urls[child.name] = f"http://127.0.0.1:{port}/metrics"
        self.running.append(child)
        return child

    def _check_running(self, what: str) -> None:
        for child in self.running:
            if child.exited() is not None:
                raise child.failure(f"{self.name}: {child.name} exited with code {child.exited()} {what}")

    def wait_for_group(self, members: int) -> float:
        """Waits until the group is stable with `members` members owning every partition; returns the seconds."""
        admin = admin_client(self.bootstrap)
        started_s = time.monotonic()
        while (waiting := processors_not_ready(admin, self.settings, members)) is not None:
            self._check_running("before its group was stable")
            if time.monotonic() - started_s > GROUP_TIMEOUT_S:
                raise _failure_of(
                    self.running, f"{self.name}: the group was not stable within {GROUP_TIMEOUT_S:.0f} s: {waiting}"
                )
            time.sleep(GROUP_POLL_S)
        return time.monotonic() - started_s

    def wait_for_empty_group(self) -> float:
        """Waits until no member is left in the group (a processor killed rather than stopped leaves
        at its session timeout); returns the seconds."""
        admin = admin_client(self.bootstrap)
        group = self.settings.processor_group_id
        started_s = time.monotonic()
        while True:
            try:
                found = admin.list_groups(group, timeout=KAFKA_TIMEOUT_S)
            except KafkaException as error:
                raise BenchError(f"describing group {group} failed: {error}") from None
            description = next((g for g in found if g.id == group), None)
            if description is None or not description.members:
                return time.monotonic() - started_s
            if time.monotonic() - started_s > GROUP_EMPTY_TIMEOUT_S:
                raise BenchError(
                    f"group {group} still had {len(description.members)} members {GROUP_EMPTY_TIMEOUT_S:.0f} s "
                    f"after its processors stopped"
                )
            time.sleep(GROUP_POLL_S)

    def stop_running(self) -> None:
        for child in self.running:
            if not child.stop():
                self.problems.append(f"{child.name} did not stop within its grace period of SIGTERM")
        self.running = []

    # -- 1: the rate of this count ----------------------------------------------------------

    def measure(self) -> dict:
        options = self.options
        self.say(f"[{self.name}] fresh topics under {self.prefix}; starting {self.processors} wallet processor(s)")
        ensure_topics(self.settings, timeout_s=KAFKA_TIMEOUT_S)
        tally = self.tally = self._tally(self.settings.outcomes_topic, "outcomes")
        for _ in range(self.processors):
            self.start_member()
        group_s = self.wait_for_group(self.processors)
        records = 2 * options.accounts + options.transfers
        self.say(
            f"[{self.name}] group stable after {group_s:.1f} s; producing {records:,} commands "
            f"({options.transfers:,} transfers) while they run"
        )
        started_s = time.monotonic()
        setup, transfers = self.main_input((self.settings.commands_topic,), time.time_ns() // 1_000_000)
        # Every account is in the log before any transfer: a credit leg, appended to its partition
        # while the input is still being produced, must come after the opening of its account.
        input_s = self.produce_input([setup], 2 * options.accounts)
        input_s += self.produce_input([transfers], options.transfers)
        timeout_s = self._stage_timeout_s("ours", 2 * options.accounts + 2 * options.transfers)
        end_s = self._await_outcomes(self.running, tally, options.transfers, timeout_s, self.name)
        load_average = os.getloadavg()
        problems = self._check_results(self.name, tally, options.accounts, self.expected)
        ledger = self._check_ledger(self.name, self.settings.events_topic)
        result = StageResult(
            options.transfers,
            self._messages(tally, options.accounts, MESSAGES_OURS, self.expected_in_place),
            end_s - started_s,
            "first input record produced",
            dict(tally.results_of(TRANSFER)),
            problems + ledger["problems"],
            ledger,
        )
        return {
            "processors": self.processors,
            "topic_prefix": self.prefix,
            **result.as_dict(None),
            "input_s": round(input_s, 3),
            "group_stable_s": round(group_s, 1),
            "load_average": [round(value, 2) for value in load_average],
        }

    # -- 2: a member joins and one leaves under load ----------------------------------------

    def _offered_load(
        self, tally: OutcomeTally, rate_per_s: float, longest_s: float, seed_offset: int
    ) -> tuple[_ProgressWatch, Counter, Generator[tuple[str, bytes]], _InputProducer]:
        """What a phase under load needs: its progress watch, enough transfers for `longest_s` at
        `rate_per_s` (their certain outcomes counted in the Counter) and the producer offering them."""
        options = self.options
        watch = _ProgressWatch(tally, self.bootstrap, self.settings.events_topic, options.partitions)
        expected: Counter = Counter()
        records = transfer_records(
            options.accounts, math.ceil(rate_per_s * longest_s) + 1, options.seed + seed_offset, LATENCY, expected
        )
        return watch, expected, records, _InputProducer(self.bootstrap, linger_ms=5)

    def rebalance(self, seconds: float, rate_per_s: float) -> dict:
        """Under load: one more processor joins; once the group is stable and every partition has
        progressed since (or after `seconds`), the first one gets SIGTERM (leaves); the same wait."""
        options = self.options
        tally = self.tally
        assert tally is not None, "rebalance runs after measure"
        longest_s = REBALANCE_SETTLE_S + 2 * (seconds + REBALANCE_TAIL_S)
        self.say(
            f"[rebalance] {rate_per_s:,.0f} transfers/s offered to {self.name}; one more joins after "
            f"{REBALANCE_SETTLE_S:g} s, then the first one leaves (SIGTERM); each time the load goes on until "
            f"the group is stable and every partition progressed (at most {seconds:g} s)"
        )
        watch, expected, records, producer = self._offered_load(tally, rate_per_s, longest_s, seed_offset=1)
        admin = admin_client(self.bootstrap)
        sent = 0
        joiner: Child | None = None
        leaver: Child | None = None
        event_s: dict[str, float] = {}
        recovery: dict[str, dict] = {}
        phase, members = "settle", self.processors
        stable_s = recovered_s = None
        group_check_s = 0.0
        watch.start()
        try:
            with self._bar(int(longest_s), "rebalance", "s") as bar:
                started_s = time.monotonic()
                while True:
                    now_s = time.monotonic()
                    sent += _produce_due(
                        producer, self.settings.commands_topic, records, int((now_s - started_s) * rate_per_s) - sent
                    )
                    if phase == "settle" and now_s - started_s >= REBALANCE_SETTLE_S:
                        phase, members = "join", self.processors + 1
                        event_s[phase] = now_s
                        joiner = self.start_member()
                    elif phase != "settle":
                        if recovered_s is None and now_s >= group_check_s:
                            group_check_s = now_s + GROUP_POLL_S
                            if stable_s is None and processors_not_ready(admin, self.settings, members) is None:
                                stable_s = now_s
                            if stable_s is not None and watch.progressed_since(stable_s):
                                recovered_s = time.monotonic()
                        waited_s = now_s - event_s[phase]
                        if (recovered_s is not None and now_s - recovered_s >= REBALANCE_TAIL_S) or waited_s > seconds:
                            recovery[phase] = {
                                "group_stable_after_s": None
                                if stable_s is None
                                else round(stable_s - event_s[phase], 2),
                                "recovered_after_s": (
                                    None if recovered_s is None else round(recovered_s - event_s[phase], 2)
                                ),
                            }
                            if phase == "leave":
                                end_s = now_s
                                break
                            phase, members = "leave", self.processors
                            stable_s = recovered_s = None
                            leaver = self.running.pop(0)
                            event_s[phase] = now_s
                            leaver.process.send(signal.SIGTERM)
                    self._check_running("during the rebalance phase")
                    watch.check()
                    bar.update(int(now_s - started_s) - bar.n)
                    time.sleep(LOAD_TICK_S)
            producer.flush()
        finally:
            watch.stop()
            records.close()  # adds the outcomes of the transfers it made to `expected`
        assert joiner is not None and leaver is not None
        if not leaver.stop():
            self.problems.append(f"{leaver.name} did not stop within its grace period of SIGTERM")
        problems, ledger = self._check_load("rebalance", sent, expected, rate_per_s)
        join = {**watch.figures(event_s["join"], event_s["leave"], options.partitions), **recovery["join"]}
        if joiner.marker_s is not None:
            join["joiner_assigned_after_s"] = round(joiner.marker_s - event_s["join"], 2)
        leave = {**watch.figures(event_s["leave"], end_s, options.partitions), **recovery["leave"]}
        problems += [
            f"rebalance {name}: the group was not stable with every partition progressing within {seconds:g} s"
            for name, figures in (("join", join), ("leave", leave))
            if figures["recovered_after_s"] is None
        ]
        self.problems += problems
        return {
            "processors": self.processors,
            "offered_transfers_per_s": round(rate_per_s, 1),
            "transfers": sent,
            "wait_max_s": seconds,
            "join": join,
            "leave": leave,
            "checks_ok": not problems and not ledger["problems"],
            "problems": problems + ledger["problems"],
            "ledger": ledger,
            "load_average": [round(value, 2) for value in os.getloadavg()],
        }

    def _check_load(self, what: str, sent: int, expected: Counter, rate_per_s: float) -> tuple[list[str], dict]:
        """Every transfer of the load answered, once, as expected: nothing lost or doubled by the
        moves; then the events topic read whole. Returns the problems and the ledger's figures."""
        tally = self.tally
        assert tally is not None, "a load runs after measure"
        self._await_outcomes(
            self.running, tally, sent, STALL_TIMEOUT_S + sent / rate_per_s, f"{what} drain", kind=LATENCY
        )
        tally.poll(0.5)  # a second answer would be arriving now
        problems: list[str] = []
        if tally.results_of(LATENCY) != expected:
            problems.append(f"{what}: transfer outcomes {dict(tally.results_of(LATENCY))}, expected {dict(expected)}")
        if tally.contradictions or tally.repeats:
            problems.append(f"{what}: answered twice or differently: {(tally.contradictions + tally.repeats)[:3]}")
        return problems, self._check_ledger(what, self.settings.events_topic)

    # -- 2b: one of two processors SIGKILLed under load -------------------------------------

    def kill_takeover(self, rate_per_s: float) -> dict:
        """Under load, the last processor gets SIGKILL; until every partition progressed again
        (at most KILL_WAIT_S): what the stall was and what the survivor's restore took."""
        options = self.options
        tally = self.tally
        assert tally is not None, "kill_takeover runs after measure"
        survivor, victim = self.running[0], self.running[-1]
        survivor_url = self.metrics_urls[survivor.name]
        longest_s = REBALANCE_SETTLE_S + KILL_WAIT_S + REBALANCE_TAIL_S
        self.say(
            f"[kill {self.name}] {rate_per_s:,.0f} transfers/s offered; {victim.name} gets SIGKILL after "
            f"{REBALANCE_SETTLE_S:g} s, then the load goes on until every partition progressed again"
        )
        watch, expected, records, producer = self._offered_load(tally, rate_per_s, longest_s, seed_offset=2)
        sent = 0
        kill_s = recovered_s = None
        before = lag_at_kill = None
        watch.start()
        try:
            started_s = time.monotonic()
            while True:
                now_s = time.monotonic()
                sent += _produce_due(
                    producer, self.settings.commands_topic, records, int((now_s - started_s) * rate_per_s) - sent
                )
                if kill_s is None and now_s - started_s >= REBALANCE_SETTLE_S:
                    before = self._metrics_of(survivor, survivor_url)
                    lag_at_kill = int(before.total(STANDBY_LAG))
                    victim.process.kill()
                    self.running.remove(victim)
                    kill_s = time.monotonic()
                elif kill_s is not None:
                    if recovered_s is None and watch.progressed_since(kill_s):
                        recovered_s = now_s
                    if (recovered_s is not None and now_s - recovered_s >= REBALANCE_TAIL_S) or (
                        now_s - kill_s > KILL_WAIT_S
                    ):
                        end_s = now_s
                        break
                self._check_running("during the kill takeover")
                watch.check()
                time.sleep(LOAD_TICK_S)
            producer.flush()
        finally:
            watch.stop()
            records.close()  # adds the outcomes of the transfers it made to `expected`
        victim.stop()  # reaps it
        assert kill_s is not None and before is not None
        after = self._metrics_of(survivor, survivor_url)
        problems, ledger = self._check_load("kill takeover", sent, expected, rate_per_s)
        if recovered_s is None:
            problems.append(f"kill takeover ({self.name}): not every partition progressed within {KILL_WAIT_S:g} s")
        self.problems += problems
        restores = int(after.total(f"{RESTORE_SECONDS}_count") - before.total(f"{RESTORE_SECONDS}_count"))
        return {
            "offered_transfers_per_s": round(rate_per_s, 1),
            "transfers": sent,
            **watch.figures(kill_s, end_s, options.partitions),
            "recovered_after_s": None if recovered_s is None else round(recovered_s - kill_s, 2),
            "survivor_restores": restores,
            "survivor_restore_s": round(
                after.total(f"{RESTORE_SECONDS}_sum") - before.total(f"{RESTORE_SECONDS}_sum"), 3
            ),
            "survivor_events_folded": int(after.total(RESTORE_EVENTS) - before.total(RESTORE_EVENTS)),
            "partitions_from_standby": int(after.total(RESTORE_FROM_STANDBY) - before.total(RESTORE_FROM_STANDBY)),
            "standby_lag_at_kill_offsets": lag_at_kill,
            "checks_ok": not problems and not ledger["problems"],
            "problems": problems + ledger["problems"],
            "load_average": [round(value, 2) for value in os.getloadavg()],
        }

    def _metrics_of(self, child: Child, url: str):
        try:
            return scrape(url)
        except ScrapeError as error:
            raise child.failure(f"{self.name}: the metrics of {child.name} did not answer: {error}") from None

    # -- 3: a processor without its snapshot takes every partition --------------------------

    def takeover(self) -> dict:
        self.say("[takeover] stopping every processor; waiting for the group to be empty")
        self.stop_running()
        empty_s = self.wait_for_empty_group()
        self.say(f"[takeover] group empty after {empty_s:.1f} s; a processor with an empty RocksDB folder starts")
        empty = self._restore("takeover-empty", "without its snapshot")
        self.say(
            f"[takeover] {empty['events_folded']:,} events folded in {empty['restore_s']:.2f} s; "
            f"the same instance restarts on its snapshot"
        )
        kept = self._restore("takeover-snapshot", "on its snapshot")
        return {"empty_store": empty, "snapshot_kept": kept, "group_empty_after_s": round(empty_s, 1)}

    def _restore(self, name: str, how: str) -> dict:
        """One start of the takeover instance (its folder kept between starts): what its restore took."""
        (port,) = free_loopback_ports(1)
        child = self.start_processor(name, instance_id=TAKEOVER_INSTANCE_ID, store="store-takeover", metrics_port=port)
        self.running = [child]
        while child.marker_s is None:
            self._check_running(f"before its partitions were assigned ({how})")
            if time.monotonic() - child.started_s > TAKEOVER_TIMEOUT_S:
                raise child.failure(f"takeover {how}: no partition assigned within {TAKEOVER_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        try:
            metrics = scrape(f"http://127.0.0.1:{port}/metrics")
        except ScrapeError as error:
            raise child.failure(f"takeover {how}: its metrics did not answer: {error}") from None
        restore_s = metrics.total(f"{RESTORE_SECONDS}_sum")
        folded = int(metrics.total(RESTORE_EVENTS))
        restores = int(metrics.total(f"{RESTORE_SECONDS}_count"))
        self.stop_running()
        return {
            "events_folded": folded,
            "restore_s": round(restore_s, 3),
            "restores": restores,
            "restore_s_per_million_events": round(restore_s * 1e6 / folded, 2) if folded else None,
            "assigned_after_s": round(child.marker_s - child.started_s, 2),
        }


def _produce_due(producer: _InputProducer, topic: str, records: Iterator[tuple[str, bytes]], count: int) -> int:
    """Produces the next `count` records (none when `count` <= 0: the offer is ahead of its pace),
    serves the delivery reports, and returns how many were produced."""
    for _ in range(count):
        key, value = next(records)
        producer.produce(topic, key, value)
    producer.poll()
    return max(count, 0)


class _ProgressWatch:
    """On a thread of its own: when committed outcomes arrive (the stage's tally, which the thread
    alone reads while it runs) and when each partition's events arrive (read_committed, from the
    end of wallet.events)."""

    def __init__(self, tally, bootstrap: str, events_topic: str, partitions: int) -> None:
        self._tally = tally
        self._events = Consumer(
            {
                **kafka_security("api"),
                "bootstrap.servers": bootstrap,
                "group.id": f"{events_topic}-bench-watch",  # never joined nor committed: partitions are assigned
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        self._events.assign([TopicPartition(events_topic, partition, OFFSET_END) for partition in range(partitions)])
        self.outcomes_s: list[float] = []
        self.partitions_s: dict[int, list[float]] = {partition: [] for partition in range(partitions)}
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._watch, name="rebalance-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():
                decided = self._tally.poll(WATCH_POLL_S)
                now_s = time.monotonic()
                if decided:
                    self.outcomes_s.append(now_s)
                seen: set[int] = set()
                for record in self._events.consume(EVENTS_BATCH_SIZE_MAX, 0):
                    error = record.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise KafkaException(error)
                    partition = record.partition()
                    assert partition is not None, "a record without a partition"
                    seen.add(partition)
                for partition in seen:
                    self.partitions_s[partition].append(now_s)
        except BaseException as error:  # reported by the main thread
            self._errors.append(error)

    def progressed_since(self, since_s: float) -> bool:
        """Every partition has had an event after `since_s`."""
        return all(times_s and times_s[-1] > since_s for times_s in self.partitions_s.values())

    def check(self) -> None:
        if self._errors:
            raise BenchError(f"watching outcomes and events failed: {self._errors[0]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(KAFKA_TIMEOUT_S)
        self._events.close()
        self.check()

    def figures(self, event_s: float, until_s: float, partitions: int) -> dict:
        outcome_gap = _longest_gap(self.outcomes_s, event_s, until_s)
        stalls = {
            partition: _longest_gap(self.partitions_s[partition], event_s, until_s) for partition in range(partitions)
        }
        progressed = {partition: gap for partition, gap in stalls.items() if gap is not None}
        return {
            "outcome_gap_ms": round((outcome_gap[1] - outcome_gap[0]) * 1000) if outcome_gap else None,
            "partition_stall_ms": round(max((end - start for start, end in progressed.values()), default=0) * 1000),
            # When every partition had made progress past its longest stall after the event.
            "all_partitions_progress_s": (
                round(max(end for _, end in progressed.values()) - event_s, 2) if progressed else None
            ),
            "partitions_without_progress": sorted(set(stalls) - set(progressed)),
        }


def _longest_gap(times_s: list[float], event_s: float, until_s: float) -> tuple[float, float] | None:
    """The longest gap between consecutive `times_s` (ascending) from the last one at or before
    `event_s` to the last one before `until_s`; None if none came after `event_s`."""
    first = max(bisect.bisect_right(times_s, event_s) - 1, 0)
    window = times_s[first : bisect.bisect_left(times_s, until_s)]
    if not window or window[-1] <= event_s:
        return None
    if len(window) == 1 or window[0] > event_s:
        window = [event_s, *window]  # nothing before the event: the gap runs from the event itself
    return max(zip(window, window[1:], strict=False), key=lambda pair: pair[1] - pair[0])


# -- the run -----------------------------------------------------------------------------------


def _processor_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of process counts, got {text!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"distinct process counts of at least 1, got {text!r}")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ProcessorConfig(instance_id="", store_path=Path())
    parser.add_argument(
        "--processors",
        type=_processor_counts,
        default=_processor_counts(PROCESSORS_DEFAULT),
        help=f"process counts measured one after the other, comma-separated (default {PROCESSORS_DEFAULT})",
    )
    parser.add_argument(
        "--partitions",
        type=_positive_int,
        default=PARTITIONS_DEFAULT,
        help=f"partitions of every topic (default {PARTITIONS_DEFAULT})",
    )
    parser.add_argument(
        "--transfers",
        type=_positive_int,
        default=TRANSFERS_DEFAULT,
        help=f"transfers of each count's input (default {TRANSFERS_DEFAULT:,})",
    )
    parser.add_argument(
        "--accounts",
        type=_positive_int,
        default=ACCOUNTS_DEFAULT,
        help=f"accounts the transfers move money among, at least 2 (default {ACCOUNTS_DEFAULT:,})",
    )
    parser.add_argument(
        "--brokers",
        type=int,
        choices=BROKER_CHOICES,
        help="with no broker configured: start 1 broker or a 3-node KRaft cluster for the run; with one "
        "configured: check that it has that many (default: a running local broker as it is, else 1)",
    )
    parser.add_argument(
        "--rebalance-seconds",
        type=float,
        default=REBALANCE_SECONDS_DEFAULT,
        help="window after a processor joins and after one leaves, under load; 0 skips the rebalance phase "
        f"(default {REBALANCE_SECONDS_DEFAULT:g})",
    )
    parser.add_argument("--skip-takeover", action="store_true", help="do not measure the restore of a takeover")
    parser.add_argument(
        "--skip-kill-takeover",
        action="store_true",
        help=f"do not measure the takeover after a SIGKILL of one of {KILL_PROCESSORS} processors "
        "(without and with standby)",
    )
    parser.add_argument(
        "--batch-size-max",
        type=_positive_int,
        default=defaults.batch_size_max,
        help=f"records per transaction of each processor (default {defaults.batch_size_max:,})",
    )
    parser.add_argument(
        "--commit-interval-ms",
        type=_positive_int,
        default=defaults.commit_interval_ms,
        help=f"longest wait for a batch to fill (default {defaults.commit_interval_ms})",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated transfers (default 1)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    from infra.settings import settings_from_args
    from wallet.localkafka import LocalKafkaError

    if args.accounts < 2:
        print("wallet bench scale: --accounts must be at least 2", file=sys.stderr)
        return 2
    options = BenchOptions(
        transfers=args.transfers,
        accounts=args.accounts,
        partitions=args.partitions,
        faust_transfers=0,
        faust_guarantees=(),
        latency_seconds=0,
        batch_size_max=args.batch_size_max,
        commit_interval_ms=args.commit_interval_ms,
        seed=args.seed,
        profile_processor=None,
        keep_topics=False,
        kafka_streams=False,
        holds=0,
    )
    scale = ScaleOptions(
        processors=args.processors,
        brokers=args.brokers,
        rebalance_seconds=max(args.rebalance_seconds, 0.0),
        takeover=not args.skip_takeover,
        kill_takeover=not args.skip_kill_takeover,
    )
    try:
        with broker_for(settings_from_args(args), say=Bench.say, brokers=args.brokers) as settings:
            return _run_scale(settings, options, scale, args.json)
    except LocalKafkaError as error:
        print(f"wallet bench scale: starting a local broker failed: {error}", file=sys.stderr)
        return 1


def _wait_for_transactions(settings: Settings) -> float:
    """Waits until a transactional producer can start (a fresh cluster creates and loads its
    transaction state log on first use: on a loaded 3-node cluster longer than a processor's own
    30 s bound of that call); returns the seconds."""
    producer = Producer(
        processor_producer_config(settings.bootstrap, f"{settings.topic_prefix}bench-scale-probe", 10_000)
    )
    started_s = time.monotonic()
    while True:
        try:
            producer.init_transactions(KAFKA_TIMEOUT_S)
            return time.monotonic() - started_s
        except KafkaException as error:
            if not error.args[0].retriable() or time.monotonic() - started_s > TRANSACTIONS_READY_TIMEOUT_S:
                raise BenchError(
                    f"no transactional producer could start at {settings.bootstrap} within "
                    f"{TRANSACTIONS_READY_TIMEOUT_S:.0f} s: {error.args[0].str()}"
                ) from None
            time.sleep(GROUP_POLL_S)


def _broker_count(settings: Settings) -> int:
    return len(admin_client(settings.bootstrap).list_topics(timeout=KAFKA_TIMEOUT_S).brokers)


def _run_scale(settings: Settings, options: BenchOptions, scale: ScaleOptions, as_json: bool) -> int:
    stages: list[ScaleStage] = []
    failed = True
    interrupt_on_sigterm = threading.current_thread() is threading.main_thread()
    if interrupt_on_sigterm:
        # A SIGTERM must still stop the processors and delete the topics, as Ctrl-C does.
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = _scale_report(settings, options, scale, stages)
        failed = not report["ok"]
    except (BenchError, BrokerUnavailableError, TopicProvisioningError, KafkaException) as error:
        print(f"wallet bench scale: {error}", file=sys.stderr)
        return 1
    finally:
        for stage in stages:
            stage.cleanup(keep_work_dir=failed)
        if interrupt_on_sigterm:
            signal.signal(signal.SIGTERM, previous_handler)
    print(json.dumps(report, indent=1) if as_json else format_report(report))
    return 0 if report["ok"] else 1


def _scale_report(settings: Settings, options: BenchOptions, scale: ScaleOptions, stages: list[ScaleStage]) -> dict:
    run_started_s = time.monotonic()
    brokers = _broker_count(settings)
    if scale.brokers is not None and brokers != scale.brokers:
        raise BenchError(f"--brokers {scale.brokers} asked, but the cluster at {settings.bootstrap} has {brokers}")
    report: dict = {
        "transfers": options.transfers,
        "accounts": options.accounts,
        "partitions": options.partitions,
        "brokers": brokers,
        "replication_factor": settings.replication_factor,
        "bootstrap": settings.bootstrap,
        "batch_size_max": options.batch_size_max,
        "commit_interval_ms": options.commit_interval_ms,
        "cpus": os.cpu_count(),
        "load_average_start": [round(value, 2) for value in os.getloadavg()],
        "runs": [],
    }
    ready_s = _wait_for_transactions(settings)
    if ready_s > 1:
        Bench.say(f"the cluster's transaction coordinator answered after {ready_s:.1f} s")
    problems: list[str] = []
    for index, count in enumerate(scale.processors):
        stage = ScaleStage(settings, options, count)
        stages.append(stage)
        result = stage.measure()
        report["runs"].append(result)
        first_per_s = report["runs"][0]["transfers_per_s"]
        result["ratio_to_first"] = round(result["transfers_per_s"] / first_per_s, 3) if first_per_s else None
        if index < len(scale.processors) - 1:
            stage.stop_running()  # the next count runs alone
            problems += stage.problems
            stage.cleanup(keep_work_dir=bool(stage.problems))
            stages.remove(stage)
    last = stages[-1]
    if scale.rebalance_seconds > 0:
        rate_per_s = report["runs"][-1]["transfers_per_s"] * REBALANCE_LOAD_SHARE
        report["rebalance"] = last.rebalance(scale.rebalance_seconds, rate_per_s)
    if scale.takeover:
        report["takeover"] = last.takeover()
    last.stop_running()
    problems += last.problems
    if scale.kill_takeover:
        last.cleanup(keep_work_dir=bool(last.problems))
        stages.remove(last)
        report["kill_takeover"] = []
        for standby in (False, True):
            stage = ScaleStage(settings, options, KILL_PROCESSORS, standby=standby)
            stages.append(stage)
            result = stage.measure()
            result["kill"] = stage.kill_takeover(result["transfers_per_s"] * REBALANCE_LOAD_SHARE)
            report["kill_takeover"].append({"standby": standby, **result})
            stage.stop_running()
            problems += stage.problems
            stage.cleanup(keep_work_dir=bool(stage.problems))
            stages.remove(stage)
    report["problems"] = problems
    report["ok"] = not problems
    report["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    report["run_s"] = round(time.monotonic() - run_started_s, 1)
    return report


# -- output ------------------------------------------------------------------------------------


def _load_text(load_average: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in load_average)


def _seconds_text(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def _event_text(figures: dict) -> str:
    gap = figures["outcome_gap_ms"]
    return (
        f"group stable after {_seconds_text(figures['group_stable_after_s'])}, every partition progressing "
        f"again after {_seconds_text(figures['all_partitions_progress_s'])}; longest gap in committed outcomes "
        f"{'-' if gap is None else f'{gap:,} ms'}, longest one-partition stall {figures['partition_stall_ms']:,} ms"
    )


def format_report(report: dict) -> str:
    first = report["runs"][0]["processors"]
    lines = [
        f"wallet bench scale: {report['transfers']:,} transfers among {report['accounts']:,} accounts per count, "
        f"{report['partitions']} partitions, {report['brokers']} broker(s) (replication factor "
        f"{report['replication_factor']}) at {report['bootstrap']}, batch {report['batch_size_max']:,} / "
        f"{report['commit_interval_ms']} ms, {report['cpus']} CPUs, load average at start "
        f"{_load_text(report['load_average_start'])}",
        "",
        f"{'processors':>10}{'transfers/s':>13}{f'vs {first}':>8}{'window':>10}{'messages/s':>12}{'checks':>8}"
        f"   load average at its end",
    ]
    for run in report["runs"]:
        lines.append(
            f"{run['processors']:>10}{run['transfers_per_s']:>13,.0f}{run['ratio_to_first']:>7.2f}x"
            f"{run['elapsed_s']:>9.1f}s{run['messages_per_s']:>12,.0f}{'ok' if run['checks_ok'] else 'FAILED':>8}"
            f"   {_load_text(run['load_average'])}"
        )
    rebalance = report.get("rebalance")
    if rebalance:
        lines += [
            "",
            f"rebalance under {rebalance['offered_transfers_per_s']:,.0f} transfers/s offered to "
            f"{rebalance['processors']} processor(s), times after each event "
            f"({rebalance['transfers']:,} transfers, checks {'ok' if rebalance['checks_ok'] else 'FAILED'}, "
            f"load average {_load_text(rebalance['load_average'])}):",
            f"  join (one more started): {_event_text(rebalance['join'])}"
            + (
                f"; the new one had its partitions {rebalance['join']['joiner_assigned_after_s']:.1f} s after "
                "its start (restored)"
                if "joiner_assigned_after_s" in rebalance["join"]
                else ""
            ),
            f"  leave (SIGTERM to the first): {_event_text(rebalance['leave'])}",
        ]
    takeover = report.get("takeover")
    if takeover:
        empty, kept = takeover["empty_store"], takeover["snapshot_kept"]
        per_million = empty["restore_s_per_million_events"]
        lines += [
            "",
            f"takeover of all {report['partitions']} partitions by a processor with an empty RocksDB folder: "
            f"{empty['events_folded']:,} events folded in {empty['restore_s']:.2f} s"
            + (f" ({per_million:.1f} s per million events)" if per_million is not None else "")
            + f", partitions assigned {empty['assigned_after_s']:.1f} s after its start",
            f"  the same instance restarted on its snapshot: {kept['events_folded']:,} events folded in "
            f"{kept['restore_s']:.2f} s, partitions assigned {kept['assigned_after_s']:.1f} s after its start",
        ]
    kills = report.get("kill_takeover")
    if kills:
        lines += [
            "",
            f"takeover after a SIGKILL of one of {KILL_PROCESSORS} processors under load, each on fresh topics:",
        ]
        for run in kills:
            kill = run["kill"]
            lines += [
                f"  {'with' if run['standby'] else 'without'} standby: {run['transfers_per_s']:,.0f} transfers/s "
                f"measured first (load {_load_text(run['load_average'])}); SIGKILL under "
                f"{kill['offered_transfers_per_s']:,.0f}/s offered: every partition progressing again after "
                f"{_seconds_text(kill['recovered_after_s'])} (longest one-partition stall "
                f"{kill['partition_stall_ms']:,} ms); the survivor's restore {kill['survivor_restore_s']:.2f} s "
                f"folding {kill['survivor_events_folded']:,} events"
                f" ({kill['partitions_from_standby']} partitions from its standby, lagging "
                f"{kill['standby_lag_at_kill_offsets']:,} offsets at the kill); checks "
                f"{'ok' if kill['checks_ok'] else 'FAILED'}, load {_load_text(kill['load_average'])}",
            ]
    lines += [
        "",
        "window: first input record produced (the group already stable) to the last transfer's outcome seen "
        "read_committed; checks: every request exactly one, expected, outcome and the events topic read whole "
        "(sequences gap-free, balances chained, money conserved).",
        f"run time {report['run_s']:.0f} s, load average at the end {_load_text(report['load_average_end'])}; "
        + ("all checks passed" if report["ok"] else "PROBLEMS:"),
    ]
    lines += [f"  - {problem}" for problem in report["problems"]]
    return "\n".join(lines)
