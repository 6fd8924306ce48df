"""`wallet audit` and `wallet audit balance`.

Exit codes: 0 every check passed; 1 a violation was found; 2 the audit could not run or could
not run a check it was asked for (broker, topics, state dump, read model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from confluent_kafka import KafkaException

from consumers.audit.balance import balance_at, parse_time_ms
from consumers.audit.runner import run_audit
from consumers.audit.snapshots import AuditSetupError
from infra.log_reader import READ_TIMEOUT_S_DEFAULT, LogReadError
from streams.core.state import CorruptLog

EXIT_PASSED, EXIT_VIOLATIONS, EXIT_CANNOT_AUDIT = 0, 1, 2


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser(
        "audit",
        help="replay the topics from the first offset and prove every balance",
        description="Replays wallet.events, wallet.outcomes and wallet.commands from their first offset and checks "
        "conservation per currency, gap-free sequences, one outcome per request and a refund for every "
        "failure after a debit, fold = processor state (and read model), and that re-deciding the "
        "commands reproduces the events byte for byte. Exit 0: passed; 1: violations; 2: could not audit.",
    )
    audit.add_argument(
        "--state-dump",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="output of `wallet processor dump-state` (repeatable, one per instance); take it before the audit",
    )
    audit.add_argument(
        "--readmodel-db",
        metavar="URL",
        help="also compare with the read model's accounts (sqlite:///path.db or postgresql://...)",
    )
    audit.add_argument(
        "--settled",
        action="store_true",
        help="the pipeline has been drained: a transfer still in flight is a violation",
    )
    audit.add_argument(
        "--no-determinism", action="store_true", help="skip re-deciding wallet.commands (the slowest check)"
    )
    audit.add_argument(
        "--json",
        action="store_true",
        help='print the report as JSON, with every money event and its actor (who moved the money) under "movements"',
    )
    audit.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    audit.add_argument(
        "--workers", type=int, metavar="N", help="processes the replays are split between (default: one per core)"
    )
    audit.add_argument(
        "--timeout-s",
        type=float,
        default=READ_TIMEOUT_S_DEFAULT,
        help=f"longest read of one topic (default {READ_TIMEOUT_S_DEFAULT:.0f})",
    )
    audit.set_defaults(handler=_audit)

    actions = audit.add_subparsers(dest="audit_action", metavar="ACTION")
    balance = actions.add_parser(
        "balance",
        help="one account's balance at a point in the past, from the log",
        description="Folds the account's events up to a point: --at TIME (event time, "
        "ISO 8601 or epoch ms; UTC when no zone is given) or --offset N (up to "
        "and including offset N of the account's partition of wallet.events).",
    )
    balance.add_argument("account_id", metavar="ACCOUNT")
    point = balance.add_mutually_exclusive_group(required=True)
    point.add_argument("--at", metavar="TIME", help="ISO 8601 time or epoch milliseconds, compared with event ts_ms")
    point.add_argument("--offset", type=int, metavar="N", help="offset in the account's partition of wallet.events")
    balance.add_argument("--json", action="store_true", dest="balance_json", help="print the answer as JSON")
    balance.add_argument(
        "--timeout-s",
        type=float,
        default=READ_TIMEOUT_S_DEFAULT,
        dest="balance_timeout_s",
        help=f"longest read of the partition (default {READ_TIMEOUT_S_DEFAULT:.0f})",
    )
    balance.set_defaults(handler=_balance)


def _audit(args: argparse.Namespace) -> int:
    from infra.settings import settings_from_args

    try:
        report = run_audit(
            settings_from_args(args),
            state_dumps=args.state_dump,
            readmodel_db=args.readmodel_db,
            check_determinism=not args.no_determinism,
            settled=args.settled,
            progress=not args.no_progress and sys.stderr.isatty(),
            timeout_s=args.timeout_s,
            workers=args.workers,
            movements=args.json,
        )
    except (LogReadError, AuditSetupError, KafkaException) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CANNOT_AUDIT
    print(report.to_json_text() if args.json else report.render_text())
    return EXIT_PASSED if report.passed else EXIT_VIOLATIONS


def _balance(args: argparse.Namespace) -> int:
    from infra.settings import settings_from_args

    try:
        at_ms = parse_time_ms(args.at) if args.at is not None else None
        answer = balance_at(
            settings_from_args(args), args.account_id, at_ms=at_ms, offset=args.offset, timeout_s=args.balance_timeout_s
        )
    except (ValueError, LogReadError, KafkaException) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CANNOT_AUDIT
    except CorruptLog as error:
        print(f"error: the log is corrupt: {error}", file=sys.stderr)
        return EXIT_VIOLATIONS
    print(json.dumps(answer.to_json(), indent=1) if args.balance_json else answer.render_text())
    return EXIT_PASSED
