"""How fast the read model takes events into each database.

    .venv/bin/python -m benchmarks.readmodel_bench --db sqlite:////tmp/bench.db --db postgresql://user@host/db

Publishes a realistic log (decided in-process by the core: opens, deposits, transfers, refunds,
rejections; events and outcomes interleaved as the processor writes them) to fresh topics
under a unique prefix of the configured broker, then for each database measures:

- end to end: `wallet readmodel rebuild` of the whole log from Kafka (consume read_committed,
  decode, fold, write, offsets in the same transaction), events of wallet.events per second,
  with the outcomes read and written in the same time;
- database only: the same records, already decoded, through `ReadModelStore.apply`;
- with `--shards 1,2`, for each PostgreSQL database: N `wallet readmodel --shard I/N` processes
  consuming the log into it at once, events per second from their start (interpreter start-up
  included) until every partition's offset is stored (SQLite takes one shard only).

Wall-clock rates depend on what else the machine runs; the end-to-end rate per CPU second of
the process is printed too, with the load average.

The topics are deleted at the end. The target is 50,000 events/s into SQLite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import tempfile
import time
import uuid

from benchmarks.support.reference_pipeline import decide, publish, workload
from consumers.readmodel.consumer import BATCH_SIZE_MAX_DEFAULT, end_offsets
from consumers.readmodel.rebuild import rebuild
from consumers.readmodel.store import POSTGRES_PREFIXES, Batch, ReadModelStore, describe_db_url
from infra.admin import admin_client, delete_topics, ensure_topics
from infra.settings import PROJECT_ROOT, Settings, wallet_argv
from schemas.outcomes import Outcome

TARGET_SQLITE_EVENTS_PER_S = 50_000
SHARDS_TIMEOUT_S = 600
SHARD_STOP_TIMEOUT_S = 30


def _shard_counts(text: str) -> list[int]:
    counts = [int(item) for item in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--shards {text!r}: want counts >= 1, for example 1,2")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", action="append", required=True, metavar="URL", help="a database to measure (repeat)")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--operations", type=int, default=100_000, help="client commands after the opens and deposits")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE_MAX_DEFAULT)
    parser.add_argument(
        "--shards",
        type=_shard_counts,
        default=[],
        metavar="N,M",
        help="also measure N (then M...) shard processes into each PostgreSQL database",
    )
    args = parser.parse_args(argv)

    settings = Settings().with_overrides(topic_prefix=f"bench{uuid.uuid4().hex[:8]}.", partitions=args.partitions)
    started_s = time.monotonic()
    log = decide(workload(seed=1, account_count=args.accounts, operation_count=args.operations), args.partitions)
    event_count = log.event_count
    records = log.messages()
    print(f"decided {event_count} events and {log.outcome_count} outcomes in {time.monotonic() - started_s:.1f} s")
    # The log held in memory here would otherwise be scanned by every full garbage collection
    # during the measurement, a cost the consumer process itself never has.
    gc.collect()
    gc.freeze()
    ensure_topics(settings)
    try:
        started_s = time.monotonic()
        publish(settings, log, transaction_records_max=10_000)
        print(
            f"published to {settings.bootstrap} under prefix {settings.topic_prefix} "
            f"in {time.monotonic() - started_s:.1f} s"
        )
        results = [_measure(db_url, settings, records, event_count, args.batch_size) for db_url in args.db]
        results += [
            _measure_shards(db_url, settings, event_count, shard_count, args.batch_size)
            for db_url in args.db
            if db_url.startswith(POSTGRES_PREFIXES)
            for shard_count in args.shards
        ]
    finally:
        delete_topics(settings)
    print(json.dumps(results, indent=2))
    return 0


def _measure(db_url: str, settings: Settings, records: list, event_count: int, batch_size: int) -> dict:
    with ReadModelStore(db_url) as store:
        cpu_started_s = time.process_time()
        report = rebuild(store, settings, batch_size, show_progress=False)
        end_to_end_cpu_s = time.process_time() - cpu_started_s

        store.drop_schema()
        store.create_schema()
        started_s = time.monotonic()
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            store.apply(
                Batch(
                    events=[r for r in chunk if type(r) is not Outcome],
                    outcomes=[r for r in chunk if type(r) is Outcome],
                    offsets_before={("bench", 0): start or None},
                    offsets_after={("bench", 0): start + len(chunk)},
                )
            )
        store_only_s = time.monotonic() - started_s
    result = {
        "db": describe_db_url(db_url),
        "events": event_count,
        "records": len(records),
        "batch_size": batch_size,
        "end_to_end_s": round(report.elapsed_s, 2),
        "end_to_end_events_per_s": round(event_count / report.elapsed_s),
        # Per second of this process's CPU (all its threads): what a core of its own would give,
        # whatever else the machine was busy with (see load_average_1m).
        "end_to_end_events_per_cpu_s": round(event_count / end_to_end_cpu_s),
        "store_only_events_per_s": round(event_count / store_only_s),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"{result['db']}: {result['end_to_end_events_per_s']} events/s end to end from Kafka "
        f"({result['end_to_end_events_per_cpu_s']} per CPU second), "
        f"{result['store_only_events_per_s']} events/s database only; load average {result['load_average_1m']}"
    )
    return result


def _measure_shards(db_url: str, settings: Settings, event_count: int, shard_count: int, batch_size: int) -> dict:
    targets = end_offsets(admin_client(settings.bootstrap, role="readmodel"), settings)
    with ReadModelStore(db_url) as store:
        store.drop_schema()
        store.create_schema()
        log_file = tempfile.TemporaryFile()  # the shards' output, shown if one fails
        started_s = time.monotonic()
        processes = [
            subprocess.Popen(
                wallet_argv(
                    settings,
                    "readmodel",
                    "--db",
                    db_url,
                    "--batch-size",
                    str(batch_size),
                    "--shard",
                    f"{index}/{shard_count}",
                ),
                cwd=PROJECT_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            for index in range(shard_count)
        ]
        try:
            while any(store.offsets().get(key, 0) < end for key, end in targets.items()):
                exited = [process.returncode for process in processes if process.poll() is not None]
                if exited:
                    log_file.seek(0)
                    raise RuntimeError(f"a shard exited with {exited[0]}:\n{log_file.read().decode(errors='replace')}")
                if time.monotonic() - started_s > SHARDS_TIMEOUT_S:
                    raise RuntimeError(f"{shard_count} shards did not reach the end in {SHARDS_TIMEOUT_S} s")
                time.sleep(0.05)
            elapsed_s = time.monotonic() - started_s
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(SHARD_STOP_TIMEOUT_S)
            log_file.close()
    result = {
        "db": describe_db_url(db_url),
        "shards": shard_count,
        "events": event_count,
        "batch_size": batch_size,
        "shards_s": round(elapsed_s, 2),
        "shards_events_per_s": round(event_count / elapsed_s),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"{result['db']}: {shard_count} shards, {result['shards_events_per_s']} events/s from their start; "
        f"load average {result['load_average_1m']}"
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main())
