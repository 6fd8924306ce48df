"""`wallet bench`: the processor beside the Kafka Streams peer, the faust-streaming peer and the
saga ceiling, on the same input and broker in one run.

One run, on fresh topics under a unique prefix (`<prefix>bench-<8 hex>.`), deleted at the end
(and on a broker this run starts itself when none is configured and none runs):

0. input: open and fund `--accounts` accounts, then `--transfers` transfers among them, produced
   once by one idempotent producer with the project's partitioner (key = owning account). Most
   transfers succeed; by construction a fixed share fails for insufficient funds (an amount
   no balance can reach) and a fixed share goes to an account that does not exist (debited,
   refused by the receiver's side, refunded), so the expected outcome of every transfer is
   known and checked.
1. copy loop: `benchmarks.raw_ceiling` copies the commands topic with a transactional
   consume-and-copy loop (the processor's client settings, batch size and commit style): what
   moving the bytes costs, with no decision at all.
1b. the saga ceiling: `benchmarks.saga_ceiling`, the same saga as a bare transactional loop on
   dict state with no validation, on the same commands topic: the most a Python saga reaches.
1c. the Kafka Streams peer (`benchmarks/kafka_streams_peer/`, Java, Processor API, RocksDB,
   exactly_once_v2, 2 threads, commit 1,000 ms) on the same commands topic.
2. ours: one `wallet processor` process on the prepared topics, until every transfer's outcome
   is visible to a read_committed consumer.
3. latency: with the processor still running, transfers offered at half, then at 80 % of the rate
   measured in 2, each for `--latency-seconds`; latency = produce call -> outcome seen by a
   read_committed consumer.
2b. holds: with the processor stopped, `--holds` holds are produced among the same accounts,
   each placed and then captured (half whole, half a part with `final`, which releases the
   rest); the processor restarts on its snapshot and the stage runs until every capture's
   outcome is visible: holds captured per second, beside ours' transfers per second of the same
   run. A captured hold is 3 commands consumed (place, capture, credit leg) + 3 events + 1 leg +
   2 outcomes produced (MESSAGES_PER_CAPTURED_HOLD).
2d. the whole machine: `--machine-processors N` (default 2) `wallet processor` processes of one
   group, on topics of their own holding the same input, until every transfer's outcome is
   visible; its window runs from the first process's first consumed record, so the rebalance
   when the others join is inside it. Beside ours (one process) it gives the scaling from one
   process to N, and beside the Kafka Streams peer (2 stream threads) a whole-machine comparison.
2c. read-model lag, with `--readmodel-db postgresql://...` (`--readmodel-shards 1,2`): for each
   N, a processor on topics of its own holding the same input, with N `wallet readmodel --shard
   I/N` processes reading its events and outcomes into the database while it runs; their lag
   (the last stable offsets of both topics minus the offsets the read model stored) is sampled
   every second: its maximum, its value when the processor's last outcome is seen, the time to
   catch up after it, and its slope over the last half of the processor's run (lag that grows
   without bound has a slope of a few percent of the rate records are written, or more); the
   processor's transfers per second beside ours' (2), which ran with no read model.
4. the faust-streaming peer (`benchmarks.faust_peer`), on its own topics and a smaller sample
   with the same accounts-to-transfers ratio, since it runs near a thousand transfers a second.

Each stage's window runs from its first consumed record (the processor's "assigned partitions"
log line, the faust agent's first-record marker, the copy loop's first batch) to its last
outcome, so process start-up and the consumer group join are left out of every figure alike.
Every saga stage is checked the same way: every transfer exactly one outcome, the expected one;
and for the stages that write the project's events (ours, the Kafka Streams peer, the saga
ceiling) the events topic read whole (`benchmarks.ledger_check`): sequences gap-free, balances
chained, money conserved, events in the project's format. Each stage's `checks_ok` says so.
Messages count what a stage reads and writes: a copied record is 1 consumed + 1 produced; a
successful transfer through the processor is 2 commands consumed + 2 events + 1 leg + 1
outcome produced (see MESSAGES_OURS and MESSAGES_FAUST for every kind of outcome), less the legs
a transfer between two accounts of one partition never writes nor reads (MESSAGES_SETTLED_IN_PLACE).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pstats
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import ConfigResource, NewTopic
from tqdm import tqdm

from benchmarks import kafka_streams_peer, saga_ceiling
from benchmarks.ledger_check import check_ledger
from benchmarks.support.local_broker import broker_for
from consumers.readmodel.consumer import end_offsets, read_lag
from consumers.readmodel.store import POSTGRES_PREFIXES, ReadModelStore, describe_db_url
from infra import native
from infra.admin import BrokerUnavailableError, TopicProvisioningError, admin_client, ensure_topics
from infra.kafka_clients import kafka_security
from infra.produce import QueueFullTimeout, produce_with_room
from infra.settings import PROJECT_ROOT, Settings, wallet_argv
from infra.supervision import Supervised, SupervisionError
from producers.client import local_command
from schemas.codec import SchemaError, decode_outcome, encode
from schemas.commands import CaptureHold, Deposit, OpenAccount, PlaceHold, Transfer
from schemas.outcomes import Reason
from schemas.partitioning import KAFKA_PARTITIONER, partition_for
from streams.runtime.processor import ProcessorConfig

TRANSFERS_DEFAULT = 1_000_000
HOLDS_DEFAULT = 100_000
# Long enough that no hold of a run expires before its capture is decided.
BENCH_HOLD_EXPIRY_MS = 3_600_000
FAUST_TRANSFERS_DEFAULT = 10_000
ACCOUNTS_DEFAULT = 10_000
PARTITIONS_DEFAULT = 8
LATENCY_SECONDS_DEFAULT = 10.0
# The offered loads of the latency phases, as shares of the measured maximum.
LATENCY_LOAD_SHARES = (0.5, 0.8)

CURRENCY = "USD"
# Far more than any run moves out of an account, so an ordinary transfer never fails...
FUNDING_AMOUNT = "1000000000.00"
TRANSFER_AMOUNT_MINOR_MAX = 10_000
# ... and more than any balance can reach, so these always fail for insufficient funds.
UNAFFORDABLE_AMOUNT = "9000000000000.00"
INSUFFICIENT_FUNDS_SHARE = 0.02
MISSING_RECEIVER_SHARE = 0.02
MISSING_ACCOUNT_PREFIX = "nobody"

SUCCESS = "success"
# Transaction id prefixes: what an outcome answers.
OPEN, FUND, TRANSFER, LATENCY, HEARTBEAT = "open", "fund", "t", "lat", "beat"
HOLD_PLACE, HOLD_CAPTURE = "hp", "hc"
SETUP_KINDS = (OPEN, FUND)

# Records read + written per decided command, by the stage's outcome. The processor writes a
# decision event even for a refusal; faust writes nothing but the outcome then.
MESSAGES_OURS = {"setup": 3, SUCCESS: 6, Reason.INSUFFICIENT_FUNDS: 3, Reason.ACCOUNT_NOT_FOUND: 9}
MESSAGES_FAUST = {"setup": 3, SUCCESS: 6, Reason.INSUFFICIENT_FUNDS: 2, Reason.ACCOUNT_NOT_FOUND: 8}
# Fewer records when both accounts share a partition and its legs are decided in place
# (streams.core.admission): the credit leg written and read, and the refund leg too when refused.
MESSAGES_SETTLED_IN_PLACE = {SUCCESS: -2, Reason.INSUFFICIENT_FUNDS: 0, Reason.ACCOUNT_NOT_FOUND: -4}
# place (1 consumed, 1 event, 1 outcome) + capture (1 consumed, 1 event, 1 leg) + its credit leg
# (1 consumed, 1 event, 1 outcome)
MESSAGES_PER_CAPTURED_HOLD = 9

KAFKA_TIMEOUT_S = 30.0
# A stage that shows no new outcome for this long is stuck (start-up included): give up, say where.
STALL_TIMEOUT_S = 60.0
# The slowest stage we wait for: a run far below it is broken, not slow.
# Floors measured on a 2-core machine shared at a load average of 25, with room below.
STAGE_RATE_FLOOR_PER_S = {"ours": 500, "copy": 1_000, "ceiling": 250, "kafka_streams": 250, "faust": 20}
# Issue 14's set-up of the Kafka Streams peer.
KAFKA_STREAMS_THREADS = 2
KAFKA_STREAMS_COMMIT_INTERVAL_MS = 1_000
# The JVM's start, the group join and RocksDB's opening come before its first record.
KAFKA_STREAMS_STALL_TIMEOUT_S = 120.0
STAGE_TIMEOUT_FLOOR_S = 60.0
LATENCY_DRAIN_TIMEOUT_S = 30.0
CHILD_STOP_TIMEOUT_S = 20.0
# faust's exactly-once shutdown can fail ("Not in the middle of a transaction") and then hang.
FAUST_STOP_TIMEOUT_S = 5.0
PRODUCE_QUEUE_FULL_WAIT_MS = 30_000
OUTCOME_BATCH_SIZE_MAX = 10_000
LATENCY_TICK_S = 0.002
LATENCY_POLL_WAIT_S = 0.005
# faust's exactly-once puts a record sent to partition N into the transaction of partition N's
# producer, which commits only when partition N next commits consumed offsets: a saga leg sent
# to a partition with nothing more to read stays invisible to read_committed readers, and the
# end of a finite input never completes. A heartbeat command on every partition keeps each one
# consuming, as a live stream would; it is a few records a second beside thousands.
FAUST_HEARTBEAT_INTERVAL_S = 0.5
LOG_TAIL_LINES = 30
PROFILE_TOP_ENTRIES = 25
# Between progress redraws; a log file (stderr not a terminal) gets a line per redraw, so fewer there.
PROGRESS_MIN_INTERVAL_S = 0.5
PROGRESS_MIN_INTERVAL_S_NOT_TTY = 5.0

PROCESSOR_READY_MARKER = "assigned partitions"  # logged once restored, right before the first consume
READMODEL_READY_MARKER = "into"  # "shard I/N: reading ... into <db> from ... stored offsets", before its first read
READMODEL_SHARDS_DEFAULT = (1, 2)
MACHINE_PROCESSORS_DEFAULT = 2  # the machine's cores: the broker and the processes share them
READMODEL_LAG_SAMPLE_INTERVAL_S = 1.0
READMODEL_CATCH_UP_POLL_S = 0.2
READMODEL_CATCH_UP_TIMEOUT_FLOOR_S = 60.0
READMODEL_RATE_FLOOR_PER_S = 500  # records; bounds the catch-up wait
# A slope over the last half of the run above this share of the rate records are written: the
# read model falls further behind for as long as the processors run.
READMODEL_LAG_GROWTH_SHARE = 0.02


class BenchError(RuntimeError):
    """A stage failed or timed out; the message says which and where its log is."""


# Records of one stream of the input, and the topics each of them goes to.
InputStream = tuple[tuple[str, ...], Iterator[tuple[str, bytes]]]


# -- input -------------------------------------------------------------------------------------


def _account(index: int) -> str:
    return f"a{index}"


def setup_records(accounts: int, ts_ms: int) -> Iterator[tuple[str, bytes]]:
    """Open and fund every account: (key, value) records for the commands topic."""
    for index in range(accounts):
        account_id = _account(index)
        yield (
            account_id,
            encode(
                local_command(OpenAccount, transaction_id=f"{OPEN}-{index}", account_id=account_id, currency=CURRENCY)
            ),
        )
        yield (
            account_id,
            encode(
                local_command(
                    Deposit,
                    transaction_id=f"{FUND}-{index}",
                    account_id=account_id,
                    amount=FUNDING_AMOUNT,
                    currency=CURRENCY,
                )
            ),
        )


def transfer_records(
    accounts: int,
    count: int,
    seed: int,
    kind: str,
    expected: Counter,
    ts_ms: int | None = None,
    *,
    in_place: Counter | None = None,
    partitions: int = 0,
) -> Generator[tuple[str, bytes]]:
    """`count` transfers among the accounts; adds the certain outcome of each one made to
    `expected` once it is exhausted or closed, and to `in_place` that of each one whose two
    accounts share one of `partitions`.

    `ts_ms` None stamps each command with the wall clock when it is made (for live load).
    Written for speed (a million of these are made while the clock runs): names and amounts
    are drawn from lists made once, and every draw is one call of random().
    """
    draw = random.Random(seed).random
    names = [_account(index) for index in range(accounts)]
    amounts = [f"{minor // 100}.{minor % 100:02d}" for minor in range(1, TRANSFER_AMOUNT_MINOR_MAX)]
    amount_count = len(amounts)
    insufficient_below = INSUFFICIENT_FUNDS_SHARE
    missing_below = INSUFFICIENT_FUNDS_SHARE + MISSING_RECEIVER_SHARE
    results: Counter[str] = Counter()
    local_results: Counter[str] = Counter()
    partition_of: dict[str, int] = {}
    if in_place is not None:
        missing = [f"{MISSING_ACCOUNT_PREFIX}{index}" for index in range(accounts)]
        partition_of = {name: partition_for(name, partitions) for name in names + missing}
    try:
        for index in range(count):
            sender = int(draw() * accounts)
            receiver = int(draw() * (accounts - 1))
            receiver += receiver >= sender  # never the sender itself
            amount = amounts[int(draw() * amount_count)]
            to_account = names[receiver]
            share = draw()
            if share < insufficient_below:
                amount, result = UNAFFORDABLE_AMOUNT, Reason.INSUFFICIENT_FUNDS
            elif share < missing_below:
                to_account, result = f"{MISSING_ACCOUNT_PREFIX}{receiver}", Reason.ACCOUNT_NOT_FOUND
            else:
                result = SUCCESS
            results[result] += 1
            from_account = names[sender]
            if partition_of and partition_of[from_account] == partition_of[to_account]:
                local_results[result] += 1
            yield (
                from_account,
                encode(
                    local_command(
                        Transfer,
                        transaction_id=f"{kind}-{index}",
                        from_account=from_account,
                        to_account=to_account,
                        amount=amount,
                        currency=CURRENCY,
                    )
                ),
            )
    finally:
        expected.update(results)
        if in_place is not None:
            in_place.update(local_results)


def hold_records(accounts: int, count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """`count` holds among the accounts, each placed and then captured by its payer: odd ones
    whole (no amount), even ones half, with `final` releasing the rest. Every one succeeds (the
    accounts are funded far beyond any run), so each place and capture must answer `success`."""
    draw = random.Random(seed).random
    names = [_account(index) for index in range(accounts)]
    for index in range(count):
        payer = int(draw() * accounts)
        payee = int(draw() * (accounts - 1))
        payee += payee >= payer
        amount_minor = 2 + int(draw() * (TRANSFER_AMOUNT_MINOR_MAX - 2))
        account_id, hold_id = names[payer], f"{HOLD_PLACE}-{index}"
        yield (
            account_id,
            encode(
                local_command(
                    PlaceHold,
                    transaction_id=hold_id,
                    account_id=account_id,
                    to_account=names[payee],
                    amount=f"{amount_minor // 100}.{amount_minor % 100:02d}",
                    currency=CURRENCY,
                    expires_in_ms=BENCH_HOLD_EXPIRY_MS,
                )
            ),
        )
        part_minor = amount_minor // 2
        yield (
            account_id,
            encode(
                local_command(
                    CaptureHold,
                    transaction_id=f"{HOLD_CAPTURE}-{index}",
                    account_id=account_id,
                    hold_id=hold_id,
                    amount=None if index % 2 else f"{part_minor // 100}.{part_minor % 100:02d}",
                )
            ),
        )


def _input_producer_config(bootstrap: str, linger_ms: int, on_failure) -> dict:
    return {
        **kafka_security("api"),
        "bootstrap.servers": bootstrap,
        "partitioner": KAFKA_PARTITIONER,
        "enable.idempotence": True,  # per-partition order: an account's opening precedes its transfers
        "linger.ms": linger_ms,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        # One Python callback per record would cost more than producing it: only failures call back.
        "delivery.report.only.error": True,
        "on_delivery": on_failure,
    }


class _InputProducer:
    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        self.failures: list[str] = []
        self._bootstrap = bootstrap
        self._producer = Producer(_input_producer_config(bootstrap, linger_ms, self._on_failure))
        self.produced = 0

    def _on_failure(self, error, message) -> None:
        if error is not None and len(self.failures) < LOG_TAIL_LINES:
            self.failures.append(f"{message.topic()}: {error}")

    def produce(self, topic: str, key: str, value: bytes) -> None:
        try:
            produce_with_room(self._producer, topic, value, key, queue_full_wait_ms=PRODUCE_QUEUE_FULL_WAIT_MS)
        except QueueFullTimeout as error:
            raise BenchError(f"{error} (broker {self._bootstrap})") from None
        self.produced += 1

    def poll(self) -> None:
        self._producer.poll(0)

    def flush(self) -> None:
        remaining = self._producer.flush(KAFKA_TIMEOUT_S)
        if remaining:
            raise BenchError(f"{remaining} input records were still undelivered after {KAFKA_TIMEOUT_S:.0f} s")
        if self.failures:
            raise BenchError("input records were refused by the broker:\n  " + "\n  ".join(self.failures))


class _Heartbeat:
    """Opens (and then re-opens, refused as existing) one account per partition every interval."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._producer = _InputProducer(bootstrap, linger_ms=1)
        self._topic = topic
        self._accounts: dict[int, str] = {}
        candidate = 0
        while len(self._accounts) < partitions:
            self._accounts.setdefault(partition_for(f"{HEARTBEAT}{candidate}", partitions), f"{HEARTBEAT}{candidate}")
            candidate += 1
        self._next_s = 0.0
        self._sent = 0

    def tick(self) -> None:
        now_s = time.monotonic()
        if now_s < self._next_s:
            return
        self._next_s = now_s + FAUST_HEARTBEAT_INTERVAL_S
        for account_id in self._accounts.values():
            self._producer.produce(
                self._topic,
                account_id,
                encode(
                    local_command(
                        OpenAccount,
                        transaction_id=f"{HEARTBEAT}-{self._sent}",
                        account_id=account_id,
                        currency=CURRENCY,
                    )
                ),
            )
            self._sent += 1
        self._producer.poll()

    def close(self) -> None:
        self._producer.flush()


