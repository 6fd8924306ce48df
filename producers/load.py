"""The load generator: open and fund accounts, offer transfers at a rate, tally their outcomes.

Publishing is batched (`CommandPublisher.publish_batch` on a producer that reports failed
deliveries only), so one Python thread can offer well over 100,000 transfers a second; the
outcomes are counted by a listener on the process's one `OutcomeWaiter`, never one future
per transfer.
"""

from __future__ import annotations

import collections
import itertools
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO, cast

from confluent_kafka import KafkaException
from tqdm import tqdm

from infra import log_reader
from infra.settings import Settings
from producers.client import (
    CommandPublisher,
    OutcomeWaiter,
    WalletClient,
    canonical_amount,
    local_command,
)
from schemas.codec import decode_event
from schemas.commands import Deposit, Freeze, OpenAccount, Transfer
from schemas.outcomes import Outcome
from schemas.partitioning import partition_for
from streams.core.money import format_amount, minor_units_of, parse_amount_minor
from streams.core.state import State, fold

# Transfers built and queued per step: big enough to amortise the Python overhead per call,
# small enough that a rate-limited run stays smooth at 10 ms resolution.
PUBLISH_SLICE_MAX = 5_000
RATE_TICK_S = 0.01
ACCOUNT_PICK_TABLE_SIZE = 1 << 16
ACCOUNTS_DEFAULT = 1000
SETUP_WAIT_S_DEFAULT = 120.0
OUTCOME_WAIT_S_DEFAULT = 300.0
WAITER_READY_TIMEOUT_S = 30.0
FLUSH_TIMEOUT_S = 120.0
LEDGER_READ_TIMEOUT_S = 60.0


class LoadError(RuntimeError):
    """The load could not be set up or run (accounts not opened, Kafka unavailable, ...)."""


@dataclass(frozen=True)
class LoadSpec:
    accounts: int = ACCOUNTS_DEFAULT
    # Offered rate in transfers per second; None offers as fast as the publisher can.
    rate_per_s: float | None = None
    duration_s: float | None = None
    count: int | None = None
    # Zipf exponent of how often an account is picked; 0 picks uniformly.
    zipf_s: float = 0.0
    currency: str = "USD"
    funding_amount: str = "1000.00"
    transfer_amount_max: str = "20.00"
    # Share of transfers sent to accounts that do not exist: they are debited, refused by the
    # receiving side and refunded, which exercises the saga's compensation.
    missing_receiver_share: float = 0.0
    # The last (least picked) accounts are frozen after funding: transfers to them are refunded,
    # transfers from them rejected.
    frozen_accounts: int = 0
    setup_wait_s: float = SETUP_WAIT_S_DEFAULT
    outcome_wait_s: float = OUTCOME_WAIT_S_DEFAULT
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        if self.accounts < 2:
            raise ValueError("a load needs at least 2 accounts")
        if self.count is None and self.duration_s is None:
            raise ValueError("give a count of transfers, a duration, or both")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ValueError("the rate must be positive (omit it for an unbounded rate)")
        if not 0 <= self.missing_receiver_share <= 1 or not 0 <= self.frozen_accounts < self.accounts:
            raise ValueError("missing_receiver_share must be within 0..1 and frozen_accounts below accounts")
        minor_units_of(self.currency)  # raises AmountError for an unknown currency

    @property
    def transfer_total(self) -> int | None:
        if self.count is not None:
            return self.count
        if self.rate_per_s is None:
            return None
        assert self.duration_s is not None  # __post_init__ requires a count or a duration
        return int(self.rate_per_s * self.duration_s)

    def account_ids(self) -> list[str]:
        return [f"load-{self.run_id}-{index}" for index in range(self.accounts)]


@dataclass
class LoadReport:
    published: int
    publish_s: float
    outcomes: collections.Counter  # (status, reason) -> count
    completion_s: float  # from the first publish to the last outcome counted

    @property
    def received(self) -> int:
        return sum(self.outcomes.values())

    @property
    def missing(self) -> int:
        return self.published - self.received

    @property
    def offered_rate_per_s(self) -> float:
        return self.published / self.publish_s if self.publish_s > 0 else 0.0

    @property
    def completed_rate_per_s(self) -> float:
        return self.received / self.completion_s if self.completion_s > 0 else 0.0

    def lines(self, target_rate_per_s: float | None) -> list[str]:
        target = f"target {target_rate_per_s:,.0f}/s" if target_rate_per_s else "rate unbounded"
        lines = [
            f"published {self.published:,} transfers in {self.publish_s:.2f} s: "
            f"{self.offered_rate_per_s:,.0f} transfers/s offered ({target})",
            f"outcomes: {self.received:,} of {self.published:,} in {self.completion_s:.2f} s from the first publish: "
            f"{self.completed_rate_per_s:,.0f} transfers/s end to end"
            + (f"; {self.missing:,} without an outcome yet" if self.missing else ""),
        ]
        for (status, reason), count in self.outcomes.most_common():
            share = 100 * count / self.received if self.received else 0.0
            lines.append(f"  {status:8} {reason or '':24} {count:>10,}  {share:5.1f}%")
        return lines


