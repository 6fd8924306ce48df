"""`wallet readmodel [run options]`, `wallet readmodel rebuild|lag|serve`.

The database drivers and the HTTP stack are imported by the handlers, not here: every
`wallet` command loads this module to build its parser.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from infra.metrics import add_metrics_options
from infra.settings import settings_from_args

if TYPE_CHECKING:
    from consumers.readmodel.consumer import Shard

SERVE_PORT_DEFAULT = 8081


def register(subparsers: argparse._SubParsersAction) -> None:
    from consumers.readmodel.consumer import BATCH_SIZE_MAX_DEFAULT, BATCH_WAIT_MS_DEFAULT, Shard

    readmodel = subparsers.add_parser(
        "readmodel",
        help="read model: consume wallet.events and wallet.outcomes into a database, exactly once",
        description="Without an action: consume both topics into the database until SIGTERM/SIGINT "
        "(the batch in progress is finished first).",
    )
    _add_db_option(readmodel, default=None)
    _add_batch_size_option(readmodel, default=BATCH_SIZE_MAX_DEFAULT)
    readmodel.add_argument(
        "--batch-wait-ms",
        type=int,
        default=BATCH_WAIT_MS_DEFAULT,
        help=f"how long a batch waits to fill up (default {BATCH_WAIT_MS_DEFAULT})",
    )
    readmodel.add_argument(
        "--shard",
        type=_shard,
        default=Shard(),
        metavar="I/N",
        help="consume only the partitions p with p %% N == I, beside the other shards' processes "
        "(PostgreSQL only for N > 1; default 0/1: every partition)",
    )
    add_metrics_options(readmodel)
    readmodel.set_defaults(handler=_reporting_errors(_run))
    actions = readmodel.add_subparsers(dest="readmodel_action", metavar="ACTION")

    rebuild = actions.add_parser(
        "rebuild",
        help="drop the read model and replay both topics from the first offset; "
        "stop the live consumer of that database first",
    )
    _add_db_option(rebuild, default=argparse.SUPPRESS)
    _add_batch_size_option(rebuild, default=argparse.SUPPRESS)
    rebuild.add_argument("--no-progress", action="store_true", help="no progress bar")
    rebuild.set_defaults(handler=_reporting_errors(_rebuild))

    lag = actions.add_parser("lag", help="per partition: offsets stored in the read model vs the end of the topic")
    _add_db_option(lag, default=argparse.SUPPRESS)
    lag.add_argument("--json", action="store_true", help="print JSON")
    lag.set_defaults(handler=_reporting_errors(_lag))

    serve = actions.add_parser("serve", help="serve the query API alone (the command API app also serves it)")
    _add_db_option(serve, default=argparse.SUPPRESS)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=SERVE_PORT_DEFAULT, help=f"(default {SERVE_PORT_DEFAULT})")
    serve.set_defaults(handler=_reporting_errors(_serve))


def _shard(text: str) -> Shard:
    from consumers.readmodel.consumer import Shard

    try:
        return Shard.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_db_option(parser: argparse.ArgumentParser, default: object) -> None:
    # SUPPRESS on the actions keeps an option given before the action (`readmodel --db X rebuild`).
    parser.add_argument(
        "--db",
        default=default,
        metavar="URL",
        help="sqlite:///relative.db, sqlite:////absolute.db or postgresql://user@host:port/db "
        "(env WALLET_READMODEL_DB; default sqlite:///<run dir>/readmodel.db)",
    )


def _add_batch_size_option(parser: argparse.ArgumentParser, default: object) -> None:
    from consumers.readmodel.consumer import BATCH_SIZE_MAX_DEFAULT

    parser.add_argument(
        "--batch-size",
        type=int,
        default=default,
        help=f"records per database transaction at most (default {BATCH_SIZE_MAX_DEFAULT})",
    )


def _db_url(args: argparse.Namespace) -> str:
    from consumers.readmodel.store import db_url_of

    return db_url_of(args.db, settings_from_args(args))


def _reporting_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    # Operating errors (no broker, no database, a corrupt log, a second writer) are the
    # user's to act on: one clear message and exit 1, not a traceback.
    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        import psycopg
        from confluent_kafka import KafkaException

        from consumers.readmodel.consumer import ReadModelError
        from consumers.readmodel.store import ConcurrentWriterError, DatabaseUrlError
        from streams.core.state import CorruptLog

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        try:
            return handler(args)
        except (
            ReadModelError,
            ConcurrentWriterError,
            DatabaseUrlError,
            CorruptLog,
            KafkaException,
            psycopg.OperationalError,
            sqlite3.OperationalError,
        ) as error:
            print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
            return 1

    return wrapper


def _run(args: argparse.Namespace) -> int:
    from consumers.readmodel.consumer import run
    from consumers.readmodel.metrics import ReadModelMetrics
    from consumers.readmodel.store import ReadModelStore
    from infra.metrics import new_registry, serve_if_asked

    stop = threading.Event()

    def request_stop(signal_number: int, _frame: object) -> None:
        logging.getLogger("wallet.readmodel").info(
            "%s: stopping after the batch in progress", signal.Signals(signal_number).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    registry = new_registry()
    metrics = ReadModelMetrics(registry)
    server = serve_if_asked(args, registry)
    try:
        with ReadModelStore(_db_url(args)) as store:
            run(store, settings_from_args(args), stop.is_set, args.batch_size, args.batch_wait_ms, metrics, args.shard)
    finally:
        if server is not None:
            server.close()
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from consumers.readmodel.rebuild import rebuild
    from consumers.readmodel.store import ReadModelStore, describe_db_url

    db_url = _db_url(args)
    with ReadModelStore(db_url) as store:
        report = rebuild(store, settings_from_args(args), args.batch_size, show_progress=not args.no_progress)
    print(
        f"rebuilt {describe_db_url(db_url)}: {report.records} records ({report.offsets} offsets) "
        f"in {report.elapsed_s:.1f} s ({report.records / max(report.elapsed_s, 1e-9):.0f} records/s)"
    )
    return 0


def _lag(args: argparse.Namespace) -> int:
    from consumers.readmodel.consumer import read_lag
    from consumers.readmodel.store import ReadModelStore
    from infra.admin import admin_client

    settings = settings_from_args(args)
    with ReadModelStore(_db_url(args)) as store:
        store.create_schema()
        lags = read_lag(admin_client(settings.bootstrap, role="readmodel"), settings, store.offsets())
    if args.json:
        print(
            json.dumps(
                {
                    "total_lag": sum(item.lag for item in lags),
                    "partitions": [
                        {
                            "topic": item.topic,
                            "partition": item.partition,
                            "next_offset": item.next_offset,
                            "end_offset": item.end_offset,
                            "lag": item.lag,
                        }
                        for item in lags
                    ],
                },
                indent=2,
            )
        )
        return 0
    print(f"{'topic':40} {'partition':>9} {'stored':>12} {'end':>12} {'lag':>10}")
    for item in lags:
        stored = "-" if item.next_offset is None else str(item.next_offset)
        print(f"{item.topic:40} {item.partition:>9} {stored:>12} {item.end_offset:>12} {item.lag:>10}")
    print(f"total lag: {sum(item.lag for item in lags)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from consumers.readmodel.query_api import create_app

    # The same token gate as `wallet api`: the query side alone is no less private.
    from producers.auth import SCOPES, AuthConfig, Gate, RateLimits

    settings = settings_from_args(args)
    gate = Gate(AuthConfig.from_environment(settings), RateLimits.from_environment())
    uvicorn.run(create_app(_db_url(args), settings, caller=gate.requires(*SCOPES)), host=args.host, port=args.port)
    return 0