# -- outcomes ----------------------------------------------------------------------------------


class OutcomeTally:
    """Reads an outcomes topic from the start, read_committed, and keeps each transaction's
    first final outcome: `results[transaction id]` is "success" or the failure reason."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, group_id: str) -> None:
        self._consumer = Consumer(
            {
                **kafka_security("api"),
                "bootstrap.servers": bootstrap,
                "group.id": group_id,  # never joined nor committed: partitions are assigned
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        self._consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in range(partitions)])
        self.topic = topic
        self.results: dict[str, str | None] = {}
        self.per_kind: Counter = Counter()
        self.by_kind_result: Counter = Counter()
        # A transaction with two different answers (not a duplicate_conflict answering another request).
        self.contradictions: list[str] = []
        # A transaction answered again with the same result.
        self.repeats: list[str] = []

    def poll(self, timeout_s: float) -> list[str]:
        """Consumes what is there (waiting up to timeout_s); returns the newly decided transaction ids."""
        decided = []
        for record in self._consumer.consume(OUTCOME_BATCH_SIZE_MAX, timeout_s):
            error = record.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            value = record.value()
            assert value is not None  # a record without an error carries a value
            try:
                outcome = decode_outcome(value)
            except SchemaError as schema_error:
                raise BenchError(f"{self.topic} holds an invalid outcome: {schema_error}") from None
            transaction_id = outcome.transaction_id
            result = SUCCESS if outcome.status == SUCCESS else outcome.reason
            previous = self.results.get(transaction_id)
            if previous is None:
                self.results[transaction_id] = result
                kind = transaction_id.partition("-")[0]
                self.per_kind[kind] += 1
                self.by_kind_result[kind, result] += 1
                decided.append(transaction_id)
            elif previous != result and result != Reason.DUPLICATE_CONFLICT:
                self.contradictions.append(f"{transaction_id}: {previous} then {result}")
            elif not transaction_id.startswith(HEARTBEAT):
                self.repeats.append(transaction_id)
        return decided

    def results_of(self, kind: str) -> Counter:
        return Counter({result: count for (k, result), count in self.by_kind_result.items() if k == kind})

    def close(self) -> None:
        self._consumer.close()


# -- child processes ---------------------------------------------------------------------------


class Child:
    """A process this run started (through `infra.supervision`): its output goes to a log file,
    read by a thread that notes when `marker` first appears and keeps the last JSON line (the
    copy loop's reports)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, marker: str | None) -> None:
        self.name = name
        self.log_path = log_path
        self.marker = marker
        self.marker_s: float | None = None
        self.last_json: dict | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        # The kernel stops the child if this process dies, even by SIGKILL: no orphan keeps running.
        self.process = Supervised.start(
            name,
            argv,
            log_path=None,
            cwd=PROJECT_ROOT,
            own_session=True,
            stop_with_parent=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.started_s = self.process.started_s
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log_path.open("w", encoding="utf-8", errors="replace") as log:
            for raw_line in self.process.stdout:
                line = raw_line.decode("utf-8", errors="replace")
                log.write(line)
                log.flush()
                self._tail.append(line.rstrip())
                if self.marker_s is None and self.marker is not None and self.marker in line:
                    self.marker_s = time.monotonic()
                if line.startswith("{"):
                    try:
                        self.last_json = json.loads(line)
                    except ValueError:
                        pass

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        return self.process.poll()

    def failure(self, what: str) -> BenchError:
        tail = "\n    ".join(self._tail) or "(no output)"
        return BenchError(f"{what}\n  {self.name} (pid {self.pid}) log {self.log_path}, last lines:\n    {tail}")

    def wait(self, timeout_s: float) -> int:
        if not self.process.wait(timeout_s):
            raise self.failure(f"{self.name} did not finish within {timeout_s:.0f} s")
        self._reader.join(KAFKA_TIMEOUT_S)
        code = self.process.poll()
        assert code is not None, f"{self.name} exited without an exit code"
        return code

    def stop(self, timeout_s: float = CHILD_STOP_TIMEOUT_S) -> bool:
        """SIGTERM, then SIGKILL after timeout_s; returns whether it stopped by itself."""
        graceful = self.process.stop(timeout_s)
        self._reader.join(KAFKA_TIMEOUT_S)
        return graceful


def _failure_of(children: list[Child], what: str) -> BenchError:
    """`what` went wrong with the processes `children`: the first one's log tail, the others' logs named."""
    error = children[0].failure(what)
    if len(children) == 1:
        return error
    return BenchError(f"{error}\n  the other logs: {', '.join(str(child.log_path) for child in children[1:])}")


# -- results -----------------------------------------------------------------------------------


@dataclass
class StageResult:
    transfers: int
    messages: int
    elapsed_s: float
    window_start: str
    outcomes: dict = field(default_factory=dict)
    # What the stage's checks found wrong (outcomes, ledger); None: the stage has no checks.
    problems: list[str] | None = None
    ledger: dict | None = None

    @property
    def transfers_per_s(self) -> float:
        return self.transfers / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self, ceiling_messages_per_s: float | None) -> dict:
        data = {
            "transfers": self.transfers,
            "messages": self.messages,
            "elapsed_s": round(self.elapsed_s, 3),
            "transfers_per_s": round(self.transfers_per_s, 1),
            "messages_per_s": round(self.messages_per_s, 1),
            "window_start": self.window_start,
            "outcomes": self.outcomes,
        }
        if self.problems is not None:
            data["checks_ok"] = not self.problems
            data["problems"] = self.problems
        if self.ledger is not None:
            data["ledger"] = self.ledger
        if ceiling_messages_per_s:
            data["messages_ratio_to_ceiling"] = round(self.messages_per_s / ceiling_messages_per_s, 4)
        return data


@dataclass
class LatencyResult:
    load_share: float
    offered_transfers_per_s: float
    achieved_transfers_per_s: float
    seconds: float
    sent: int
    answered: int
    percentiles_ms: dict[str, float]

    def as_dict(self) -> dict:
        return {
            "load_share": self.load_share,
            "offered_transfers_per_s": round(self.offered_transfers_per_s, 1),
            "achieved_transfers_per_s": round(self.achieved_transfers_per_s, 1),
            "seconds": self.seconds,
            "sent": self.sent,
            "answered": self.answered,
            **{f"{name}_ms": round(value, 2) for name, value in self.percentiles_ms.items()},
        }


def lag_slope_per_s(samples: list[tuple[float, int]]) -> float | None:
    """The least-squares slope of lag over time, records per second; None under two samples."""
    if len(samples) < 2:
        return None
    mean_s = sum(at_s for at_s, _ in samples) / len(samples)
    mean_lag = sum(lag for _, lag in samples) / len(samples)
    spread = sum((at_s - mean_s) ** 2 for at_s, _ in samples)
    if spread == 0:
        return None
    return sum((at_s - mean_s) * (lag - mean_lag) for at_s, lag in samples) / spread


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(share * len(sorted_values)) - 1)]


