"""Latency of HTTP `balance_transfer` round trips at a moderate, open-loop offered load.

Each request is scheduled at its own time (`rate_per_s` a second, whether earlier ones have
answered or not) and its latency is measured from that scheduled time to the answer, so a
stall shows up in the percentiles instead of silently lowering the offered rate
("coordinated omission"). Every transfer is between funded accounts and should succeed; the
status mix is reported so that a run with failures or pending answers is visible as such.

For `wallet bench api` (registered by benchmarks/cli.py): `add_arguments(parser)` and
`run(args)`; or call `measure_api_latency(base_url, ...)` directly against any running API.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import math
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

RATE_PER_S_DEFAULT = 200.0
TOKEN_TTL_S = 3600
DURATION_S_DEFAULT = 20.0
WARMUP_S_DEFAULT = 3.0
ACCOUNTS_DEFAULT = 100
# Requests in flight at most (one keep-alive connection per worker thread): beyond it a
# request waits for a worker, and the wait counts as latency. At ~250 ms a round trip, 256
# workers sustain about 1,000 requests a second. Plain threads and http.client rather than
# an async client: httpx's async pool costs grow with the requests queued in it and made
# the client, not the API, the bottleneck at a few hundred requests a second.
WORKERS = 256
REQUEST_TIMEOUT_S = 30.0
SETUP_WORKERS = 16
FUNDING = "1000000.00"
TRANSFER_AMOUNT = "0.01"


class BenchmarkError(RuntimeError):
    """The API could not be set up for the measurement (unreachable, setup commands failed)."""


@dataclass
class LatencyResult:
    requests: int
    offered_rate_per_s: float
    achieved_rate_per_s: float
    duration_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_max: float
    statuses: dict[str, int]  # "200 success", "202 pending", "503", "error: TimeoutError", ...

    def lines(self) -> list[str]:
        statuses = ", ".join(f"{status} x{count}" for status, count in sorted(self.statuses.items()))
        return [
            f"{self.requests:,} balance_transfer requests over {self.duration_s:.1f} s: offered "
            f"{self.offered_rate_per_s:,.0f}/s, answered {self.achieved_rate_per_s:,.0f}/s",
            f"latency ms: p50 {self.latency_ms_p50:.1f}  p95 {self.latency_ms_p95:.1f}  "
            f"p99 {self.latency_ms_p99:.1f}  max {self.latency_ms_max:.1f}",
            f"answers: {statuses}",
        ]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class _Connection:
    """One keep-alive HTTP connection per thread; reopened after an error."""

    def __init__(self, base_url: str) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._local = threading.local()

    def post(self, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        payload = json.dumps(body)
        reused = getattr(self._local, "connection", None) is not None
        try:
            return self._post(path, payload, headers)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            if not reused:
                raise
            # The server closed the idle keep-alive connection (uvicorn's 5 s idle timeout, at
            # low rates with many connections) before this request reached it: sent again on a
            # new connection, as HTTP clients do. Safe: every body carries its transaction_id.
            return self._post(path, payload, headers)

    def _post(self, path: str, body: str, headers: dict[str, str]) -> tuple[int, dict]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            assert self._host is not None, "the base URL names a host"
            connection = self._local.connection = http.client.HTTPConnection(
                self._host, self._port, timeout=REQUEST_TIMEOUT_S
            )
        try:
            connection.request("POST", path, body, headers)
            reply = connection.getresponse()
            return reply.status, json.loads(reply.read() or b"{}")
        except BaseException:
            connection.close()
            self._local.connection = None
            raise


class _Tokens:
    """Each account is owned by its own principal (so the per-principal rate limit is not what is
    measured); a bank principal funds them. Without a signing secret no token is sent."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret
        self._tokens: dict[str, str] = {}

    def __call__(self, sub: str, scope: str) -> str | None:
        if self._secret is None:
            return None
        if sub not in self._tokens:
            from producers.auth import issue_token

            self._tokens[sub] = issue_token(self._secret, sub, scope, ttl_s=TOKEN_TTL_S)
        return self._tokens[sub]


def _setup_accounts(connection: _Connection, run_id: str, accounts: int, currency: str, tokens: _Tokens) -> list[str]:
    account_ids = [f"bench-{run_id}-{index}" for index in range(accounts)]

    def command(path: str, body: dict, token: str | None) -> None:
        status, reply = connection.post(path, body, token)
        if status != 200 or reply.get("status") != "success":
            raise BenchmarkError(f"setup {path} answered {status}: {reply}")

    with ThreadPoolExecutor(SETUP_WORKERS) as pool:
        list(
            pool.map(
                lambda a: command(
                    "/v1/accounts",
                    {"account_id": a, "currency": currency, "transaction_id": f"{a}-open"},
                    tokens(a, "wallet:user"),
                ),
                account_ids,
            )
        )
        list(
            pool.map(
                lambda a: command(
                    f"/v1/accounts/{a}/deposit",
                    {"amount": FUNDING, "currency": currency, "transaction_id": f"{a}-fund"},
                    tokens(f"bench-{run_id}-bank", "wallet:bank"),
                ),
                account_ids,
            )
        )
    return account_ids


