"""`wallet api`, `wallet account ...`, `wallet transfer`, `wallet status`, `wallet load`.

The account and transfer commands publish straight to Kafka through the client library (not
through HTTP) and wait for the outcome. Exit status: 0 success, 1 failure or error, 2 the
outcome is not known yet (pending: ask again with `wallet status TX`).
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from producers.client import (
    REQUEST_WAIT_MS_DEFAULT, OutcomesUnavailableError, PublishError, WalletClient, canonical_amount, check_ids,
    client_command, new_transaction_id,
)
from producers.load import ACCOUNTS_DEFAULT, OUTCOME_WAIT_S_DEFAULT, LoadError, LoadSpec, run_load
from schemas.codec import SchemaError, decode_outcome
from schemas.commands import (
    Close, Command, Deposit, Freeze, OpenAccount, PayMerchant, Transfer, Unfreeze, Withdraw, command_type,
)
from schemas.outcomes import Outcome, Reason
from schemas.partitioning import partition_for
from streams.core.money import AmountError
from infra.settings import settings_from_args
from infra.settings import Settings
from infra.kafka_clients import kafka_security

EXIT_SUCCESS, EXIT_FAILURE, EXIT_PENDING = 0, 1, 2
EXIT_STATUS_TEXT = ("Exit status: 0 success, 1 failure or error, 2 pending (the outcome was not known in time; "
                    "ask later with `wallet status TX`).")
WAIT_S_DEFAULT = 10.0
STATUS_READ_TIMEOUT_S = 60.0


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_api(subparsers)

    account = subparsers.add_parser("account", help="open, fund, withdraw from, freeze, unfreeze or close an account")
    actions = account.add_subparsers(dest="account_action", metavar="ACTION", required=True)
    opening = _command_parser(actions, "open", "open an account")
    opening.add_argument("account_id")
    opening.add_argument("currency", help="ISO 4217 code, e.g. USD")
    opening.add_argument("--merchant", action="store_true", help="a merchant account (can be paid with --merchant)")
    for name, help_text in (("deposit", "deposit money from a bank account"),
                            ("withdraw", "withdraw money to a bank account")):
        money = _command_parser(actions, name, help_text)
        money.add_argument("account_id")
        money.add_argument("amount", help='decimal string, e.g. 12.34')
        money.add_argument("currency")
    for name, help_text in (("freeze", "freeze an account: it can neither send nor receive"),
                            ("unfreeze", "unfreeze a frozen account"),
                            ("close", "close an account whose balance is zero")):
        _command_parser(actions, name, help_text).add_argument("account_id")

    transfer = _command_parser(subparsers, "transfer", "move money from one account to another")
    transfer.add_argument("from_account")
    transfer.add_argument("to_account")
    transfer.add_argument("amount")
    transfer.add_argument("currency")
    transfer.add_argument("--merchant", action="store_true", help="a merchant payment: the receiver must be a merchant")

    status = subparsers.add_parser("status", help="the outcome of a transaction, read from wallet.outcomes")
    status.add_argument("transaction_id")
    status.set_defaults(handler=_reporting_errors(_status))

    _register_load(subparsers)


def _command_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=f"{help_text}. {EXIT_STATUS_TEXT}")
    parser.add_argument("--tx", dest="transaction_id", help="transaction id (default: a new one); reuse it to retry")
    parser.add_argument("--wait-s", type=float, default=WAIT_S_DEFAULT,
                        help=f"how long to wait for the outcome (default {WAIT_S_DEFAULT:.0f})")
    parser.set_defaults(handler=_reporting_errors(_run_command), command_name=name)
    return parser


def _reporting_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    # Operating and input errors get one line and exit 1, not a traceback.
    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except AmountError as error:
            print(f"error: invalid amount: {error}", file=sys.stderr)
            return EXIT_FAILURE
        except (OutcomesUnavailableError, PublishError, KafkaException, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILURE

    return wrapper


def build_command(args: argparse.Namespace) -> Command:
    """The command a CLI invocation asks for, with the actor and role of the trusted local edge
    (`local_credentials`); the broker stamps its time. Raises ValueError for an id the contract refuses."""
    common = {"transaction_id": args.transaction_id or new_transaction_id()}
    name = args.command_name
    if name == "open":
        return client_command(OpenAccount, **common, account_id=args.account_id, currency=args.currency,
                              kind="merchant" if args.merchant else "user")
    if name in ("deposit", "withdraw"):
        command_class = Deposit if name == "deposit" else Withdraw
        return client_command(command_class, **common, account_id=args.account_id, currency=args.currency,
                              amount=canonical_amount(args.amount, args.currency))
    if name == "transfer":
        command_class = PayMerchant if args.merchant else Transfer
        return client_command(command_class, **common, from_account=args.from_account, to_account=args.to_account,
                              currency=args.currency, amount=canonical_amount(args.amount, args.currency))
    command_class = {"freeze": Freeze, "unfreeze": Unfreeze, "close": Close}[name]
    return client_command(command_class, **common, account_id=args.account_id)


def _run_command(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    command = build_command(args)
    check_ids(command)
    started_s = time.monotonic()
    with WalletClient.connect(settings) as client:
        outcome = client.request(command, args.wait_s)
    elapsed_ms = (time.monotonic() - started_s) * 1000
    what = f"{command_type(command)} {command.transaction_id}"
    if outcome is None:
        print(f"pending: {what} was published but its outcome was not known within {args.wait_s:.0f} s; "
              f"ask later with `wallet status {command.transaction_id}`")
        return EXIT_PENDING
    return _report_final(outcome, what, f" ({elapsed_ms:.0f} ms)")


def transaction_outcome(settings: Settings, transaction_id: str) -> tuple[Outcome | None, int]:
    """The transaction's answer from `wallet.outcomes`, and how many conflicting requests reused its id.

    Outcomes are keyed by transaction id, so only the one partition that holds it is read,
    from its first offset to its current end.
    """
    consumer = Consumer({**kafka_security("api"), "bootstrap.servers": settings.bootstrap,
                         "group.id": f"wallet-status-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True})
    try:
        metadata = consumer.list_topics(settings.outcomes_topic, timeout=10)
        topic = metadata.topics.get(settings.outcomes_topic)
        if topic is None or topic.error is not None:
            raise ValueError(f"topic {settings.outcomes_topic} is not available at {settings.bootstrap}")
        partition = partition_for(transaction_id, len(topic.partitions))
        consumer.assign([TopicPartition(settings.outcomes_topic, partition, 0)])
        answer, conflicts = None, 0
        deadline_s = time.monotonic() + STATUS_READ_TIMEOUT_S
        while time.monotonic() < deadline_s:
            for message in consumer.consume(10_000, 0.5):
                if message.error() is not None:
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        return answer, conflicts
                    raise ValueError(f"reading {settings.outcomes_topic}: {message.error().str()}")
                if message.key() != transaction_id.encode():
                    continue
                try:
                    outcome = decode_outcome(message.value())
                except SchemaError:
                    continue
                if answer is None and outcome.reason != Reason.DUPLICATE_CONFLICT:
                    answer = outcome
                elif outcome.reason == Reason.DUPLICATE_CONFLICT and (
                        answer is None or outcome.digest != answer.digest):
                    conflicts += 1
        raise ValueError(f"reading partition {partition} of {settings.outcomes_topic} did not finish within "
                         f"{STATUS_READ_TIMEOUT_S:.0f} s")
    finally:
        consumer.close()


def _status(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    outcome, conflicts = transaction_outcome(settings, args.transaction_id)
    note = f" ({conflicts} conflicting request(s) reused this id and were refused)" if conflicts else ""
    if outcome is None:
        print(f"unknown: no outcome for {args.transaction_id} on {settings.outcomes_topic} yet "
              f"(still in flight, or never published){note}")
        return EXIT_PENDING
    return _report_final(outcome, args.transaction_id, note)


def _report_final(outcome, what: str, note: str) -> int:
    if outcome.status == "success":
        print(f"success: {what}{note}")
        return EXIT_SUCCESS
    print(f"failure: {what}: {outcome.reason}{note}")
    return EXIT_FAILURE


def _register_api(subparsers: argparse._SubParsersAction) -> None:
    api = subparsers.add_parser("api", help="serve the HTTP command API (uvicorn, foreground)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    api.add_argument("--readmodel-db", help="read model database URL; adds the query routes (balances, history)")
    api.add_argument("--request-wait-ms", type=int, default=REQUEST_WAIT_MS_DEFAULT,
                     help=f"how long a request waits for its outcome before answering pending "
                          f"(default {REQUEST_WAIT_MS_DEFAULT})")
    api.set_defaults(handler=_serve_api)


def _serve_api(args: argparse.Namespace) -> int:
    import uvicorn

    from producers.api import create_app

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s api %(levelname)s %(name)s %(message)s")
    logging.getLogger("wallet.producers.kafka").setLevel(logging.CRITICAL)  # one line per refused connection otherwise
    app = create_app(settings_from_args(args), request_wait_ms=args.request_wait_ms, readmodel_db=args.readmodel_db)
    print(f"serving the wallet API at http://{args.host}:{args.port} (OpenAPI: /docs, /openapi.json)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _register_load(subparsers: argparse._SubParsersAction) -> None:
    load = subparsers.add_parser(
        "load", help="open and fund accounts, offer transfers at a rate, report throughput and outcomes",
        description="Opens and funds --accounts accounts, then publishes transfers at --tps (unbounded if "
                    "omitted) for --duration seconds or --count transfers, waits for their outcomes and prints "
                    "the achieved throughput and the outcome mix.")
    load.add_argument("--accounts", type=int, default=ACCOUNTS_DEFAULT,
                      help=f"accounts to open and fund (default {ACCOUNTS_DEFAULT})")
    load.add_argument("--tps", type=float, help="offered transfers per second (default: as fast as possible)")
    load.add_argument("--duration", type=float, help="seconds to publish for")
    load.add_argument("--count", type=int, help="transfers to publish")
    load.add_argument("--zipf", type=float, default=0.0,
                      help="skew: Zipf exponent of how often an account is picked (default 0: uniform)")
    load.add_argument("--currency", default="USD")
    load.add_argument("--missing-receiver-share", type=float, default=0.0,
                      help="share of transfers to accounts that do not exist (refunded; default 0)")
    load.add_argument("--outcome-wait-s", type=float, default=OUTCOME_WAIT_S_DEFAULT,
                      help=f"how long to wait for the outcomes after publishing (default {OUTCOME_WAIT_S_DEFAULT:.0f})")
    load.add_argument("--no-progress", action="store_true", help="no progress bars")
    load.set_defaults(handler=_reporting_errors(_load))


def _load(args: argparse.Namespace) -> int:
    if args.count is None and args.duration is None:
        print("error: give --count N, or --duration S (with --tps R for a rate)", file=sys.stderr)
        return EXIT_FAILURE
    spec = LoadSpec(accounts=args.accounts, rate_per_s=args.tps, duration_s=args.duration, count=args.count,
                    zipf_s=args.zipf, currency=args.currency, missing_receiver_share=args.missing_receiver_share,
                    outcome_wait_s=args.outcome_wait_s)
    try:
        report = run_load(settings_from_args(args), spec, progress=not args.no_progress)
    except LoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print("\n".join(report.lines(args.tps)))
    return EXIT_SUCCESS if report.missing == 0 else EXIT_PENDING