# -- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    transfers: int
    accounts: int
    partitions: int
    faust_transfers: int
    faust_guarantees: tuple[str, ...]
    latency_seconds: float
    batch_size_max: int
    commit_interval_ms: int
    seed: int
    profile_processor: Path | None
    keep_topics: bool
    kafka_streams: bool = True
    holds: int = HOLDS_DEFAULT  # 0: no hold stage
    metrics_port: int | None = None  # the processor serves its Prometheus metrics there (watch a run)
    readmodel_db: str | None = None  # PostgreSQL: the read-model lag stage (2c) runs
    readmodel_shards: tuple[int, ...] = READMODEL_SHARDS_DEFAULT
    machine_processors: int = MACHINE_PROCESSORS_DEFAULT  # stage 2d's processes; 0: no such stage

    @property
    def faust_accounts(self) -> int:
        """The faust sample keeps the main run's accounts-to-transfers ratio."""
        scaled = round(self.accounts * self.faust_transfers / self.transfers)
        return max(2, min(self.accounts, scaled))


class Bench:
    def __init__(self, base: Settings, options: BenchOptions) -> None:
        self.options = options
        self.report: dict = {}
        self.prefix = f"{base.topic_prefix}bench-{uuid.uuid4().hex[:8]}."
        self.settings = base.with_overrides(topic_prefix=self.prefix, partitions=options.partitions)
        self.bootstrap = self.settings.bootstrap
        self.copy_topic = f"{self.prefix}bench.copy"
        self.ceiling_topics = {
            name: f"{self.prefix}{topic}"
            for name, topic in (
                ("commands", saga_ceiling.COMMANDS_TOPIC),
                ("events", saga_ceiling.EVENTS_TOPIC),
                ("outcomes", saga_ceiling.OUTCOMES_TOPIC),
            )
        }
        self.kafka_streams_topics = (
            {
                name: f"{self.prefix}{topic}"
                for name, topic in (
                    ("commands", kafka_streams_peer.COMMANDS_TOPIC),
                    ("events", kafka_streams_peer.EVENTS_TOPIC),
                    ("outcomes", kafka_streams_peer.OUTCOMES_TOPIC),
                )
            }
            if options.kafka_streams
            else {}
        )
        # The peers sign their own legs with a key of this run; ours signs with the run folder's.
        self.peer_leg_key = f"bench:{secrets.token_hex(32)}"
        self.work_dir = Path(tempfile.mkdtemp(prefix="wallet-bench-"))
        self._children: list[Child] = []
        self._tallies: list[OutcomeTally] = []
        self.expected: Counter = Counter()
        self.expected_in_place: Counter = Counter()  # of `expected`, those of one partition's two accounts
        self.faust_expected: dict[str, Counter] = {guarantee: Counter() for guarantee in options.faust_guarantees}
        self.problems: list[str] = []

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def say(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    @staticmethod
    def _bar(total: int, desc: str, unit: str) -> tqdm:
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=True,
            file=sys.stderr,
            mininterval=PROGRESS_MIN_INTERVAL_S if sys.stderr.isatty() else PROGRESS_MIN_INTERVAL_S_NOT_TTY,
            dynamic_ncols=True,
            leave=False,
        )

    def _start(self, name: str, argv: list[str], marker: str | None) -> Child:
        child = Child(name, argv, self.work_dir / f"{name}.log", marker)
        self._children.append(child)
        return child

    def _tally(self, topic: str, name: str) -> OutcomeTally:
        tally = OutcomeTally(self.bootstrap, topic, self.options.partitions, f"{self.prefix}bench-{name}")
        self._tallies.append(tally)
        return tally

    @staticmethod
    def _stage_timeout_s(stage: str, records: int) -> float:
        return STAGE_TIMEOUT_FLOOR_S + records / STAGE_RATE_FLOOR_PER_S[stage]

    def _faust_prefix(self, guarantee: str) -> str:
        return f"{self.prefix}{guarantee.replace('_', '-')}."

    def _commands_topic_config(self) -> dict[str, str]:
        """The configuration ours' commands topic was created with (its record-time rule)."""
        admin = admin_client(self.bootstrap)
        resource = ConfigResource(ConfigResource.Type.TOPIC, self.settings.commands_topic)
        deadline_s = time.monotonic() + KAFKA_TIMEOUT_S
        while True:
            try:
                entries = admin.describe_configs([resource])[resource].result(timeout=KAFKA_TIMEOUT_S)
                break
            except KafkaException as error:
                # A topic created a moment ago may not be known yet to the broker that answers.
                if error.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART or time.monotonic() > deadline_s:
                    raise
                time.sleep(0.2)
        entry = entries.get("message.timestamp.type")
        return {"message.timestamp.type": entry.value} if entry is not None else {}

    def _create_extra_topics(self, names: list[str], config: dict[str, str] | None = None) -> None:
        if not names:
            return
        admin = admin_client(self.bootstrap)
        futures = admin.create_topics(
            [
                NewTopic(name, self.options.partitions, self.settings.replication_factor, config=config or {})
                for name in names
            ],
            operation_timeout=KAFKA_TIMEOUT_S,
            request_timeout=KAFKA_TIMEOUT_S,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=KAFKA_TIMEOUT_S)
            except KafkaException as error:
                raise BenchError(f"creating topic {name} failed: {error.args[0].str()}") from None

    # -- phases ----------------------------------------------------------------------------

    def prepare(self) -> dict:
        from benchmarks.faust_peer import CHANGELOG_TOPIC, COMMANDS_TOPIC, OUTCOMES_TOPIC

        options = self.options
        ensure_topics(self.settings, timeout_s=KAFKA_TIMEOUT_S)
        faust_topics = {
            guarantee: (
                f"{self._faust_prefix(guarantee)}{COMMANDS_TOPIC}",
                f"{self._faust_prefix(guarantee)}{OUTCOMES_TOPIC}",
            )
            for guarantee in options.faust_guarantees
        }
        # The saga stages' own commands topics get ours' record-time rule; they hold ours' input and their legs.
        saga_commands_topics = [
            topics["commands"] for topics in (self.ceiling_topics, self.kafka_streams_topics) if topics
        ]
        self._create_extra_topics(saga_commands_topics, self._commands_topic_config())
        # Each read-model stage's processor, and the whole-machine stage's processors, get the
        # project's topics under a prefix of their own.
        readmodel_settings = [self.readmodel_settings(count) for count in self.readmodel_shard_counts()]
        own_settings = readmodel_settings + ([self.machine_settings()] if options.machine_processors else [])
        for settings in own_settings:
            ensure_topics(settings, timeout_s=KAFKA_TIMEOUT_S)
        saga_output_topics = [
            name
            for topics in (self.ceiling_topics, self.kafka_streams_topics)
            for kind, name in topics.items()
            if kind != "commands"
        ]
        self._create_extra_topics(
            [self.copy_topic, *saga_output_topics, *(name for pair in faust_topics.values() for name in pair)]
        )
        self._create_extra_topics(
            [f"{self._faust_prefix(guarantee)}{CHANGELOG_TOPIC}" for guarantee in faust_topics],
            {"cleanup.policy": "compact"},
        )

        setup_count = 2 * options.accounts
        faust_count = (2 * options.faust_accounts + options.faust_transfers) * len(faust_topics)
        total = setup_count + options.transfers + faust_count
        self.say(
            f"[0] producing the input: {setup_count:,} account commands and {options.transfers:,} transfers"
            + (f", and {faust_count:,} commands for the faust peer" if faust_topics else "")
        )
        ts_ms = time.time_ns() // 1_000_000
        # The main input goes, record for record, to ours' commands topic and to each saga stage's own.
        main_topics = (
            self.settings.commands_topic,
            *saga_commands_topics,
            *(settings.commands_topic for settings in own_settings),
        )
        total += (setup_count + options.transfers) * (len(main_topics) - 1)
        streams = self.main_input(main_topics, ts_ms)
        for guarantee, (commands_topic, _) in faust_topics.items():
            streams += [
                ((commands_topic,), setup_records(options.faust_accounts, ts_ms)),
                (
                    (commands_topic,),
                    transfer_records(
                        options.faust_accounts,
                        options.faust_transfers,
                        options.seed,
                        TRANSFER,
                        self.faust_expected[guarantee],
                        ts_ms,
                    ),
                ),
            ]
        elapsed_s = self.produce_input(streams, total)
        self._check_input_counts(
            {
                **{topic: setup_count + options.transfers for topic in main_topics},
                **{
                    commands: 2 * options.faust_accounts + options.faust_transfers
                    for commands, _ in faust_topics.values()
                },
            }
        )
        return {"records": total, "elapsed_s": round(elapsed_s, 3), "messages_per_s": round(total / elapsed_s, 1)}

    def main_input(self, topics: tuple[str, ...], ts_ms: int) -> list[InputStream]:
        """The main input for `topics`: every account opened and funded, then the transfers
        (their certain outcomes are added to `self.expected` once the last one is made)."""
        options = self.options
        return [
            (topics, setup_records(options.accounts, ts_ms)),
            (
                topics,
                transfer_records(
                    options.accounts,
                    options.transfers,
                    options.seed,
                    TRANSFER,
                    self.expected,
                    ts_ms,
                    in_place=self.expected_in_place,
                    partitions=options.partitions,
                ),
            ),
        ]

    def produce_input(self, streams: list[InputStream], total: int) -> float:
        """Produces every stream's records to each of its topics, progress shown against `total`;
        returns the seconds from the first record to the last one acknowledged."""
        producer = _InputProducer(self.bootstrap, linger_ms=50)
        started_s = time.monotonic()
        with self._bar(total, "input", "msg") as bar:
            for topics, records in streams:
                for key, value in records:
                    for topic in topics:
                        producer.produce(topic, key, value)
                        if producer.produced % 10_000 == 0:
                            producer.poll()
                            bar.update(10_000)
            producer.flush()
        return time.monotonic() - started_s

    def _check_input_counts(self, expected_counts: dict[str, int]) -> None:
        consumer = Consumer(
            {**kafka_security("admin"), "bootstrap.servers": self.bootstrap, "group.id": f"{self.prefix}bench-check"}
        )
        try:
            for topic, expected_count in expected_counts.items():
                stored = sum(
                    consumer.get_watermark_offsets(TopicPartition(topic, partition), KAFKA_TIMEOUT_S)[1]
                    for partition in range(self.options.partitions)
                )
                if stored != expected_count:
                    raise BenchError(f"{topic} holds {stored} records after producing {expected_count}")
        finally:
            consumer.close()

    def raw_ceiling(self) -> StageResult:
        options = self.options
        records = 2 * options.accounts + options.transfers
        self.say(
            f"[1] copy loop: copying {records:,} records of {self.settings.commands_topic} with a transactional "
            f"consume-and-copy loop"
        )
        timeout_s = self._stage_timeout_s("copy", records)
        child = self._start(
            "copy",
            [
                sys.executable,
                "-m",
                "benchmarks.raw_ceiling",
                "--bootstrap",
                self.bootstrap,
                "--input-topic",
                self.settings.commands_topic,
                "--output-topic",
                self.copy_topic,
                "--group-id",
                f"{self.prefix}bench-copy",
                "--batch-size-max",
                str(options.batch_size_max),
                "--commit-interval-ms",
                str(options.commit_interval_ms),
                "--timeout-s",
                str(timeout_s),
            ],
            marker=None,
        )
        with self._bar(records, "copy", "rec") as bar:
            while child.exited() is None:
                time.sleep(0.2)
                if time.monotonic() - child.started_s > timeout_s + KAFKA_TIMEOUT_S:
                    raise child.failure(f"the copy loop did not finish within {timeout_s:.0f} s")
                copied = (child.last_json or {}).get("copied", 0)
                bar.update(copied - bar.n)
        code = child.wait(KAFKA_TIMEOUT_S)
        report = child.last_json or {}
        if code != 0 or "records" not in report:
            raise child.failure(f"the copy loop failed (exit code {code}): {report.get('error', 'no report')}")
        if report["records"] != records:
            self.problems.append(f"the copy loop copied {report['records']} records, the input has {records}")
        return StageResult(
            0,
            report["messages"],
            report["elapsed_s"],
            "first consumed batch",
            {"records": report["records"], "transactions": report["transactions"]},
        )

    def saga_ceiling(self) -> StageResult:
        """The same saga as a bare transactional loop, no validation, dict state: the ceiling."""
        options = self.options
        topics = self.ceiling_topics
        self.say(
            f"[1b] saga ceiling: the saga as a bare transactional loop on {options.transfers:,} transfers after "
            f"{2 * options.accounts:,} account commands"
        )
        tally = self._tally(topics["outcomes"], "ceiling")
        child = self._start(
            "ceiling",
            [
                sys.executable,
                "-m",
                "benchmarks.saga_ceiling",
                "--bootstrap",
                self.bootstrap,
                "--commands-topic",
                topics["commands"],
                "--events-topic",
                topics["events"],
                "--outcomes-topic",
                topics["outcomes"],
                "--group-id",
                f"{self.prefix}bench-ceiling",
                "--leg-key",
                self.peer_leg_key,
                "--batch-size-max",
                str(options.batch_size_max),
                "--commit-interval-ms",
                str(options.commit_interval_ms),
                "--partitions",
                str(options.partitions),
            ],
            marker=saga_ceiling.FIRST_RECORD_MARKER,
        )
        return self._saga_stage("ceiling", child, tally, topics["events"], "first record")

    def kafka_streams(self) -> StageResult:
        """The Kafka Streams peer on the same commands topic (built first, outside the window)."""
        options = self.options
        topics = self.kafka_streams_topics
        started_s = time.monotonic()
        kafka_streams_peer.build(self.settings.cache_dir, say=self.say)
        self.say(
            f"[1c] Kafka Streams peer (built in {time.monotonic() - started_s:.1f} s): {options.transfers:,} "
            f"transfers after {2 * options.accounts:,} account commands, exactly_once_v2, "
            f"{KAFKA_STREAMS_THREADS} threads, commit {KAFKA_STREAMS_COMMIT_INTERVAL_MS} ms"
        )
        tally = self._tally(topics["outcomes"], "kafka-streams")
        child = self._start(
            "kafka-streams",
            kafka_streams_peer.java_argv(
                bootstrap=self.bootstrap,
                application_id=f"{self.prefix}kstreams-peer",
                commands_topic=topics["commands"],
                events_topic=topics["events"],
                outcomes_topic=topics["outcomes"],
                state_dir=self.work_dir / "kafka-streams-state",
                leg_key=self.peer_leg_key,
                partitions=options.partitions,
                threads=KAFKA_STREAMS_THREADS,
                commit_interval_ms=KAFKA_STREAMS_COMMIT_INTERVAL_MS,
            ),
            marker=kafka_streams_peer.FIRST_RECORD_MARKER,
        )
        return self._saga_stage(
            "kafka_streams",
            child,
            tally,
            topics["events"],
            "first record",
            stall_timeout_s=KAFKA_STREAMS_STALL_TIMEOUT_S,
        )

    def _saga_stage(
        self,
        stage: str,
        child: Child,
        tally: OutcomeTally,
        events_topic: str,
        marker_meaning: str,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ) -> StageResult:
        """Waits for every transfer's outcome, stops the child, checks outcomes and ledger."""
        options = self.options
        timeout_s = self._stage_timeout_s(stage, 2 * options.accounts + 2 * options.transfers)
        try:
            end_s = self._await_outcomes(
                [child], tally, options.transfers, timeout_s, stage, stall_timeout_s=stall_timeout_s
            )
        finally:
            child.stop()
        window_start_s, window_start = self._window_start(child, marker_meaning)
        problems = self._check_results(stage, tally, options.accounts, self.expected)
        ledger = self._check_ledger(stage, events_topic)
        problems += ledger["problems"]
        return StageResult(
            options.transfers,
            self._messages(tally, options.accounts, MESSAGES_OURS, self.expected_in_place),
            end_s - window_start_s,
            window_start,
            dict(tally.results_of(TRANSFER)),
            problems,
            ledger,
        )

    def _check_ledger(self, stage: str, events_topic: str) -> dict:
        started_s = time.monotonic()
        ledger = check_ledger(
            self.bootstrap, events_topic, self.options.partitions, f"{self.prefix}bench-ledger-{stage}"
        ).as_dict()
        ledger["check_s"] = round(time.monotonic() - started_s, 1)
        self.problems += [f"{stage}: {problem}" for problem in ledger["problems"]]
        return ledger

    def start_processor(
        self,
        name: str = "processor",
        instance_id: str = "bench",
        store: str = "processor-store",
        metrics_port: int | None = None,
        extra_args: tuple[str, ...] = (),
        prefix: str | None = None,
    ) -> Child:
        """A `wallet processor` process of this run's group (of the topics under `prefix`, by default
        ours'); `store` is its RocksDB folder in the work folder."""
        options = self.options
        metrics_port = options.metrics_port if metrics_port is None else metrics_port
        profile = ["-m", "cProfile", "-o", str(options.profile_processor)] if options.profile_processor else []
        return self._start(
            name,
            [
                sys.executable,
                *profile,
                "-m",
                "wallet.cli",
                "--bootstrap",
                self.bootstrap,
                "--topic-prefix",
                prefix or self.prefix,
                "processor",
                "--instance-id",
                instance_id,
                "--store",
                str(self.work_dir / store),
                "--batch-size-max",
                str(options.batch_size_max),
                "--commit-interval-ms",
                str(options.commit_interval_ms),
                *(["--metrics-port", str(metrics_port)] if metrics_port is not None else []),
                *extra_args,
            ],
            marker=PROCESSOR_READY_MARKER,
        )

    def ours(self, processor: Child, tally: OutcomeTally) -> StageResult:
        options = self.options
        self.say(
            f"[2] ours: one wallet processor (pid {processor.pid}) on {options.transfers:,} transfers "
            f"after {2 * options.accounts:,} account commands"
        )
        timeout_s = self._stage_timeout_s("ours", 2 * options.accounts + 2 * options.transfers)
        end_s = self._await_outcomes([processor], tally, options.transfers, timeout_s, "ours")
        window_start_s, window_start = self._window_start(processor, "first consume after assignment")
        # Before the latency phase: with every transfer answered, the ledger is quiet.
        return self._processors_result("ours", tally, self.settings.events_topic, end_s - window_start_s, window_start)

    def _processors_result(
        self, stage: str, tally: OutcomeTally, events_topic: str, elapsed_s: float, window_start: str
    ) -> StageResult:
        """A stage of `wallet processor` processes on the saga input, checked: every transfer's
        outcome the expected one, and its events topic read whole."""
        options = self.options
        problems = self._check_results(stage, tally, options.accounts, self.expected)
        ledger = self._check_ledger(stage, events_topic)
        return StageResult(
            options.transfers,
            self._messages(tally, options.accounts, MESSAGES_OURS, self.expected_in_place),
            elapsed_s,
            window_start,
            dict(tally.results_of(TRANSFER)),
            problems + ledger["problems"],
            ledger,
        )

    def holds(self, tally: OutcomeTally) -> dict:
        """The hold stage (2b): the input produced while no processor runs, then a processor
        restarted on its snapshot until every capture is answered."""
        options = self.options
        count = options.holds
        self.say(
            f"[2b] holds: producing {count:,} holds, each placed and captured, then one wallet processor "
            f"restarted on its snapshot"
        )
        producer = _InputProducer(self.bootstrap, linger_ms=50)
        for key, value in hold_records(options.accounts, count, options.seed + 2):
            producer.produce(self.settings.commands_topic, key, value)
            if producer.produced % 10_000 == 0:
                producer.poll()
        producer.flush()
        processor = self.start_processor("processor-holds")
        timeout_s = self._stage_timeout_s("ours", 3 * count)
        end_s = self._await_outcomes([processor], tally, count, timeout_s, "holds", kind=HOLD_CAPTURE)
        window_start_s, window_start = self._window_start(processor, "first consume after assignment")
        tally.poll(0.5)  # a second answer would be arriving now
        problems = []
        for kind in (HOLD_PLACE, HOLD_CAPTURE):
            results = tally.results_of(kind)
            if results != Counter({SUCCESS: count}):
                problems.append(f"holds: {kind} outcomes {dict(results)}, expected {count:,} successes")
        if tally.contradictions or tally.repeats:
            problems.append(f"holds: answered twice or differently: {(tally.contradictions + tally.repeats)[:3]}")
        self.problems += problems
        ledger = self._check_ledger("holds", self.settings.events_topic)
        if not processor.stop():
            self.problems.append(f"the processor did not stop within {CHILD_STOP_TIMEOUT_S:.0f} s of SIGTERM")
        elapsed_s = end_s - window_start_s
        return {
            "holds": count,
            "elapsed_s": round(elapsed_s, 3),
            "holds_captured_per_s": round(count / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            "messages_per_s": round(count * MESSAGES_PER_CAPTURED_HOLD / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            "window_start": window_start,
            "outcomes": {kind: dict(tally.results_of(kind)) for kind in (HOLD_PLACE, HOLD_CAPTURE)},
            "checks_ok": not problems and not ledger["problems"],
            "problems": problems + ledger["problems"],
            "ledger": ledger,
        }

    def latency(self, processor: Child, tally: OutcomeTally, load_share: float, maximum_per_s: float) -> LatencyResult:
        options = self.options
        seconds = options.latency_seconds
        rate_per_s = maximum_per_s * load_share
        kind = f"{LATENCY}{round(load_share * 100)}"  # each phase's transaction ids its own
        self.say(
            f"[3] latency: offering {rate_per_s:,.0f} transfers/s ({load_share:.0%} of ours) for {seconds:g} s "
            f"to the running processor"
        )
        sent_s: list[float] = []
        answered_s: dict[int, float] = {}
        stop = threading.Event()
        errors: list[BaseException] = []

        def collect() -> None:
            try:
                while not stop.is_set():
                    # The batch consume returns only when full or after this wait, and every
                    # record it returns is stamped at its return: keep the wait small.
                    decided = tally.poll(LATENCY_POLL_WAIT_S)
                    now_s = time.monotonic()
                    for transaction_id in decided:
                        answered_kind, _, index = transaction_id.partition("-")
                        if answered_kind == kind:
                            answered_s[int(index)] = now_s
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        collector = threading.Thread(target=collect, name="latency-outcomes", daemon=True)
        collector.start()
        producer = _InputProducer(self.bootstrap, linger_ms=1)
        records = transfer_records(options.accounts, math.ceil(rate_per_s * seconds), options.seed + 1, kind, Counter())
        topic = self.settings.commands_topic
        try:
            with self._bar(int(rate_per_s * seconds), "latency", "tx") as bar:
                started_s = time.monotonic()
                while (elapsed_s := time.monotonic() - started_s) < seconds:
                    for _ in range(int(elapsed_s * rate_per_s) - len(sent_s)):
                        key, value = next(records)
                        sent_s.append(time.monotonic())
                        producer.produce(topic, key, value)
                    producer.poll()
                    bar.update(len(sent_s) - bar.n)
                    time.sleep(LATENCY_TICK_S)
                producer.flush()
                offered_s = time.monotonic() - started_s
            deadline_s = time.monotonic() + LATENCY_DRAIN_TIMEOUT_S
            while len(answered_s) < len(sent_s) and time.monotonic() < deadline_s and not errors:
                if processor.exited() is not None:
                    raise processor.failure(
                        f"the processor exited with code {processor.exited()} during the latency phase"
                    )
                time.sleep(0.05)
        finally:
            stop.set()
            collector.join(KAFKA_TIMEOUT_S)
        if errors:
            raise BenchError(f"reading outcomes during the latency phase failed: {errors[0]}")
        if len(answered_s) < len(sent_s):
            self.problems.append(
                f"latency: {len(sent_s) - len(answered_s)} of {len(sent_s)} transfers had no "
                f"outcome {LATENCY_DRAIN_TIMEOUT_S:.0f} s after the load stopped"
            )
        latencies_ms = sorted((seen_s - sent_s[index]) * 1000 for index, seen_s in answered_s.items())
        percentiles = (
            {
                name: percentile(latencies_ms, share)
                for name, share in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
            }
            if latencies_ms
            else {}
        )
        return LatencyResult(
            load_share, rate_per_s, len(sent_s) / offered_s, seconds, len(sent_s), len(answered_s), percentiles
        )

    def faust(self, guarantee: str) -> StageResult:
        from benchmarks.faust_peer import COMMANDS_TOPIC, FIRST_RECORD_MARKER, OUTCOMES_TOPIC

        options = self.options
        prefix = self._faust_prefix(guarantee)
        self.say(
            f"[4] faust peer ({guarantee}): {options.faust_transfers:,} transfers after "
            f"{2 * options.faust_accounts:,} account commands"
        )
        tally = self._tally(f"{prefix}{OUTCOMES_TOPIC}", f"faust-{guarantee}")
        worker = self._start(
            f"faust-{guarantee}",
            [
                sys.executable,
                "-m",
                "benchmarks.faust_peer",
                "--bootstrap",
                self.bootstrap,
                "--topic-prefix",
                prefix,
                "--guarantee",
                guarantee,
                "--partitions",
                str(options.partitions),
                "--data-dir",
                str(self.work_dir / f"faust-{guarantee}"),
                "worker",
                "--loglevel",
                "warn",
            ],
            marker=FIRST_RECORD_MARKER,
        )
        heartbeat = _Heartbeat(self.bootstrap, f"{prefix}{COMMANDS_TOPIC}", options.partitions)
        timeout_s = self._stage_timeout_s("faust", 2 * options.faust_accounts + 2 * options.faust_transfers)
        try:
            end_s = self._await_outcomes(
                [worker], tally, options.faust_transfers, timeout_s, f"faust {guarantee}", on_tick=heartbeat.tick
            )
        finally:
            heartbeat.close()
            # Its figures are taken by now, so a SIGKILL after a short grace period loses nothing.
            worker.stop(FAUST_STOP_TIMEOUT_S)
        window_start_s, window_start = self._window_start(worker, "first record")
        # faust writes no events (its table's changelog holds balances only): outcome checks only.
        problems = self._check_results(
            f"faust {guarantee}", tally, options.faust_accounts, self.faust_expected[guarantee]
        )
        return StageResult(
            options.faust_transfers,
            self._messages(tally, options.faust_accounts, MESSAGES_FAUST, Counter()),  # faust writes every leg
            end_s - window_start_s,
            window_start,
            dict(tally.results_of(TRANSFER)),
            problems,
        )

    # -- the whole machine (2d) -------------------------------------------------------------

    def machine_settings(self) -> Settings:
        return self.settings.with_overrides(topic_prefix=f"{self.prefix}machine.")

    def whole_machine(self, ours: StageResult, ceiling_messages_per_s: float) -> dict:
        """Stage 2d: `machine_processors` processes of one group on their own copy of the input."""
        options = self.options
        count = options.machine_processors
        settings = self.machine_settings()
        stage = f"machine x{count}"
        self.say(
            f"[2d] whole machine: {count} wallet processor processes of one group on {options.transfers:,} transfers"
        )
        tally = self._tally(settings.outcomes_topic, "outcomes-machine")
        processors = [
            self.start_processor(
                name=f"processor-machine-{index}",
                instance_id=f"bench-machine-{index}",
                store=f"processor-store-machine-{index}",
                prefix=settings.topic_prefix,
            )
            for index in range(count)
        ]
        timeout_s = self._stage_timeout_s("ours", 2 * options.accounts + 2 * options.transfers)
        try:
            end_s = self._await_outcomes(processors, tally, options.transfers, timeout_s, stage)
        finally:
            self._stop_children(stage, processors)
        # From the first process's first record: the others' joins (a rebalance) fall inside. A
        # process that never got a partition before the input ran out has no such record.
        assigned = [processor for processor in processors if processor.marker_s is not None]
        window_start_s, window_start = min(
            self._window_start(processor, f"first consume after assignment, of {processor.name}")
            for processor in assigned or processors
        )
        result = self._processors_result(stage, tally, settings.events_topic, end_s - window_start_s, window_start)
        return {
            "processors": count,
            **result.as_dict(ceiling_messages_per_s),
            "scaling_from_one": round(result.transfers_per_s / ours.transfers_per_s, 3),
        }

    def _stop_children(self, stage: str, children: list[Child]) -> None:
        """SIGTERMs each child; one still running after CHILD_STOP_TIMEOUT_S is a problem of the run."""
        for child in children:
            if not child.stop():
                self.problems.append(
                    f"{stage}: {child.name} did not stop within {CHILD_STOP_TIMEOUT_S:.0f} s of SIGTERM"
                )

    # -- the read model at the processor's full rate (2c) -----------------------------------

    def readmodel_shard_counts(self) -> tuple[int, ...]:
        return self.options.readmodel_shards if self.options.readmodel_db else ()

    def readmodel_settings(self, shard_count: int) -> Settings:
        return self.settings.with_overrides(topic_prefix=f"{self.prefix}rm{shard_count}.")

    def readmodel_lag(self, shard_count: int, ours_transfers_per_s: float) -> dict:
        """A processor on its own copy of the input with `shard_count` read-model shards reading
        its output at once, their lag sampled every second (see 2c in the module's docstring)."""
        options = self.options
        assert options.readmodel_db is not None, "the stage runs with a read-model database only"
        settings = self.readmodel_settings(shard_count)
        stage = f"readmodel x{shard_count}"
        self.say(
            f"[2c] read model: {shard_count} shard(s) into {describe_db_url(options.readmodel_db)} while one "
            f"wallet processor decides {options.transfers:,} transfers"
        )
        admin = admin_client(self.bootstrap, role="readmodel")
        with ReadModelStore(options.readmodel_db) as store:
            # Each stage's topics are new: so must the tables be (the read model refuses other topics' offsets).
            store.drop_schema()
            store.create_schema()
            shards = [
                self._start(
                    f"readmodel-{index}-of-{shard_count}",
                    wallet_argv(
                        settings, "readmodel", "--db", options.readmodel_db, "--shard", f"{index}/{shard_count}"
                    ),
                    marker=READMODEL_READY_MARKER,
                )
                for index in range(shard_count)
            ]
            self._await_markers(shards, STAGE_TIMEOUT_FLOOR_S, stage)
            tally = self._tally(settings.outcomes_topic, f"outcomes-rm{shard_count}")
            processor = self.start_processor(
                name=f"processor-rm{shard_count}",
                instance_id=f"bench-rm{shard_count}",
                store=f"processor-store-rm{shard_count}",
                prefix=settings.topic_prefix,
            )
            samples: list[tuple[float, int]] = []  # (monotonic s, lag in records)

            def sample() -> int:
                lag = sum(item.lag for item in read_lag(admin, settings, store.offsets(), KAFKA_TIMEOUT_S))
                samples.append((time.monotonic(), lag))
                return lag

            def sample_each_second() -> None:
                if processor.marker_s is not None and (
                    not samples or time.monotonic() - samples[-1][0] >= READMODEL_LAG_SAMPLE_INTERVAL_S
                ):
                    sample()

            timeout_s = self._stage_timeout_s("ours", 2 * options.accounts + 2 * options.transfers)
            end_s = self._await_outcomes(
                [processor, *shards], tally, options.transfers, timeout_s, stage, on_tick=sample_each_second
            )
            lag_at_end = sample()
            window_start_s, window_start = self._window_start(processor, "first consume after assignment")
            problems = self._check_results(stage, tally, options.accounts, self.expected)
            records = sum(end_offsets(admin, settings, KAFKA_TIMEOUT_S).values())
            catch_up_timeout_s = READMODEL_CATCH_UP_TIMEOUT_FLOOR_S + records / READMODEL_RATE_FLOOR_PER_S
            lag = lag_at_end
            while lag > 0:
                for shard in shards:
                    if shard.exited() is not None:
                        raise shard.failure(f"{stage}: {shard.name} exited with code {shard.exited()} at lag {lag:,}")
                if time.monotonic() - end_s > catch_up_timeout_s:
                    raise _failure_of(
                        shards,
                        f"{stage}: the read model had not caught up {catch_up_timeout_s:.0f} s after the "
                        f"processor's last outcome (lag {lag:,} records)",
                    )
                time.sleep(READMODEL_CATCH_UP_POLL_S)
                lag = sample()
            caught_up_s = samples[-1][0]
        self._stop_children(stage, [processor, *shards])
        window_s = end_s - window_start_s
        in_window = [(at_s - window_start_s, lag) for at_s, lag in samples if window_start_s <= at_s <= end_s]
        written_per_s = records / window_s
        slope = lag_slope_per_s([(at_s, lag) for at_s, lag in in_window if at_s >= window_s / 2])
        processor_transfers_per_s = options.transfers / window_s
        return {
            "shards": shard_count,
            "transfers": options.transfers,
            "window_start": window_start,
            "processor_s": round(window_s, 2),
            "processor_transfers_per_s": round(processor_transfers_per_s, 1),
            # Ours (stage 2) ran with no read model beside it: what sharing the cores costs the processor.
            "processor_transfers_per_s_without_readmodel": round(ours_transfers_per_s, 1),
            "processor_rate_share_of_without": round(processor_transfers_per_s / ours_transfers_per_s, 3),
            "records": records,
            "records_written_per_s": round(written_per_s, 1),
            "readmodel_records_per_s": round(records / (caught_up_s - window_start_s), 1),
            "max_lag_records": max(lag for _, lag in samples),
            "lag_at_processor_end_records": lag_at_end,
            "catch_up_s": round(caught_up_s - end_s, 2),
            "lag_slope_last_half_records_per_s": None if slope is None else round(slope, 1),
            "lag_grows": None if slope is None else slope > READMODEL_LAG_GROWTH_SHARE * written_per_s,
            "lag_samples": [[round(at_s, 2), lag] for at_s, lag in in_window],
            "checks_ok": not problems,
            "problems": problems,
            "load_average_1m": round(os.getloadavg()[0], 2),
            "cpu_count": os.cpu_count(),
        }

    def _await_markers(self, children: list[Child], timeout_s: float, stage: str) -> None:
        deadline_s = time.monotonic() + timeout_s
        for child in children:
            while child.marker_s is None:
                if child.exited() is not None:
                    raise child.failure(f"{stage}: {child.name} exited with code {child.exited()} while starting")
                if time.monotonic() > deadline_s:
                    raise child.failure(f"{stage}: {child.name} did not start within {timeout_s:.0f} s")
                time.sleep(0.05)

    # -- waiting and checking --------------------------------------------------------------

    def _await_outcomes(
        self,
        children: list[Child],
        tally: OutcomeTally,
        transfers: int,
        timeout_s: float,
        stage: str,
        on_tick=None,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        kind: str = TRANSFER,
    ) -> float:
        """Reads outcomes until `transfers` requests of `kind` (transfers, or the captures of the
        hold stage) have one; returns when the last was seen. Fails if any of `children` (the
        processes deciding them) exits first."""
        called_s = progress_s = time.monotonic()
        with self._bar(transfers, stage, "tx") as bar:
            while tally.per_kind[kind] < transfers:
                if on_tick is not None:
                    on_tick()
                tally.poll(0.1)
                if tally.per_kind[kind] > bar.n:  # progress is requests of `kind` decided, not any outcome
                    progress_s = time.monotonic()
                    bar.update(tally.per_kind[kind] - bar.n)
                now_s = time.monotonic()
                for child in children:
                    if child.exited() is not None:
                        raise child.failure(
                            f"{stage}: {child.name} exited with code {child.exited()} after "
                            f"{tally.per_kind[kind]:,} of {transfers:,} outcomes"
                        )
                # Start-up (a JVM's start, a restore from a large snapshot) has a bound of its own, the
                # stall timeout past the stage's; the stall clock and the stage's deadline run from the
                # last child's start (its marker: assigned, first record).
                started = [child.marker_s if child.marker is not None else child.started_s for child in children]
                started_s = [value for value in started if value is not None]
                if len(started_s) < len(children):
                    if now_s - called_s > timeout_s + stall_timeout_s:
                        raise _failure_of(children, f"{stage}: not started within {timeout_s + stall_timeout_s:.0f} s")
                    continue
                if now_s - max(progress_s, *started_s) > stall_timeout_s:
                    raise _failure_of(
                        children,
                        f"{stage}: no new outcome for {stall_timeout_s:.0f} s "
                        f"({tally.per_kind[kind]:,} of {transfers:,} decided)",
                    )
                if now_s > max(called_s, *started_s) + timeout_s:
                    raise _failure_of(
                        children,
                        f"{stage}: only {tally.per_kind[kind]:,} of {transfers:,} decided within {timeout_s:.0f} s",
                    )
            return time.monotonic()

    @staticmethod
    def _window_start(child: Child, marker_meaning: str) -> tuple[float, str]:
        if child.marker_s is not None:
            return child.marker_s, marker_meaning
        return child.started_s, f"process start ({child.marker!r} never appeared in its output)"

    def _check_results(self, stage: str, tally: OutcomeTally, accounts: int, expected: Counter) -> list[str]:
        """The stage's outcome problems, also added to the run's: every request one outcome, the expected one."""
        # The setup outcomes are all in long before the last transfer's: a short grace read suffices.
        deadline_s = time.monotonic() + KAFKA_TIMEOUT_S
        while sum(tally.per_kind[kind] for kind in SETUP_KINDS) < 2 * accounts and time.monotonic() < deadline_s:
            tally.poll(0.1)
        # Anything still arriving now is a second answer: read what is there.
        tally.poll(0.5)
        problems = []
        for kind in SETUP_KINDS:
            results = tally.results_of(kind)
            if results != Counter({SUCCESS: accounts}):
                problems.append(f"{stage}: {kind} outcomes {dict(results)}, expected {accounts} successes")
        results = tally.results_of(TRANSFER)
        if results != expected:
            problems.append(f"{stage}: transfer outcomes {dict(results)}, expected {dict(expected)}")
        if tally.contradictions:
            problems.append(
                f"{stage}: {len(tally.contradictions)} transactions with two different outcomes, "
                f"e.g. {tally.contradictions[:3]}"
            )
        if tally.repeats:
            # The bench sends no retries, so no request may be answered twice, even alike.
            problems.append(
                f"{stage}: {len(tally.repeats)} transactions answered more than once, e.g. {tally.repeats[:3]}"
            )
        self.problems += problems
        return problems

    @staticmethod
    def _messages(tally: OutcomeTally, accounts: int, costs: dict[str, int], in_place: Counter) -> int:
        """Records read and written; `in_place` counts, by outcome, the transfers whose legs never
        went through Kafka (their outcomes were checked to be the expected ones)."""
        transfer_results = tally.results_of(TRANSFER)
        unknown = set(transfer_results) - set(costs)
        if unknown:
            raise BenchError(f"no message count is known for outcomes {sorted(unknown)}")
        saved = sum(MESSAGES_SETTLED_IN_PLACE[result] * count for result, count in in_place.items())
        return (
            2 * accounts * costs["setup"]
            + sum(costs[result] * count for result, count in transfer_results.items())
            + saved
        )

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> dict:
        options = self.options
        run_started_s = time.monotonic()
        phase_wall_s: dict[str, float] = {}
        # Kept on the bench as it grows: a later stage that fails must not take the figures of
        # the stages that finished with it.
        report: dict = {
            "transfers": options.transfers,
            "accounts": options.accounts,
            "partitions": options.partitions,
            "bootstrap": self.bootstrap,
            "topic_prefix": self.prefix,
            "batch_size_max": options.batch_size_max,
            "commit_interval_ms": options.commit_interval_ms,
            # The processors this bench spawns run this interpreter, so they load what it loads.
            "core": native.core_description(),
            "phase_wall_s": phase_wall_s,
        }
        self.report = report

        def phase_done(name: str, started_s: float) -> float:
            now_s = time.monotonic()
            phase_wall_s[name] = round(now_s - started_s, 1)
            return now_s

        started_s = run_started_s
        report["input"] = self.prepare()
        started_s = phase_done("input", started_s)
        copy = self.raw_ceiling()
        started_s = phase_done("copy", started_s)
        # The peers and the ceiling run before ours: ours writes its legs into the commands topic.
        ceiling = self.saga_ceiling()
        ceiling_rate = ceiling.messages_per_s
        report["ceiling"] = ceiling.as_dict(ceiling_rate)
        report["copy"] = copy.as_dict(ceiling_rate)
        started_s = phase_done("ceiling", started_s)
        report["peers"] = {}
        skipped = self.kafka_streams_skipped()
        if skipped:
            self.say(f"[1c] Kafka Streams peer skipped: {skipped}")
            report["peers"]["kafka_streams"] = {"skipped": skipped}
        else:
            report["peers"]["kafka_streams"] = self.kafka_streams().as_dict(ceiling_rate)
            started_s = phase_done("kafka streams", started_s)

        tally = self._tally(self.settings.outcomes_topic, "outcomes")
        processor = self.start_processor()
        ours = self.ours(processor, tally)
        report["ours"] = ours.as_dict(ceiling_rate)
        started_s = phase_done("ours", started_s)
        if options.latency_seconds > 0:
            report["latency"] = [
                self.latency(processor, tally, share, ours.transfers_per_s).as_dict() for share in LATENCY_LOAD_SHARES
            ]
            started_s = phase_done("latency", started_s)
        if not processor.stop():
            self.problems.append(f"the processor did not stop within {CHILD_STOP_TIMEOUT_S:.0f} s of SIGTERM")
        started_s = phase_done("processor stop", started_s)
        if options.machine_processors:
            report["machine"] = self.whole_machine(ours, ceiling_rate)
            started_s = phase_done("whole machine", started_s)
        if options.holds:
            report["holds"] = self.holds(tally)
            started_s = phase_done("holds", started_s)
        if self.readmodel_shard_counts():
            assert options.readmodel_db is not None
            report["readmodel"] = {"db": describe_db_url(options.readmodel_db), "shards": {}}
            for shard_count in self.readmodel_shard_counts():
                report["readmodel"]["shards"][str(shard_count)] = self.readmodel_lag(shard_count, ours.transfers_per_s)
                started_s = phase_done(f"readmodel x{shard_count}", started_s)
        if options.profile_processor:
            report["profile"] = {
                "path": str(options.profile_processor),
                "top_by_tottime": profile_top(options.profile_processor),
            }

        report["faust"] = {}
        for guarantee in options.faust_guarantees:
            faust = self.faust(guarantee)
            report["faust"][guarantee] = {**faust.as_dict(ceiling_rate), "accounts": options.faust_accounts}
            report.setdefault("ours_over_faust", {})[guarantee] = round(ours.transfers_per_s / faust.transfers_per_s, 2)
            started_s = phase_done(f"faust {guarantee}", started_s)
        if report["faust"]:
            guarantee = "exactly_once" if "exactly_once" in report["faust"] else next(iter(report["faust"]))
            report["peers"]["faust"] = {**report["faust"][guarantee], "guarantee": guarantee}
        else:
            report["peers"]["faust"] = {"skipped": "--skip-faust"}
        add_ratios(report)
        report["problems"] = self.problems
        report["ok"] = not self.problems
        report["run_s"] = round(time.monotonic() - run_started_s, 1)
        return report

    def kafka_streams_skipped(self) -> str | None:
        """Why the Kafka Streams peer does not run, or None."""
        if not self.options.kafka_streams:
            return "--skip-kafka-streams"
        missing = kafka_streams_peer.missing_tools()
        if missing:
            return f"{', '.join(missing)} not on PATH"
        return None

    def cleanup(self, keep_work_dir: bool) -> None:
        for child in self._children:
            try:
                child.stop()
            except (OSError, SupervisionError) as error:
                self.say(f"stopping {child.name} (pid {child.pid}) failed: {error}")
        for tally in self._tallies:
            tally.close()
        if not self.options.keep_topics:
            self._delete_topics()
        if keep_work_dir:
            self.say(f"logs kept in {self.work_dir}")
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _delete_topics(self) -> None:
        admin = admin_client(self.bootstrap)
        try:
            names = [name for name in admin.list_topics(timeout=KAFKA_TIMEOUT_S).topics if name.startswith(self.prefix)]
            if names:
                for future in admin.delete_topics(
                    names, operation_timeout=KAFKA_TIMEOUT_S, request_timeout=KAFKA_TIMEOUT_S
                ).values():
                    future.result(timeout=KAFKA_TIMEOUT_S)
        except KafkaException as error:
            self.say(f"deleting the benchmark topics under {self.prefix!r} failed: {error}; delete them by hand")


def _saga_stages(report: dict) -> list[tuple[str, dict]]:
    """(name, stage) of every saga stage that ran: ours, the peers, the ceiling."""
    stages = [
        ("ours", report["ours"]),
        *([("machine", report["machine"])] if "machine" in report else []),
        *((f"peers.{name}", stage) for name, stage in report["peers"].items()),
        *((f"faust.{guarantee}", stage) for guarantee, stage in report.get("faust", {}).items()),
        ("ceiling", report["ceiling"]),
    ]
    return [(name, stage) for name, stage in stages if "transfers_per_s" in stage]


def add_ratios(report: dict) -> None:
    """Each saga stage's transfers/s as a share of the Kafka Streams peer's and of the ceiling's."""
    references = {
        "ratio_to_ceiling": report["ceiling"].get("transfers_per_s"),
        "ratio_to_kafka_streams": report["peers"].get("kafka_streams", {}).get("transfers_per_s"),
    }
    for _, stage in _saga_stages(report):
        for key, reference in references.items():
            if reference:
                stage[key] = round(stage["transfers_per_s"] / reference, 3)


def profile_top(path: Path, count: int = PROFILE_TOP_ENTRIES) -> list[dict]:
    stats = pstats.Stats(str(path), stream=io.StringIO())
    total_s = stats.total_tt  # type: ignore[attr-defined]  # undocumented, absent from typeshed's pstats
    rows = []
    for (filename, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]  # likewise
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({function})",
                "calls": calls,
                "tottime_s": round(tottime, 3),
                "tottime_share": round(tottime / total_s, 4) if total_s else 0.0,
                "cumtime_s": round(cumtime, 3),
            }
        )
    rows.sort(key=lambda row: row["tottime_s"], reverse=True)
    return rows[:count]