class OutcomeTally:
    """Counts the outcomes of one load run (by transaction id prefix), each id once."""

    def __init__(self, transaction_prefix: str) -> None:
        self._prefix = transaction_prefix
        self._seen: set[str] = set()
        self.counts: collections.Counter = collections.Counter()
        self.last_outcome_s = 0.0
        self._changed = threading.Condition()

    def __call__(self, outcomes: list[Outcome]) -> None:
        prefix, seen, counts = self._prefix, self._seen, self.counts
        fresh = False
        for outcome in outcomes:
            if outcome.transaction_id.startswith(prefix) and outcome.transaction_id not in seen:
                seen.add(outcome.transaction_id)
                counts[(outcome.status, outcome.reason)] += 1
                fresh = True
        if fresh:
            self.last_outcome_s = time.monotonic()
            with self._changed:
                self._changed.notify_all()

    @property
    def received(self) -> int:
        return len(self._seen)

    def wait_for(self, total: int, timeout_s: float, on_progress: Callable[[int], None]) -> bool:
        """Wait until `total` outcomes are counted; False if `timeout_s` ran out first."""
        deadline_s = time.monotonic() + timeout_s
        with self._changed:
            while self.received < total:
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    return False
                self._changed.wait(min(remaining_s, 0.2))
                on_progress(self.received)
        on_progress(self.received)
        return True


def setup_accounts(client: WalletClient, spec: LoadSpec, out: TextIO) -> list[str]:
    """Open and fund the run's accounts (and freeze the last `frozen_accounts`); raises LoadError unless all succeed."""
    account_ids = spec.account_ids()
    funding = canonical_amount(spec.funding_amount, spec.currency)
    phases = [
        (
            "open",
            [
                local_command(
                    OpenAccount, transaction_id=f"load-{spec.run_id}-open-{a}", account_id=a, currency=spec.currency
                )
                for a in account_ids
            ],
        ),
        (
            "fund",
            [
                local_command(
                    Deposit,
                    transaction_id=f"load-{spec.run_id}-fund-{a}",
                    account_id=a,
                    amount=funding,
                    currency=spec.currency,
                )
                for a in account_ids
            ],
        ),
        (
            "freeze",
            [
                local_command(Freeze, transaction_id=f"load-{spec.run_id}-freeze-{a}", account_id=a)
                for a in account_ids[len(account_ids) - spec.frozen_accounts :]
            ],
        ),
    ]
    for name, commands in phases:
        if not commands:
            continue
        started_s = time.monotonic()
        # Phases run one after the other: a deposit must not overtake its account's opening.
        outcomes = client.request_many(commands, spec.setup_wait_s)
        failures = collections.Counter(o.reason for o in outcomes.values() if o.status != "success")
        if len(outcomes) < len(commands) or failures:
            raise LoadError(
                f"{name} of {len(commands)} accounts: {len(outcomes)} answered within "
                f"{spec.setup_wait_s:.0f} s, failures {dict(failures)}"
            )
        print(f"{name}: {len(commands):,} accounts in {time.monotonic() - started_s:.2f} s", file=out)
    return account_ids


class _TransferFactory:
    """Builds the run's transfers: senders and receivers by the spec's skew, random amounts."""

    def __init__(self, spec: LoadSpec, account_ids: list[str], seed: int | None = None) -> None:
        self._spec = spec
        self._accounts = account_ids
        self._random = random.Random(seed)
        # Accounts drawn once by the skew into a table; picking uniformly from the table is
        # several times cheaper per transfer than a weighted draw.
        weights = [1.0 / (rank**spec.zipf_s) for rank in range(1, len(account_ids) + 1)]
        self._picks = (
            self._random.choices(
                range(len(account_ids)), cum_weights=list(itertools.accumulate(weights)), k=ACCOUNT_PICK_TABLE_SIZE
            )
            if spec.zipf_s
            else range(len(account_ids))
        )
        amount_minor_max = parse_amount_minor(spec.transfer_amount_max, spec.currency)
        # A fixed palette of amounts: drawing from a list is cheaper than formatting each one.
        self._amounts = [
            format_amount(minor, spec.currency)
            for minor in self._random.sample(range(1, amount_minor_max + 1), min(256, amount_minor_max))
        ]
        self._transaction_prefix = f"load-{spec.run_id}-t"

    @property
    def transaction_prefix(self) -> str:
        return self._transaction_prefix

    def build(self, first_index: int, count: int) -> list[Transfer]:
        pick = self._random.choices
        accounts = self._accounts
        account_count = len(accounts)
        senders = pick(self._picks, k=count)
        receivers = pick(self._picks, k=count)
        amounts = pick(self._amounts, k=count)
        missing_share = self._spec.missing_receiver_share
        draws = [self._random.random() for _ in range(count)] if missing_share else itertools.repeat(1.0)
        prefix, currency, run_id = self._transaction_prefix, self._spec.currency, self._spec.run_id
        transfers: list[Transfer] = []
        for offset, sender, receiver, amount, draw in zip(
            range(count), senders, receivers, amounts, draws, strict=False
        ):  # draws may be endless
            index = first_index + offset
            if draw < missing_share:
                to_account = f"load-{run_id}-missing-{index}"
            else:
                to_account = accounts[receiver if receiver != sender else (receiver + 1) % account_count]
            transfers.append(
                cast(
                    Transfer,
                    local_command(
                        Transfer,
                        transaction_id=f"{prefix}{index}",
                        from_account=accounts[sender],
                        to_account=to_account,
                        amount=amount,
                        currency=currency,
                    ),
                )
            )
        return transfers


