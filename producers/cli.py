"""`wallet auth token`, `wallet account ...`, `wallet transfer`, `wallet status`, `wallet load`.

The account, transfer and status commands are clients of the HTTP API (`--api URL`, default
`WALLET_API_URL` or http://127.0.0.1:8080) with the bearer token in `WALLET_TOKEN`, so they
are authorised like any other caller: the API, not the terminal, sets who asks. Exit status:
0 success, 1 failure or error, 2 the outcome is not known yet (pending: ask again with
`wallet status TX`). `wallet load` publishes straight to Kafka, as a trusted service.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

from infra.settings import settings_from_args
from producers.client import (
    CAPTURE_ID_SUFFIX,
    VOID_ID_SUFFIX,
    OutcomesUnavailableError,
    PublishError,
    canonical_amount,
    check_ids,
    client_command,
    new_transaction_id,
)
from producers.load import ACCOUNTS_DEFAULT, OUTCOME_WAIT_S_DEFAULT, LoadError, LoadSpec, run_load
from schemas.commands import (
    ACCOUNT_ID_LENGTH_MAX,
    TRANSACTION_ID_LENGTH_MAX,
    Close,
    Command,
    Deposit,
    Freeze,
    OpenAccount,
    PayMerchant,
    PlaceHold,
    Transfer,
    Unfreeze,
    Withdraw,
    command_type,
    is_valid_id,
)
from streams.core.money import AmountError

EXIT_SUCCESS, EXIT_FAILURE, EXIT_PENDING = 0, 1, 2
EXIT_STATUS_TEXT = (
    "Exit status: 0 success, 1 failure or error, 2 pending (the outcome was not known in time; "
    "ask later with `wallet status TX`)."
)
WAIT_S_DEFAULT = 10.0
STATUS_READ_TIMEOUT_S = 60.0
API_URL_DEFAULT = "http://127.0.0.1:8080"
HTTP_TIMEOUT_MARGIN_S = 10.0
REQUEST_WAIT_MS_MAX = 30_000


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_auth(subparsers)

    account = subparsers.add_parser("account", help="open, fund, withdraw from, freeze, unfreeze or close an account")
    actions = account.add_subparsers(dest="account_action", metavar="ACTION", required=True)
    opening = _command_parser(actions, "open", "open an account")
    opening.add_argument("account_id")
    opening.add_argument("currency", help="ISO 4217 code, e.g. USD")
    opening.add_argument("--merchant", action="store_true", help="a merchant account (can be paid with --merchant)")
    opening.add_argument(
        "--shards", type=int, default=1, help="a merchant split over this many accounts on different partitions (1..64)"
    )
    for name, help_text in (
        ("deposit", "deposit money from a bank account"),
        ("withdraw", "withdraw money to a bank account"),
    ):
        money = _command_parser(actions, name, help_text)
        money.add_argument("account_id")
        money.add_argument("amount", help="decimal string, e.g. 12.34")
        money.add_argument("currency")
    for name, help_text in (
        ("freeze", "freeze an account: it can neither send nor receive"),
        ("unfreeze", "unfreeze a frozen account"),
        ("close", "close an account whose balance is zero"),
    ):
        _command_parser(actions, name, help_text).add_argument("account_id")

    transfer = _command_parser(subparsers, "transfer", "move money from one account to another")
    transfer.add_argument("from_account")
    transfer.add_argument("to_account")
    transfer.add_argument("amount")
    transfer.add_argument("currency")
    transfer.add_argument("--merchant", action="store_true", help="a merchant payment: the receiver must be a merchant")
    transfer.add_argument("--to-shards", type=int, default=1, help="the receiving merchant's shard count (default 1)")

    _register_hold(subparsers)

    status = subparsers.add_parser("status", help="the outcome of one of your transactions, from the API")
    status.add_argument("transaction_id")
    status.add_argument("--account", help="the account that owns the request (narrows the lookup)")
    _add_api_option(status)
    status.set_defaults(handler=_reporting_errors(_status))

    _register_load(subparsers)


def _register_hold(subparsers: argparse._SubParsersAction) -> None:
    hold = subparsers.add_parser(
        "hold",
        help="reserve money for a destination (place), then capture, void or show the hold",
        description="Holds: money of an account reserved for a destination account until it is captured (all "
        "or part, in one or several captures), voided, or expires. The owner of the held account places, "
        "captures and voids; an operator may capture and void; the destination's owner may only show it.",
    )
    actions = hold.add_subparsers(dest="hold_action", metavar="ACTION", required=True)
    place = _command_parser(
        actions, "place", "place a hold on one of your accounts", tx_help="the hold id (default: a new one)"
    )
    place.add_argument("account_id", help="the account whose money is held (yours)")
    place.add_argument("to_account", help="the destination of the captures")
    place.add_argument("amount", help="decimal string, e.g. 12.34")
    place.add_argument("currency")
    place.add_argument(
        "--expires-in-s",
        type=int,
        required=True,
        help="seconds after the hold is placed at which it expires, releasing what it still holds (1 to 604800)",
    )
    capture = _command_parser(
        actions,
        "capture",
        "move all or part of a hold to its destination",
        tx_help=f"this capture's id (default: HOLD_ID{CAPTURE_ID_SUFFIX}); give each capture of a hold its own",
    )
    capture.add_argument("hold_id")
    capture.add_argument("--amount", help="what to capture now (default: all that is still held)")
    capture.add_argument(
        "--final",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="release what is left after this capture (default --final; --no-final keeps the rest held)",
    )
    _add_hold_account_option(capture)
    void = _command_parser(
        actions, "void", "release a hold", tx_help=f"this void's id (default: HOLD_ID{VOID_ID_SUFFIX})"
    )
    void.add_argument("hold_id")
    _add_hold_account_option(void)
    show = actions.add_parser(
        "show",
        help="a hold: its accounts, amounts and state, from the API's read model",
        description="Prints the hold; exit 0 when found, 1 when not found (or not yours) or on error.",
    )
    show.add_argument("hold_id")
    _add_hold_account_option(show)
    _add_api_option(show)
    show.set_defaults(handler=_reporting_errors(_show_hold))


def _add_hold_account_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--account", help="the held account (needed when the hold id names holds of several accounts)")


def _command_parser(
    subparsers: argparse._SubParsersAction,
    name: str,
    help_text: str,
    tx_help: str = "transaction id (default: a new one)",
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=f"{help_text}. {EXIT_STATUS_TEXT}")
    parser.add_argument("--tx", dest="transaction_id", help=f"{tx_help}; reuse it to retry")
    parser.add_argument(
        "--wait-s",
        type=float,
        default=WAIT_S_DEFAULT,
        help=f"how long to wait for the outcome (default {WAIT_S_DEFAULT:.0f})",
    )
    _add_api_option(parser)
    parser.set_defaults(handler=_reporting_errors(_run_command), command_name=name)
    return parser


def _add_api_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        default=os.environ.get("WALLET_API_URL", API_URL_DEFAULT),
        help=f"the wallet API's URL (default WALLET_API_URL or {API_URL_DEFAULT}); the bearer token "
        "is read from WALLET_TOKEN",
    )


def _reporting_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    # Operating and input errors get one line and exit 1, not a traceback.
    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except AmountError as error:
            print(f"error: invalid amount: {error}", file=sys.stderr)
            return EXIT_FAILURE
        except (OutcomesUnavailableError, PublishError, KafkaException, ValueError, ApiCallError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILURE

    return wrapper


def build_command(args: argparse.Namespace) -> Command:
    """The command a CLI invocation asks for, with the actor and role of the trusted local edge
    (`local_credentials`); the broker stamps its time. Raises ValueError for an id the contract refuses."""
    common: dict[str, Any] = {"transaction_id": args.transaction_id or new_transaction_id()}
    name = args.command_name
    if name == "open":
        return client_command(
            OpenAccount,
            **common,
            account_id=args.account_id,
            currency=args.currency,
            kind="merchant" if args.merchant else "user",
            shards=args.shards,
        )
    if name in ("deposit", "withdraw"):
        money_class = Deposit if name == "deposit" else Withdraw
        return client_command(
            money_class,
            **common,
            account_id=args.account_id,
            currency=args.currency,
            amount=canonical_amount(args.amount, args.currency),
        )
    if name == "place":
        return client_command(
            PlaceHold,
            **{**common, "transaction_id": args.transaction_id or new_transaction_id("hold-")},
            account_id=args.account_id,
            to_account=args.to_account,
            currency=args.currency,
            amount=canonical_amount(args.amount, args.currency),
            expires_in_ms=args.expires_in_s * 1000,
        )
    if name == "transfer":
        transfer_class = PayMerchant if args.merchant else Transfer
        return client_command(
            transfer_class,
            **common,
            from_account=args.from_account,
            to_account=args.to_account,
            currency=args.currency,
            amount=canonical_amount(args.amount, args.currency),
            to_shards=args.to_shards,
        )
    status_class = {"freeze": Freeze, "unfreeze": Unfreeze, "close": Close}[name]
    return client_command(status_class, **common, account_id=args.account_id)


class ApiCallError(Exception):
    """The API did not answer, or answered an error: the message says which and why."""


def _route(command: Command) -> tuple[str, dict]:
    """The API route and JSON body of a command; the API sets actor and role itself."""
    body = {"transaction_id": command.transaction_id}
    if isinstance(command, OpenAccount):
        return "/v1/accounts", {
            **body,
            "account_id": command.account_id,
            "currency": command.currency,
            "kind": command.kind,
            **({"shards": command.shards} if command.shards != 1 else {}),
        }
    if isinstance(command, (Transfer, PayMerchant)):
        return "/v1/wallet/balance_transfer", {
            **body,
            "from_account": command.from_account,
            "to_account": command.to_account,
            "amount": command.amount,
            "currency": command.currency,
            "merchant_payment": isinstance(command, PayMerchant),
            **({"to_shards": command.to_shards} if command.to_shards != 1 else {}),
        }
    assert isinstance(command, (Deposit, Withdraw, Freeze, Unfreeze, Close, PlaceHold)), "no API route"
    account_path = f"/v1/accounts/{urllib.parse.quote(command.account_id, safe='')}"
    if isinstance(command, PlaceHold):
        return f"{account_path}/holds", {
            **body,
            "to_account": command.to_account,
            "amount": command.amount,
            "currency": command.currency,
            "expires_in_s": command.expires_in_ms // 1000,
        }
    path = f"{account_path}/{command_type(command)}"
    if isinstance(command, (Deposit, Withdraw)):
        return path, {**body, "amount": command.amount, "currency": command.currency}
    return path, body


def call_api(
    base_url: str, method: str, path: str, body: dict | None, timeout_s: float, token: str | None = None
) -> tuple[int, dict]:
    """One HTTP request with the bearer token (`WALLET_TOKEN` unless given): (status, JSON body)."""
    token = token if token is not None else os.environ.get("WALLET_TOKEN", "").strip()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base_url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except ValueError:
            return error.code, {"error": "http_error", "message": f"HTTP {error.code}"}
    except (OSError, ValueError) as error:
        raise ApiCallError(
            f"the wallet API at {base_url} did not answer: {error} (is the stack up? `wallet up`)"
        ) from None


def _api_failure(status: int, body: dict) -> ApiCallError:
    hint = ""
    if status == 401:
        hint = ' (set WALLET_TOKEN: `export WALLET_TOKEN=$(wallet auth token --sub NAME --scope "wallet:user")`)'
    return ApiCallError(f"HTTP {status} {body.get('error', '')}: {body.get('message', body)}{hint}")


def _hold_settling(args: argparse.Namespace) -> tuple[str, dict, str]:
    """(path, body, command type) of a capture or a void: the API finds the hold's account and currency."""
    own_id = {"capture": "capture_id", "void": "void_id"}[args.command_name]
    for name, value, length_max in (
        ("hold id", args.hold_id, TRANSACTION_ID_LENGTH_MAX),
        ("--tx", args.transaction_id, TRANSACTION_ID_LENGTH_MAX),
        ("--account", args.account, ACCOUNT_ID_LENGTH_MAX),
    ):
        if value is not None and not is_valid_id(value, length_max):
            raise ValueError(
                f"{name} {value!r} must be 1 to {length_max} characters, start with a letter or digit "
                "and contain only letters, digits and . _ : @ -"
            )
    body: dict[str, Any] = {} if args.transaction_id is None else {own_id: args.transaction_id}
    if args.command_name == "capture":
        body["final"] = args.final
        if args.amount is not None:
            body["amount"] = args.amount
    path = f"/v1/holds/{urllib.parse.quote(args.hold_id, safe='')}/{args.command_name}{_account_query(args.account)}"
    return path, body, f"{args.command_name}_hold"