# -- output ------------------------------------------------------------------------------------


def _ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"  # faust's are hundredths


def format_report(report: dict) -> str:
    lines = [
        f"wallet bench: {report['transfers']:,} transfers among {report['accounts']:,} accounts, "
        f"{report['partitions']} partitions, broker {report['bootstrap']}, batch {report['batch_size_max']:,} / "
        f"{report['commit_interval_ms']} ms, core {report['core']}",
        f"input: {report['input']['records']:,} records produced in {report['input']['elapsed_s']:.1f} s "
        f"({report['input']['messages_per_s']:,.0f} msg/s)",
        "",
        f"{'stage':<34}{'transfers':>11}{'window':>10}{'transfers/s':>13}{'messages/s':>13}{'vs KStreams':>13}"
        f"{'vs ceiling':>12}{'checks':>8}",
    ]

    def row(name: str, stage: dict) -> str:
        if "skipped" in stage:
            return f"{name:<34}  skipped: {stage['skipped']}"
        transfers_per_s = f"{stage['transfers_per_s']:,.0f}" if stage["transfers"] else "-"
        transfers = f"{stage['transfers']:,}" if stage["transfers"] else "-"
        to_kafka_streams = _ratio_text(stage.get("ratio_to_kafka_streams"))
        to_ceiling = _ratio_text(stage.get("ratio_to_ceiling"))
        checks = "-" if "checks_ok" not in stage else ("ok" if stage["checks_ok"] else "FAILED")
        return (
            f"{name:<34}{transfers:>11}{stage['elapsed_s']:>9.1f}s{transfers_per_s:>13}"
            f"{stage['messages_per_s']:>13,.0f}{to_kafka_streams:>13}{to_ceiling:>12}{checks:>8}"
        )

    lines.append(row("wallet processor (ours)", report["ours"]))
    machine = report.get("machine")
    if machine:
        lines.append(row(f"{machine['processors']} wallet processors (machine)", machine))
    lines.append(row("Kafka Streams peer (Java, EOS v2)", report["peers"]["kafka_streams"]))
    for guarantee, stage in report["faust"].items():
        lines.append(row(f"faust-streaming ({guarantee})", stage))
    if not report["faust"]:
        lines.append(row("faust-streaming", report["peers"]["faust"]))
    lines.append(row("saga ceiling (bare Python loop)", report["ceiling"]))
    lines.append(row("copy loop (no decisions)", report["copy"]))
    if machine:
        lines.append(
            f"whole machine: {machine['processors']} processor processes of one group, "
            f"{machine['scaling_from_one']:.2f}x one process's transfers/s (window from the first one's first "
            "record: the others' joins inside)"
        )
    for guarantee, ratio in report.get("ours_over_faust", {}).items():
        lines.append(f"ours / faust ({guarantee}), transfers/s: {ratio:,.1f}x")
    holds = report.get("holds")
    if holds:
        lines += [
            "",
            f"holds (ours, same run): {holds['holds']:,} holds placed and captured in {holds['elapsed_s']:.1f} s: "
            f"{holds['holds_captured_per_s']:,.0f} holds captured/s ({holds['messages_per_s']:,.0f} messages/s), "
            f"beside {report['ours']['transfers_per_s']:,.0f} transfers/s; checks "
            + ("ok" if holds["checks_ok"] else "FAILED"),
        ]
    readmodel = report.get("readmodel")
    if readmodel:
        lines += [
            "",
            f"read model at the processor's full rate, into {readmodel['db']} (lag = committed events and outcomes "
            "not yet stored, sampled every second):",
            f"  {'shards':>6}{'processor t/s':>15}{'without':>10}{'written/s':>11}{'stored/s':>10}{'max lag':>10}"
            f"{'lag at end':>12}{'catch-up':>10}{'slope/s':>9}  grows",
        ]
        for count, stage in readmodel["shards"].items():
            slope = stage["lag_slope_last_half_records_per_s"]
            lines.append(
                f"  {count:>6}{stage['processor_transfers_per_s']:>15,.0f}"
                f"{stage['processor_transfers_per_s_without_readmodel']:>10,.0f}{stage['records_written_per_s']:>11,.0f}"
                f"{stage['readmodel_records_per_s']:>10,.0f}{stage['max_lag_records']:>10,}"
                f"{stage['lag_at_processor_end_records']:>12,}{stage['catch_up_s']:>9.1f}s"
                f"{'-' if slope is None else f'{slope:,.0f}':>9}  "
                + {None: "-", True: "YES", False: "no"}[stage["lag_grows"]]
                + f"  (load {stage['load_average_1m']:g})"
            )
    for latency in report.get("latency", []):
        lines += [
            "",
            f"latency, command produced -> outcome seen read_committed, at "
            f"{latency['offered_transfers_per_s']:,.0f} transfers/s offered "
            f"({latency['load_share']:.0%} of ours; {latency['achieved_transfers_per_s']:,.0f} achieved) "
            f"for {latency['seconds']:g} s, "
            f"{latency['answered']:,} of {latency['sent']:,} answered:",
        ]
        if "p50_ms" in latency:
            lines.append(
                f"  p50 {latency['p50_ms']:.1f} ms   p95 {latency['p95_ms']:.1f} ms   "
                f"p99 {latency['p99_ms']:.1f} ms   max {latency['max_ms']:.1f} ms"
            )
    if report.get("profile"):
        lines += [
            "",
            f"processor profile ({report['profile']['path']}; ours ran under cProfile, slower than "
            f"without), top by own time:",
        ]
        lines += [
            f"  {entry['tottime_s']:>8.2f} s {entry['tottime_share']:>6.1%} {entry['calls']:>10,}  {entry['function']}"
            for entry in report["profile"]["top_by_tottime"][:15]
        ]
    lines += [
        "",
        "messages = records consumed + records produced by the stage: copy loop 1 + 1 per record; a transfer through "
        "the processor 6 on success (2 commands consumed, 2 events, 1 leg, 1 outcome), 3 if refused for insufficient "
        "funds, 9 if refunded; a hold placed and captured 9 (3 commands consumed, 3 events, 1 leg, 2 outcomes); "
        "faust's 6 / 2 / 8 (its table changelog writes in place of events); opening or "
        "funding an account 3; the Kafka Streams peer and the saga ceiling write what ours writes, so theirs are "
        "counted alike. Windows run from the stage's first consumed record to its last outcome visible to a "
        "read_committed consumer (the copy loop: to its last commit). vs KStreams and vs ceiling are transfers/s "
        "ratios; the faust peer runs a smaller sample. checks: every transfer exactly one, expected, outcome; for "
        "ours, the Kafka Streams peer and the ceiling also their events read whole (sequences gap-free, balances "
        "chained, money conserved, the project's event format).",
        f"outcomes of ours: {report['ours']['outcomes']}",
        *(
            [
                f"faust: one heartbeat command per partition every {FAUST_HEARTBEAT_INTERVAL_S:g} s "
                "keeps its exactly-once "
                f"transactions committing; without it the last saga legs of a finite input are never committed."
            ]
            if report["faust"]
            else []
        ),
        f"run time {report['run_s']:.0f} s ("
        + ", ".join(f"{name} {seconds:g} s" for name, seconds in report["phase_wall_s"].items())
        + "); "
        + ("all checks passed" if report["ok"] else "PROBLEMS:"),
    ]
    lines += [f"  - {problem}" for problem in report["problems"]]
    return "\n".join(lines)