def _publish_transfers(
    publisher: CommandPublisher, factory: _TransferFactory, spec: LoadSpec, progress: bool
) -> tuple[int, float]:
    """Offer transfers at the spec's rate; returns (published, seconds from the first to the last queued)."""
    total = spec.transfer_total
    # A rate and a duration make a count, which is then published in full, however late the
    # last slice; a duration alone (unbounded rate), or beside a count, is a deadline.
    is_deadline = spec.duration_s is not None and (spec.count is not None or spec.rate_per_s is None)
    deadline_s = spec.duration_s if is_deadline else None
    started_s = time.monotonic()
    published = 0
    with tqdm(total=total, unit="tx", desc="publishing", disable=not progress, smoothing=0.1) as bar:
        while total is None or published < total:
            elapsed_s = time.monotonic() - started_s
            if deadline_s is not None and elapsed_s >= deadline_s:
                break
            due = int(spec.rate_per_s * elapsed_s) if spec.rate_per_s is not None else published + PUBLISH_SLICE_MAX
            if total is not None:
                due = min(due, total)
            slice_size = min(due - published, PUBLISH_SLICE_MAX)
            if slice_size <= 0:
                time.sleep(RATE_TICK_S)
                continue
            transfers = factory.build(published, slice_size)
            publisher.publish_batch(transfers)
            published += slice_size
            bar.update(slice_size)
    return published, time.monotonic() - started_s


def run_load(settings: Settings, spec: LoadSpec, *, progress: bool = True, out: TextIO = sys.stdout) -> LoadReport:
    """Set up the accounts, offer the transfers, wait (bounded) for their outcomes, and report."""
    with OutcomeWaiter.from_settings(settings, cache_size_max=1000) as waiter:
        waiter.start(ready_timeout_s=WAITER_READY_TIMEOUT_S)
        with CommandPublisher.from_settings(settings, client_id="wallet-load-setup") as setup_publisher:
            account_ids = setup_accounts(WalletClient(setup_publisher, waiter), spec, out)
        factory = _TransferFactory(spec, account_ids)
        tally = OutcomeTally(factory.transaction_prefix)
        waiter.add_listener(tally)
        publisher = CommandPublisher.from_settings(
            settings, report_successes=False, linger_ms=20, client_id="wallet-load"
        )
        try:
            published, publish_s = _publish_transfers(publisher, factory, spec, progress)
            first_publish_s = time.monotonic() - publish_s
            publisher.flush(FLUSH_TIMEOUT_S)
        finally:
            publisher.close(0)
        with tqdm(total=published, initial=tally.received, unit="tx", desc="outcomes", disable=not progress) as bar:
            tally.wait_for(published, spec.outcome_wait_s, lambda received: bar.update(received - bar.n))
    last_s = tally.last_outcome_s if tally.received else time.monotonic()
    return LoadReport(published, publish_s, collections.Counter(tally.counts), last_s - first_publish_s)


def ledger_balances(settings: Settings, account_ids: list[str]) -> dict[str, str | None]:
    """Balances as a fold of `wallet.events` (the ledger), read up to its current end.

    Reads only the partitions that own the accounts. None for an account with no events.
    """
    try:
        partition_count = log_reader.partition_count(settings.bootstrap, settings.events_topic)
        partitions = sorted({partition_for(account, partition_count) for account in account_ids})
        log = log_reader.read_topic(
            settings.bootstrap, settings.events_topic, partitions=partitions, timeout_s=LEDGER_READ_TIMEOUT_S
        )
    except (log_reader.LogReadError, KafkaException) as error:
        raise LoadError(f"reading {settings.events_topic}: {error}") from None
    state = State()
    for partition in log.partitions.values():
        for value in partition.values:
            assert value is not None  # the ledger holds no tombstones
            fold(state, decode_event(value))
    balances = {}
    for account in account_ids:
        found = state.accounts.get(account)
        balances[account] = format_amount(found.balance_minor, found.currency) if found else None
    return balances