def _account_query(account: str | None, separator: str = "?") -> str:
    return f"{separator}account_id={urllib.parse.quote(account, safe='')}" if account else ""


def _run_command(args: argparse.Namespace) -> int:
    if args.command_name in ("capture", "void"):
        path, body, what = _hold_settling(args)
        of_hold = f" of hold {args.hold_id}"
    else:
        command = build_command(args)
        check_ids(command)
        path, body = _route(command)
        what, of_hold = command_type(command), ""
    wait_ms = min(int(args.wait_s * 1000), REQUEST_WAIT_MS_MAX)
    started_s = time.monotonic()
    separator = "&" if "?" in path else "?"
    status, reply = call_api(
        args.api, "POST", f"{path}{separator}wait_ms={wait_ms}", body, wait_ms / 1000 + HTTP_TIMEOUT_MARGIN_S
    )
    elapsed_ms = (time.monotonic() - started_s) * 1000
    if status not in (200, 202):
        raise _api_failure(status, reply)
    what = f"{what} {reply['transaction_id']}{of_hold}"
    if status == 202:
        print(
            f"pending: {what} was published but its outcome was not known within {args.wait_s:.0f} s; "
            f"ask later with `wallet status {reply['transaction_id']}`"
        )
        return EXIT_PENDING
    return _report_final(reply, what, f" ({elapsed_ms:.0f} ms)")