def _interrupt(*_signal_args) -> None:
    raise KeyboardInterrupt


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ProcessorConfig(instance_id="", store_path=Path())
    parser.add_argument(
        "--transfers",
        type=_positive_int,
        default=TRANSFERS_DEFAULT,
        help=f"transfers through the processor and the copy loop (default {TRANSFERS_DEFAULT:,})",
    )
    parser.add_argument(
        "--accounts",
        type=_positive_int,
        default=ACCOUNTS_DEFAULT,
        help=f"accounts the transfers move money among, at least 2 (default {ACCOUNTS_DEFAULT:,})",
    )
    parser.add_argument(
        "--partitions",
        type=_positive_int,
        default=PARTITIONS_DEFAULT,
        help=f"partitions of every benchmark topic (default {PARTITIONS_DEFAULT})",
    )
    parser.add_argument(
        "--holds",
        type=int,
        default=HOLDS_DEFAULT,
        help=f"holds placed and captured through the processor after its transfers, 0 skips them "
        f"(default {HOLDS_DEFAULT:,})",
    )
    parser.add_argument(
        "--faust-transfers",
        type=_positive_int,
        default=FAUST_TRANSFERS_DEFAULT,
        help=f"transfers for the faust-streaming peer, among accounts in the same ratio "
        f"(default {FAUST_TRANSFERS_DEFAULT:,})",
    )
    parser.add_argument(
        "--faust-guarantee",
        choices=("exactly_once", "at_least_once", "both"),
        default="exactly_once",
        help="processing guarantee of the faust peer (default exactly_once, like ours)",
    )
    parser.add_argument("--skip-faust", action="store_true", help="do not run the faust peer")
    parser.add_argument(
        "--skip-kafka-streams",
        action="store_true",
        help="do not build and run the Kafka Streams peer (skipped anyway without javac, mvn, java)",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=LATENCY_SECONDS_DEFAULT,
        help=f"how long to offer load for the latency percentiles; 0 skips them (default {LATENCY_SECONDS_DEFAULT:g})",
    )
    parser.add_argument(
        "--batch-size-max",
        type=_positive_int,
        default=defaults.batch_size_max,
        help=f"records per transaction of the processor and the copy loop (default {defaults.batch_size_max:,})",
    )
    parser.add_argument(
        "--commit-interval-ms",
        type=_positive_int,
        default=defaults.commit_interval_ms,
        help=f"longest wait for a batch to fill, both (default {defaults.commit_interval_ms})",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated transfers (default 1)")
    parser.add_argument(
        "--profile-processor",
        type=Path,
        metavar="FILE",
        help="run the processor under cProfile, write its stats to FILE and print the top entries",
    )
    parser.add_argument("--keep-topics", action="store_true", help="leave the benchmark topics for inspection")
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="the processor serves its Prometheus metrics on 127.0.0.1:PORT (default: not served)",
    )
    parser.add_argument(
        "--readmodel-db",
        metavar="URL",
        help="a PostgreSQL database (postgresql://user@host:port/db, required for the stage: the bench starts "
        "no server) for the read-model lag stage 2c; its read-model tables are dropped and created again "
        "(default: no such stage)",
    )
    parser.add_argument(
        "--readmodel-shards",
        type=_shard_counts,
        default=READMODEL_SHARDS_DEFAULT,
        metavar="N,M",
        help="with --readmodel-db: run stage 2c with N read-model shards, then with M... "
        f"(default {','.join(map(str, READMODEL_SHARDS_DEFAULT))})",
    )
    parser.add_argument(
        "--machine-processors",
        type=_machine_processors,
        default=MACHINE_PROCESSORS_DEFAULT,
        metavar="N",
        help="processor processes of one group for the whole-machine stage 2d, at least 2; 0 skips it "
        f"(default {MACHINE_PROCESSORS_DEFAULT})",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")


def _machine_processors(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count != 0 and count < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: want 0 (skip the stage) or at least 2 processes")
    return count


def _shard_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(item) for item in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want shard counts >= 1, for example 1,2")
    return counts


def run(args: argparse.Namespace) -> int:
    from infra.settings import settings_from_args

    if args.accounts < 2:
        print("wallet bench: --accounts must be at least 2", file=sys.stderr)
        return 2
    if args.readmodel_db is not None and not args.readmodel_db.startswith(POSTGRES_PREFIXES):
        print(f"wallet bench: --readmodel-db {args.readmodel_db}: want a postgresql:// URL", file=sys.stderr)
        return 2
    guarantees = (
        ()
        if args.skip_faust
        else (("exactly_once", "at_least_once") if args.faust_guarantee == "both" else (args.faust_guarantee,))
    )
    options = BenchOptions(
        transfers=args.transfers,
        accounts=args.accounts,
        partitions=args.partitions,
        faust_transfers=args.faust_transfers,
        faust_guarantees=guarantees,
        latency_seconds=args.latency_seconds,
        batch_size_max=args.batch_size_max,
        commit_interval_ms=args.commit_interval_ms,
        seed=args.seed,
        profile_processor=args.profile_processor.resolve() if args.profile_processor else None,
        keep_topics=args.keep_topics,
        kafka_streams=not args.skip_kafka_streams,
        holds=max(args.holds, 0),
        metrics_port=args.metrics_port,
        readmodel_db=args.readmodel_db,
        readmodel_shards=args.readmodel_shards,
        machine_processors=args.machine_processors,
    )
    from wallet.localkafka import LocalKafkaError

    try:
        with broker_for(settings_from_args(args), say=Bench.say) as settings:
            return _run_bench(Bench(settings, options), args)
    except LocalKafkaError as error:
        print(f"wallet bench: starting a local broker failed: {error}", file=sys.stderr)
        return 1


def _run_bench(bench: Bench, args: argparse.Namespace) -> int:
    failed = True
    interrupt_on_sigterm = threading.current_thread() is threading.main_thread()
    if interrupt_on_sigterm:
        # A SIGTERM must still stop the children and delete the topics, as Ctrl-C does.
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = bench.run()
        failed = not report["ok"]
    except (
        BenchError,
        BrokerUnavailableError,
        TopicProvisioningError,
        KafkaException,
        kafka_streams_peer.PeerBuildError,
    ) as error:
        print(f"wallet bench: {error}", file=sys.stderr)
        if any(isinstance(value, dict) and value for value in bench.report.values()):
            print(
                f"figures of the stages that finished before it:\n{json.dumps(bench.report, indent=1)}", file=sys.stderr
            )
        return 1
    finally:
        bench.cleanup(keep_work_dir=failed)
        if interrupt_on_sigterm:
            signal.signal(signal.SIGTERM, previous_handler)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1