def _offer(
    connection: _Connection,
    account_ids: list[str],
    run_id: str,
    rate_per_s: float,
    duration_s: float,
    currency: str,
    label: str,
    tokens: _Tokens,
) -> tuple[list[float], collections.Counter, float]:
    count = int(rate_per_s * duration_s)
    latencies_ms: list[float] = []
    statuses: collections.Counter = collections.Counter()
    next_index = iter(range(count))
    lock = threading.Lock()
    started_s = time.monotonic()

    def work() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            scheduled_s = started_s + index / rate_per_s
            time.sleep(max(0.0, scheduled_s - time.monotonic()))
            sender = account_ids[index % len(account_ids)]
            receiver = account_ids[(index * 7 + 1) % len(account_ids)]
            if receiver == sender:
                receiver = account_ids[(index + 1) % len(account_ids)]
            body = {
                "from_account": sender,
                "to_account": receiver,
                "amount": TRANSFER_AMOUNT,
                "currency": currency,
                "transaction_id": f"bench-{run_id}-{label}-{index}",
            }
            try:
                status, reply = connection.post("/v1/wallet/balance_transfer", body, tokens(sender, "wallet:user"))
                outcome = f"{status} {reply.get('status', '')}".strip()
            except (OSError, http.client.HTTPException, ValueError) as error:
                outcome = f"error: {type(error).__name__}"
            with lock:
                statuses[outcome] += 1
                latencies_ms.append((time.monotonic() - scheduled_s) * 1000)

    with ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(work) for _ in range(WORKERS)]:
            future.result()
    return latencies_ms, statuses, time.monotonic() - started_s


def _measure(
    base_url: str, rate_per_s: float, duration_s: float, warmup_s: float, accounts: int, currency: str, tokens: _Tokens
) -> LatencyResult:
    run_id = uuid.uuid4().hex[:8]
    connection = _Connection(base_url)
    try:
        account_ids = _setup_accounts(connection, run_id, accounts, currency, tokens)
    except (OSError, http.client.HTTPException) as error:
        raise BenchmarkError(f"the API at {base_url} is unreachable: {error}") from None
    if warmup_s > 0:  # connections opened, the processor's batches flowing: not measured
        _offer(connection, account_ids, run_id, rate_per_s, warmup_s, currency, "warmup", tokens)
    latencies_ms, statuses, elapsed_s = _offer(
        connection, account_ids, run_id, rate_per_s, duration_s, currency, "measured", tokens
    )
    ordered = sorted(latencies_ms)
    return LatencyResult(
        requests=len(ordered),
        offered_rate_per_s=rate_per_s,
        achieved_rate_per_s=len(ordered) / elapsed_s,
        duration_s=elapsed_s,
        latency_ms_p50=percentile(ordered, 0.50),
        latency_ms_p95=percentile(ordered, 0.95),
        latency_ms_p99=percentile(ordered, 0.99),
        latency_ms_max=ordered[-1] if ordered else math.nan,
        statuses=dict(statuses),
    )


def measure_api_latency(
    base_url: str,
    *,
    rate_per_s: float = RATE_PER_S_DEFAULT,
    duration_s: float = DURATION_S_DEFAULT,
    warmup_s: float = WARMUP_S_DEFAULT,
    accounts: int = ACCOUNTS_DEFAULT,
    currency: str = "USD",
    jwt_secret: str | None = None,
) -> LatencyResult:
    """Open and fund `accounts` accounts through the API, warm up, then measure for `duration_s`.

    With `jwt_secret` (the API's HS256 key), every request carries a token signed with it, so
    the cost of authentication is part of what is measured.
    """
    if rate_per_s <= 0 or duration_s <= 0 or accounts < 2:
        raise ValueError("rate_per_s and duration_s must be positive and accounts at least 2")
    return _measure(base_url, rate_per_s, duration_s, warmup_s, accounts, currency, _Tokens(jwt_secret))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="base URL of a running API (default: the one `wallet up` started)")
    parser.add_argument(
        "--rate",
        type=float,
        default=RATE_PER_S_DEFAULT,
        help=f"offered requests per second (default {RATE_PER_S_DEFAULT:.0f})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=DURATION_S_DEFAULT,
        help=f"measured seconds (default {DURATION_S_DEFAULT:.0f})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=WARMUP_S_DEFAULT,
        help=f"unmeasured seconds first (default {WARMUP_S_DEFAULT:.0f})",
    )
    parser.add_argument(
        "--accounts",
        type=int,
        default=ACCOUNTS_DEFAULT,
        help=f"accounts the transfers move between (default {ACCOUNTS_DEFAULT})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from infra.secrets import jwt_secret
    from infra.settings import settings_from_args
    from wallet.stack import StackState, state_path

    url = args.url
    if url is None:
        state = StackState.load(state_path(settings_from_args(args)))
        if state is None:
            print("error: no --url given and no stack is up (start one with `wallet up`)")
            return 1
        url = state.api_url
    try:
        result = measure_api_latency(
            url,
            rate_per_s=args.rate,
            duration_s=args.duration,
            warmup_s=args.warmup,
            accounts=args.accounts,
            jwt_secret=jwt_secret(settings_from_args(args)),
        )
    except BenchmarkError as error:
        print(f"error: {error}")
        return 1
    print(json.dumps(asdict(result), indent=2) if args.json else "\n".join(result.lines()))
    return 0
