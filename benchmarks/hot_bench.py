"""`wallet bench hot`: payments into ONE merchant from many payers, with the merchant in 1 shard
and in N, in the same run: the ceiling of a hot account and the way past it.

An unsharded account is one partition, so every credit leg of every payment to it is decided by
the one processor thread that owns that partition, whatever the number of processors. A merchant
opened with `shards: N` is N accounts on the partitions their ids hash to, and each payment
(`pay_merchant` with `to_shards: N`) is credited to the shard its transaction id picks.

For each shard count, on fresh topics (`benchmarks.pipeline_bench.Bench`, deleted at the end):
`--processors` processor processes are started and assigned; `--payers` accounts are opened and
funded and the merchant opened; once every one of those is answered (so every shard is open:
the shards' open legs are committed with the merchant's answer), `--transfers` payments from
random payers are produced and the window runs from the first one produced to the last answer
seen by a read_committed consumer. Checks: every payment answered once, with success; the
events topic read whole (`benchmarks.ledger_check`: sequences, balances, conservation). That
the shards add up to what was paid is the end-to-end test's (tests/test_hot_account.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter

from confluent_kafka import KafkaException

from benchmarks.ledger_check import check_ledger
from benchmarks.pipeline_bench import (
    CURRENCY,
    FUND,
    KAFKA_TIMEOUT_S,
    OPEN,
    SUCCESS,
    Bench,
    BenchError,
    BenchOptions,
    Child,
    OutcomeTally,
    _InputProducer,
    setup_records,
)
from benchmarks.support.local_broker import broker_for
from infra.admin import BrokerUnavailableError, TopicProvisioningError, ensure_topics
from infra.settings import Settings
from producers.client import local_command
from schemas.codec import encode
from schemas.commands import SHARDS_MAX, OpenAccount, PayMerchant, shard_account_id, shard_index
from schemas.partitioning import partition_for

MERCHANT = "hot-shop"
MERCHANT_KIND, PAY_KIND = "shop", "pay"  # transaction id prefixes: what OutcomeTally counts by
PAYMENT_AMOUNT = "1.00"
TRANSFERS_DEFAULT = 20_000
PAYERS_DEFAULT = 2_000
PARTITIONS_DEFAULT = 8
PROCESSORS_DEFAULT = 2
SHARDS_DEFAULT = "1,8"
ASSIGN_TIMEOUT_S = 120.0
SETUP_TIMEOUT_S = 180.0
PAYMENT_RATE_FLOOR_PER_S = 200  # below this the stage is taken as stuck


class HotBench(Bench):
    """One shard count's run: the base bench's topics, processes, tallies and cleanup."""

    def __init__(self, base: Settings, options: BenchOptions, shards: int, processors: int) -> None:
        super().__init__(base, options)
        self.shards = shards
        self.processor_count = processors

    def run(self) -> dict:
        options = self.options
        ensure_topics(self.settings, timeout_s=KAFKA_TIMEOUT_S)
        processors = [
            self.start_processor(f"processor-{index}", instance_id=f"hot-{index}", store=f"store-hot-{index}")
            for index in range(self.processor_count)
        ]
        self._await_assigned(processors)
        tally = self._tally(self.settings.outcomes_topic, "hot")
        producer = _InputProducer(self.bootstrap, linger_ms=50)
        topic = self.settings.commands_topic
        for key, value in setup_records(options.accounts, time.time_ns() // 1_000_000):
            producer.produce(topic, key, value)
        opening = local_command(
            OpenAccount,
            transaction_id=f"{MERCHANT_KIND}-0",
            account_id=MERCHANT,
            currency=CURRENCY,
            kind="merchant",
            shards=self.shards,
        )
        producer.produce(topic, MERCHANT, encode(opening))
        producer.flush()
        self._await_setup(processors[0], tally)

        self.say(
            f"[hot] {self.shards} shard(s): {options.transfers:,} payments from {options.accounts:,} payers, "
            f"{self.processor_count} processors, {options.partitions} partitions"
        )
        draw = random.Random(options.seed).random
        started_s = time.monotonic()
        for number in range(options.transfers):
            payer = f"a{int(draw() * options.accounts)}"
            payment = local_command(
                PayMerchant,
                transaction_id=f"{PAY_KIND}-{number}",
                from_account=payer,
                to_account=MERCHANT,
                amount=PAYMENT_AMOUNT,
                currency=CURRENCY,
                to_shards=self.shards,
            )
            producer.produce(topic, payer, encode(payment))
            if number % 10_000 == 0:
                producer.poll()
        producer.flush()
        timeout_s = 60.0 + options.transfers / PAYMENT_RATE_FLOOR_PER_S
        end_s = self._await_outcomes(processors, tally, options.transfers, timeout_s, "hot", kind=PAY_KIND)
        elapsed_s = end_s - started_s
        return self._report(tally, elapsed_s)

    def _await_assigned(self, processors: list[Child]) -> None:
        deadline_s = time.monotonic() + ASSIGN_TIMEOUT_S
        while any(child.marker_s is None for child in processors):
            for child in processors:
                if child.exited() is not None:
                    raise child.failure(f"{child.name} exited with code {child.exited()} before it was assigned")
            if time.monotonic() > deadline_s:
                raise processors[0].failure(f"not every processor was assigned within {ASSIGN_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def _await_setup(self, processor: Child, tally: OutcomeTally) -> None:
        accounts = self.options.accounts
        deadline_s = time.monotonic() + SETUP_TIMEOUT_S
        while (tally.per_kind[OPEN], tally.per_kind[FUND], tally.per_kind[MERCHANT_KIND]) != (accounts, accounts, 1):
            tally.poll(0.1)
            if processor.exited() is not None:
                raise processor.failure(f"{processor.name} exited during the setup")
            if time.monotonic() > deadline_s:
                raise processor.failure(
                    f"setup: {dict(tally.per_kind)} answered within {SETUP_TIMEOUT_S:.0f} s, "
                    f"expected {accounts} opens and funds and the merchant"
                )
        if tally.results_of(MERCHANT_KIND) != Counter({SUCCESS: 1}):
            raise BenchError(f"the merchant's open was answered {dict(tally.results_of(MERCHANT_KIND))}")

    def _report(self, tally: OutcomeTally, elapsed_s: float) -> dict:
        options = self.options
        tally.poll(0.5)  # anything still arriving is a second answer
        problems = []
        results = tally.results_of(PAY_KIND)
        if results != Counter({SUCCESS: options.transfers}):
            problems.append(f"payment outcomes {dict(results)}, expected {options.transfers} successes")
        if tally.contradictions or tally.repeats:
            problems.append(f"payments answered twice: {(tally.contradictions + tally.repeats)[:3]}")
        ledger = check_ledger(
            self.bootstrap, self.settings.events_topic, options.partitions, f"{self.prefix}bench-ledger-hot"
        ).as_dict()
        problems += ledger["problems"]
        shard_ids = [shard_account_id(MERCHANT, index) for index in range(self.shards)]
        credited = Counter(
            shard_ids[shard_index(f"{PAY_KIND}-{number}", self.shards)] for number in range(options.transfers)
        )
        self.problems += problems
        return {
            "shards": self.shards,
            "transfers": options.transfers,
            "elapsed_s": round(elapsed_s, 3),
            "transfers_per_s": round(options.transfers / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            "partitions_of_shards": sorted({partition_for(shard, options.partitions) for shard in shard_ids}),
            "largest_shard_share": round(max(credited.values()) / options.transfers, 3),
            "ledger_events": ledger["events"],
            "checks_ok": not problems,
            "problems": problems,
        }


def format_report(report: dict) -> str:
    lines = [f"hot account {report['merchant']}: payments from many payers, {report['processors']} processor(s)"]
    for stage, ratio in zip(report["stages"], report["ratios_to_first"], strict=True):
        lines.append(
            f"  {stage['shards']:>2} shard(s) on partitions {stage['partitions_of_shards']}: "
            f"{stage['transfers_per_s']:>9,.1f} transfers/s ({stage['transfers']:,} in {stage['elapsed_s']:.1f} s; "
            f"largest shard {stage['largest_shard_share']:.0%}; x{ratio:.2f} the first; "
            f"checks {'ok' if stage['checks_ok'] else 'FAILED: ' + '; '.join(stage['problems'])})"
        )
    lines.append(f"  load average at the end: {' '.join(f'{value:.1f}' for value in report['load_average'])}")
    return "\n".join(lines)


def _shard_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected shard counts such as 1,8") from None
    if not counts or not all(1 <= count <= SHARDS_MAX for count in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: every shard count must be 1..{SHARDS_MAX}")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", type=_shard_counts, default=_shard_counts(SHARDS_DEFAULT), help="shard counts, in order"
    )
    parser.add_argument("--transfers", type=int, default=TRANSFERS_DEFAULT, help="payments per shard count")
    parser.add_argument("--payers", type=int, default=PAYERS_DEFAULT, help="accounts paying the merchant")
    parser.add_argument("--partitions", type=int, default=PARTITIONS_DEFAULT)
    parser.add_argument("--processors", type=int, default=PROCESSORS_DEFAULT, help="processor processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from infra.settings import settings_from_args
    from wallet.localkafka import LocalKafkaError

    if args.transfers < 1 or args.payers < 1 or args.processors < 1 or args.partitions < 1:
        print(
            "wallet bench hot: --transfers, --payers, --processors and --partitions must be positive", file=sys.stderr
        )
        return 2
    options = BenchOptions(
        transfers=args.transfers,
        accounts=args.payers,
        partitions=args.partitions,
        faust_transfers=0,
        faust_guarantees=(),
        latency_seconds=0.0,
        batch_size_max=5000,
        commit_interval_ms=25,
        seed=args.seed,
        profile_processor=None,
        keep_topics=False,
        kafka_streams=False,
        holds=0,
    )
    stages = []
    try:
        with broker_for(settings_from_args(args), say=Bench.say) as settings:
            for shards in args.shards:
                bench = HotBench(settings, options, shards, args.processors)
                failed = True
                try:
                    stages.append(bench.run())
                    failed = not stages[-1]["checks_ok"]
                except (BenchError, BrokerUnavailableError, TopicProvisioningError, KafkaException) as error:
                    print(f"wallet bench hot: {shards} shard(s): {error}", file=sys.stderr)
                    return 1
                finally:
                    bench.cleanup(keep_work_dir=failed)
    except LocalKafkaError as error:
        print(f"wallet bench hot: starting a local broker failed: {error}", file=sys.stderr)
        return 1
    report = {"merchant": MERCHANT, "processors": args.processors, "stages": stages, "load_average": os.getloadavg()}
    base = stages[0]["transfers_per_s"]
    report["ratios_to_first"] = [round(stage["transfers_per_s"] / base, 3) if base else None for stage in stages]
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if all(stage["checks_ok"] for stage in stages) else 1
