"""`wallet top`: a live terminal view of a running stack, from its processes' Prometheus metrics.

It finds the processes in the stack's process list (`wallet ps`: each service's `metrics_port`),
reads every metrics endpoint once per refresh and shows what changed between two readings: per
processor commands/s, commits/s, commit latency p99, consumer lag, dead letters; for the read model
records/s and lag; for the API requests/s, p99 latency, 202 pending answers/s and refusals; and the
money in flight per currency over all processors. `q` quits. `--once` reads twice, one interval
apart, prints one frame and exits: for scripts, logs and machines without a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from infra.metrics import Scrape, ScrapeError, bucket_increase, histogram_quantile, rate_per_s, scrape
from infra.settings import Settings, settings_from_args
from streams.core.currencies import MINOR_UNITS
from streams.core.money import format_amount
from wallet.stack import ManagedProcess, reporting_errors, running_processes

REFRESH_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0  # the read model's lag asks Kafka while it is scraped
WIDTH_WITHOUT_TERMINAL = 132
QUIT_KEYS = frozenset("qQ")

P = "wallet_processor_"
R = "wallet_readmodel_"
A = "wallet_api_"


def register(subparsers: argparse._SubParsersAction) -> None:
    top = subparsers.add_parser("top", help="live view of the running stack from its metrics (q quits)")
    top.add_argument("--once", action="store_true", help="print one frame (two readings one interval apart) and exit")
    top.add_argument(
        "--interval-s",
        type=float,
        default=REFRESH_INTERVAL_S,
        help=f"seconds between readings (default {REFRESH_INTERVAL_S:g})",
    )
    top.set_defaults(handler=reporting_errors(_top))


@dataclass(frozen=True)
class Reading:
    """One process and what its metrics endpoint said (or why it said nothing)."""

    process: ManagedProcess
    scrape: Scrape | None
    error: str | None


def read_all(processes: list[ManagedProcess]) -> dict[str, Reading]:
    readings = {}
    for process in processes:
        if process.metrics_port is None:
            continue
        try:
            found = scrape(f"http://127.0.0.1:{process.metrics_port}/metrics", SCRAPE_TIMEOUT_S)
            readings[process.name] = Reading(process, found, None)
        except ScrapeError as error:
            readings[process.name] = Reading(process, None, str(error))
    return readings


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _rate(before: Scrape | None, after: Scrape, metric: str, **labels: str) -> str:
    return "-" if before is None else f"{rate_per_s(before, after, metric, **labels):,.0f}"


def _p99(before: Scrape | None, after: Scrape, histogram: str, **labels: str) -> float | None:
    """The p99 of what was observed between the readings; with no earlier reading, since the process started."""
    if before is None:
        return histogram_quantile(0.99, after.buckets(histogram, **labels))
    window = bucket_increase(before, after, histogram, **labels)
    return histogram_quantile(0.99, window)


def _money(amount_minor: float, currency: str) -> str:
    if currency not in MINOR_UNITS:  # a label the core would never write: shown as it came
        return f"{amount_minor:,.0f} minor units"
    return format_amount(int(amount_minor), currency)


def _add_money(
    money: dict[str, list[float]], found: Scrape, count_metric: str, amount_metric: str, column: int
) -> None:
    """Adds a count gauge and its amount gauge, by currency, to `money`'s columns `column` and `column + 1`."""
    for currency, count in found.by_label(count_metric, "currency").items():
        totals = money.setdefault(currency, [0.0, 0.0, 0.0, 0.0])
        totals[column] += count
        totals[column + 1] += found.total(amount_metric, currency=currency)


def _column_style(column: str, readings: dict[str, Reading]) -> dict:
    """A process's name is never cut short (it is what an operator looks for); numbers align right."""
    if column != "name":
        return {"justify": "right"}
    return {"justify": "left", "no_wrap": True, "min_width": max((len(name) for name in readings), default=4)}


