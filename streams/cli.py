"""`wallet processor`: run one exactly-once processor instance, or dump a stopped or running
instance's RocksDB snapshot as JSON (opened read-only, so it is safe beside a live one)."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from pathlib import Path

from infra.metrics import add_metrics_options
from streams.core.money import format_amount
from streams.runtime.processor import Processor, ProcessorConfig
from streams.runtime.store import StateStore


def register(subparsers) -> None:
    defaults = ProcessorConfig(instance_id="", store_path=Path())
    parser = subparsers.add_parser(
        "processor",
        help="run one exactly-once stream processor instance",
        description="Consume wallet.commands, decide with the core, produce events, legs "
        "and outcomes in one Kafka transaction per batch.",
    )
    parser.add_argument(
        "--instance-id",
        default=socket.gethostname(),
        help="stable name of this instance; a restart with the same id fences its predecessor (default: the host name)",
    )
    parser.add_argument("--store", type=Path, help="RocksDB folder (default: <run dir>/processor-<instance id>)")
    parser.add_argument(
        "--batch-size-max",
        type=int,
        default=defaults.batch_size_max,
        help=f"commands per Kafka transaction (default {defaults.batch_size_max})",
    )
    parser.add_argument(
        "--commit-interval-ms",
        type=int,
        default=defaults.commit_interval_ms,
        help=f"longest wait for a batch to fill (default {defaults.commit_interval_ms})",
    )
    parser.add_argument(
        "--state-flush-interval-ms",
        type=int,
        default=defaults.state_flush_interval_ms,
        help=f"how often the RocksDB snapshot is written (default {defaults.state_flush_interval_ms})",
    )
    parser.add_argument(
        "--transaction-timeout-ms",
        type=int,
        default=defaults.transaction_timeout_ms,
        help="how long the broker waits before aborting a dead instance's transaction "
        f"(default {defaults.transaction_timeout_ms})",
    )
    parser.add_argument(
        "--kafka-call-timeout-ms",
        type=int,
        default=defaults.kafka_call_timeout_ms,
        help="bound of every blocking Kafka call (commit, abort, producer start); past it the batch "
        f"is redone from the log (default {defaults.kafka_call_timeout_ms})",
    )
    parser.add_argument(
        "--tick-interval-ms",
        type=int,
        default=defaults.tick_interval_ms,
        help="a partition quiet this long whose hold has expired gets a tick command, so the hold "
        f"expires without other traffic; 0 disables ticks (default {defaults.tick_interval_ms})",
    )
    parser.add_argument(
        "--standby",
        action="store_true",
        help="follow wallet.events for every partition this instance does not own, so taking one over "
        "folds only the log since that warm copy, not the partition's history (costs the loop CPU "
        "and the memory of every partition's state)",
    )
    add_metrics_options(parser)
    parser.set_defaults(handler=_run)
    actions = parser.add_subparsers(dest="processor_action", metavar="ACTION")
    dump = actions.add_parser("dump-state", help="print a processor's RocksDB snapshot as JSON")
    dump.add_argument("--store", type=Path, required=True, dest="dump_store", help="RocksDB folder of the instance")
    dump.set_defaults(handler=_dump_state)


def _run(args: argparse.Namespace) -> int:
    from infra.metrics import new_registry, serve_if_asked
    from infra.settings import settings_from_args
    from streams.runtime.metrics import ProcessorMetrics

    settings = settings_from_args(args)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s processor[{args.instance_id}] %(levelname)s %(message)s",
    )
    config = ProcessorConfig(
        instance_id=args.instance_id,
        store_path=args.store or settings.run_dir / f"processor-{args.instance_id}",
        batch_size_max=args.batch_size_max,
        commit_interval_ms=args.commit_interval_ms,
        state_flush_interval_ms=args.state_flush_interval_ms,
        transaction_timeout_ms=args.transaction_timeout_ms,
        kafka_call_timeout_ms=args.kafka_call_timeout_ms,
        tick_interval_ms=args.tick_interval_ms,
        standby=args.standby,
    )
    registry = new_registry()
    metrics = ProcessorMetrics(registry)
    # Served from the start, so that a long restore is watched as it happens.
    server = serve_if_asked(args, registry)
    try:
        Processor(settings, config, metrics).run()
    finally:
        if server is not None:
            server.close()
    return 0


def state_dump(store_path: Path) -> dict:
    """The snapshot as plain data: per partition, the events offset it covers, its accounts and
    its holds (open, and ended ones the partition still remembers)."""
    store = StateStore(store_path, read_only=True)
    try:
        partitions = {}
        for partition in store.partitions():
            state, checkpoint = store.load(partition)
            partitions[str(partition)] = {
                "events_offset": checkpoint.events_offset,
                "accounts": {
                    account_id: {
                        "currency": a.currency,
                        "kind": a.kind,
                        "status": a.status,
                        "balance": format_amount(a.balance_minor, a.currency),
                        "held": format_amount(a.held_minor, a.currency),
                        "seq": a.seq,
                    }
                    for account_id, a in sorted(state.accounts.items())
                },
                "holds": [
                    {
                        "account_id": account_id,
                        "hold_id": hold_id,
                        "to_account": hold.to_account,
                        "amount": format_amount(hold.amount_minor, state.accounts[account_id].currency),
                        "held": format_amount(hold.held_minor, state.accounts[account_id].currency),
                        "captured": format_amount(hold.captured_minor, state.accounts[account_id].currency),
                        "state": hold.status,
                        "expires_ms": hold.expires_ms,
                    }
                    for (account_id, hold_id), hold in sorted(state.holds.items())
                ],
            }
        return {"partitions": partitions}
    finally:
        store.close()


def _dump_state(args: argparse.Namespace) -> int:
    if not args.dump_store.exists():
        print(f"no processor store at {args.dump_store}", file=sys.stderr)
        return 2
    json.dump(state_dump(args.dump_store), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0