def _show_hold(args: argparse.Namespace) -> int:
    status, reply = call_api(
        args.api,
        "GET",
        f"/v1/holds/{urllib.parse.quote(args.hold_id, safe='')}{_account_query(args.account)}",
        None,
        HTTP_TIMEOUT_MARGIN_S,
    )
    if status != 200:
        raise _api_failure(status, reply)
    print("\n".join(hold_lines(reply)))
    return EXIT_SUCCESS


def hold_lines(hold: dict) -> list[str]:
    """A hold as the API answers it (`GET /v1/holds/{id}`), for a person."""
    currency = hold["currency"]
    return [
        f"hold {hold['hold_id']}: {hold['account_id']} -> {hold['to_account']}, "
        f"{hold['amount']} {currency}, {hold['state']}",
        f"  captured {hold['captured']}, released {hold['released']}, still held {hold['held']} {currency}",
        f"  placed {_iso_utc(hold['placed_ms'])}, expires {_iso_utc(hold['expires_ms'])}",
    ]


def _iso_utc(epoch_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_ms // 1000)) + f".{epoch_ms % 1000:03d}Z"


def _status(args: argparse.Namespace) -> int:
    status, reply = call_api(
        args.api,
        "GET",
        f"/v1/transactions/{urllib.parse.quote(args.transaction_id, safe='')}{_account_query(args.account)}",
        None,
        HTTP_TIMEOUT_MARGIN_S,
    )
    if status != 200:
        raise _api_failure(status, reply)
    if reply.get("status") in ("unknown", "pending"):
        print(
            f"{reply['status']}: no final outcome for {args.transaction_id} of yours yet "
            "(still in flight, never published, or another caller's)"
        )
        return EXIT_PENDING
    return _report_final(reply, args.transaction_id, "")


def _report_final(reply: dict, what: str, note: str) -> int:
    if reply.get("status") == "success":
        print(f"success: {what}{note}")
        return EXIT_SUCCESS
    print(f"failure: {what}: {reply.get('reason')}{note}")
    return EXIT_FAILURE


def _register_auth(subparsers: argparse._SubParsersAction) -> None:
    auth = subparsers.add_parser("auth", help="bearer tokens for the local API")
    actions = auth.add_subparsers(dest="auth_action", metavar="ACTION", required=True)
    token = actions.add_parser(
        "token",
        help="print a token signed by the run folder's key (HS256)",
        description="Prints a JWT with the claims sub and scope, signed with the local HS256 "
        "secret (WALLET_JWT_SECRET, else <run dir>/secrets/jwt-hs256). Scopes: "
        "wallet:user wallet:bank wallet:operator wallet:audit.",
    )
    token.add_argument("--sub", required=True, help="the principal: it becomes the actor of its commands")
    token.add_argument("--scope", required=True, help='space-separated scopes, e.g. "wallet:user"')
    token.add_argument("--ttl-s", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.set_defaults(handler=_reporting_errors(_auth_token))


def _auth_token(args: argparse.Namespace) -> int:
    from infra.secrets import jwt_secret
    from producers.auth import issue_token

    if args.ttl_s < 1:
        raise ValueError("--ttl-s must be at least 1")
    print(issue_token(jwt_secret(settings_from_args(args)), args.sub, args.scope, args.ttl_s))
    return EXIT_SUCCESS


def _register_load(subparsers: argparse._SubParsersAction) -> None:
    load = subparsers.add_parser(
        "load",
        help="open and fund accounts, offer transfers at a rate, report throughput and outcomes",
        description="Opens and funds --accounts accounts, then publishes transfers at --tps (unbounded if "
        "omitted) for --duration seconds or --count transfers, waits for their outcomes and prints "
        "the achieved throughput and the outcome mix.",
    )
    load.add_argument(
        "--accounts", type=int, default=ACCOUNTS_DEFAULT, help=f"accounts to open and fund (default {ACCOUNTS_DEFAULT})"
    )
    load.add_argument("--tps", type=float, help="offered transfers per second (default: as fast as possible)")
    load.add_argument("--duration", type=float, help="seconds to publish for")
    load.add_argument("--count", type=int, help="transfers to publish")
    load.add_argument(
        "--zipf",
        type=float,
        default=0.0,
        help="skew: Zipf exponent of how often an account is picked (default 0: uniform)",
    )
    load.add_argument("--currency", default="USD")
    load.add_argument(
        "--missing-receiver-share",
        type=float,
        default=0.0,
        help="share of transfers to accounts that do not exist (refunded; default 0)",
    )
    load.add_argument(
        "--outcome-wait-s",
        type=float,
        default=OUTCOME_WAIT_S_DEFAULT,
        help=f"how long to wait for the outcomes after publishing (default {OUTCOME_WAIT_S_DEFAULT:.0f})",
    )
    load.add_argument("--no-progress", action="store_true", help="no progress bars")
    load.set_defaults(handler=_reporting_errors(_load))


def _load(args: argparse.Namespace) -> int:
    if args.count is None and args.duration is None:
        print("error: give --count N, or --duration S (with --tps R for a rate)", file=sys.stderr)
        return EXIT_FAILURE
    spec = LoadSpec(
        accounts=args.accounts,
        rate_per_s=args.tps,
        duration_s=args.duration,
        count=args.count,
        zipf_s=args.zipf,
        currency=args.currency,
        missing_receiver_share=args.missing_receiver_share,
        outcome_wait_s=args.outcome_wait_s,
    )
    try:
        report = run_load(settings_from_args(args), spec, progress=not args.no_progress)
    except LoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print("\n".join(report.lines(args.tps)))
    return EXIT_SUCCESS if report.missing == 0 else EXIT_PENDING