def render(before: dict[str, Reading], after: dict[str, Reading], stack_empty: bool) -> Group:
    """One frame: what changed between two readings of every process."""
    if stack_empty:
        return Group(Text("nothing runs: start the stack with `wallet up`"))
    processors = Table(title="processors", title_justify="left", expand=False)
    for column in ("name", "pid", "commands/s", "commits/s", "commit p99 ms", "lag", "partitions", "dead letters"):
        processors.add_column(column, **_column_style(column, after))
    readmodels = Table(title="read model", title_justify="left")
    for column in ("name", "pid", "records/s", "apply p99 ms", "lag"):
        readmodels.add_column(column, **_column_style(column, after))
    apis = Table(title="API", title_justify="left")
    for column in ("name", "pid", "requests/s", "p99 ms", "pending (202)/s", "refused 401/403/429", "waiting"):
        apis.add_column(column, **_column_style(column, after))
    problems: list[str] = []
    # currency -> [transfers in flight, amount (the read model's), debits open, amount (the processors')]
    money: dict[str, list[float]] = {}
    dead_letters = 0.0
    for name, reading in sorted(after.items()):
        process, now = reading.process, reading.scrape
        if now is None:
            problems.append(f"{name} (pid {process.pid}): {reading.error}")
            continue
        earlier = before.get(name)
        then = earlier.scrape if earlier is not None and earlier.process.pid == process.pid else None

        if process.role == "processor":
            dead_letters += now.total(f"{P}dead_letters_total")
            _add_money(money, now, f"{P}debits_open", f"{P}debits_open_minor", 2)
            processors.add_row(
                name,
                str(process.pid),
                _rate(then, now, f"{P}commands_decided_total"),
                _rate(then, now, f"{P}transaction_commit_duration_seconds_count"),
                _ms(_p99(then, now, f"{P}transaction_commit_duration_seconds")),
                _count(now.total(f"{P}consumer_lag_records")),
                _count(now.total(f"{P}partitions_owned")),
                _count(now.total(f"{P}dead_letters_total")),
            )
        elif process.role == "readmodel":
            _add_money(money, now, f"{R}transfers_in_flight", f"{R}money_in_flight_minor", 0)
            readmodels.add_row(
                name,
                str(process.pid),
                _rate(then, now, f"{R}records_applied_total"),
                _ms(_p99(then, now, f"{R}batch_apply_duration_seconds")),
                _count(now.total(f"{R}lag_records")),
            )
        elif process.role == "api":
            refused = "/".join(_count(now.total(f"{A}refusals_total", status=code)) for code in ("401", "403", "429"))
            apis.add_row(
                name,
                str(process.pid),
                _rate(then, now, f"{A}request_duration_seconds_count"),
                _ms(_p99(then, now, f"{A}request_duration_seconds")),
                _rate(then, now, f"{A}command_answers_total", status="pending"),
                refused,
                _count(now.total(f"{A}outcome_waits")),
            )
    in_flight = Table(
        title="money in flight (read model: debited, neither credited nor refunded); debits the processors hold open",
        title_justify="left",
    )
    for column in ("currency", "transfers in flight", "amount in flight", "debits open", "amount open"):
        in_flight.add_column(column, justify="left" if column == "currency" else "right")
    for currency, (count, amount_minor, open_count, open_minor) in sorted(money.items()):
        in_flight.add_row(
            currency, _count(count), _money(amount_minor, currency), _count(open_count), _money(open_minor, currency)
        )
    if not money:
        in_flight.add_row("-", "0", "0", "0", "0")
    parts: list = [
        Text(
            f"streamwallet  {time.strftime('%H:%M:%S')}  dead letters since the processors started: {dead_letters:,.0f}"
        ),
        processors,
        readmodels,
        apis,
        in_flight,
    ]
    parts += [Text(f"no metrics from {problem}", style="red") for problem in problems]
    return Group(*parts)


@contextlib.contextmanager
def _keys_without_enter() -> Iterator[None]:
    """The terminal hands over each key as it is pressed (cbreak), and is put back afterwards."""
    descriptor = sys.stdin.fileno()
    saved = termios.tcgetattr(descriptor)
    tty.setcbreak(descriptor)
    try:
        yield
    finally:
        termios.tcsetattr(descriptor, termios.TCSADRAIN, saved)


def _quit_pressed_within(timeout_s: float) -> bool:
    deadline_s = time.monotonic() + timeout_s
    while (left_s := deadline_s - time.monotonic()) > 0:
        ready, _, _ = select.select([sys.stdin], [], [], left_s)
        if ready:
            key = sys.stdin.read(1)
            if key == "" or key in QUIT_KEYS:  # "" : the terminal went away
                return True
    return False


def _top(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.interval_s <= 0:
        print("error: --interval-s must be positive", file=sys.stderr)
        return 2
    if args.once:
        before = read_all(running_processes(settings))
        time.sleep(args.interval_s)
        processes = running_processes(settings)
        console = Console(width=None if sys.stdout.isatty() else WIDTH_WITHOUT_TERMINAL)
        console.print(render(before, read_all(processes), not processes))
        return 0
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("error: `wallet top` needs a terminal; use `wallet top --once` to print one frame", file=sys.stderr)
        return 2
    return _live(settings, args.interval_s)


def _live(settings: Settings, interval_s: float) -> int:
    before: dict[str, Reading] = {}
    with _keys_without_enter(), Live(Text("reading the stack's metrics..."), auto_refresh=False, screen=False) as live:
        while True:
            processes = running_processes(settings)
            after = read_all(processes)
            live.update(render(before, after, not processes), refresh=True)
            before = after
            if _quit_pressed_within(interval_s):
                return 0
