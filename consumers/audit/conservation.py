"""Conservation: per currency, Σ balances + Σ money in flight = Σ deposited − Σ withdrawn.

The balances are the ones the events state (each account's latest); the money in flight is the
sum over the transfers the replay lists as debited and not yet settled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from consumers.audit.violations import Kind, Violation
from schemas.commands import merchant_of_shard
from streams.core.money import format_amount
from streams.core.state import State


@dataclass(frozen=True, slots=True)
class CurrencyTotals:
    currency: str
    accounts: int
    deposited_minor: int
    withdrawn_minor: int
    balances_minor: int  # the balances the events state (each account's latest)
    in_flight_minor: int  # debited and not yet credited or refunded (the transfers listed)

    @property
    def created_minor(self) -> int:
        """Money the log makes out of nothing (negative: money it loses); 0 when conservation holds."""
        return self.balances_minor + self.in_flight_minor - (self.deposited_minor - self.withdrawn_minor)

    def to_json(self) -> dict:
        fmt = lambda minor: format_amount(minor, self.currency)  # noqa: E731
        return {
            "currency": self.currency,
            "accounts": self.accounts,
            "deposited": fmt(self.deposited_minor),
            "withdrawn": fmt(self.withdrawn_minor),
            "balances": fmt(self.balances_minor),
            "in_flight": fmt(self.in_flight_minor),
            "created": fmt(self.created_minor),
            "holds": self.created_minor == 0,
        }

    def violation(self, events_topic: str) -> Violation | None:
        if not self.created_minor:
            return None
        fmt = lambda minor: format_amount(minor, self.currency)  # noqa: E731
        return Violation(
            Kind.CONSERVATION,
            f"{self.currency}: balances {fmt(self.balances_minor)} + in flight "
            f"{fmt(self.in_flight_minor)} != deposited {fmt(self.deposited_minor)} - withdrawn "
            f"{fmt(self.withdrawn_minor)}: {fmt(abs(self.created_minor))} "
            f"{'created' if self.created_minor > 0 else 'destroyed'}",
            events_topic,
        )


def currency_totals(
    states: Iterable[State],
    misstated_minor: dict[str, int],
    flows: dict[str, list[int]],
    in_flight_minor: dict[str, int],
) -> list[CurrencyTotals]:
    """The totals per currency. `misstated_minor`: per account whose latest money event states a
    balance that does not follow, stated minus folded; `flows`: currency -> [deposited, withdrawn]."""
    balances_minor: dict[str, int] = {}
    account_counts: dict[str, int] = {}
    for state in states:
        for account_id, account in state.accounts.items():
            stated_minor = account.balance_minor + misstated_minor.get(account_id, 0)
            balances_minor[account.currency] = balances_minor.get(account.currency, 0) + stated_minor
            account_counts[account.currency] = account_counts.get(account.currency, 0) + 1
    totals = []
    for currency in sorted(set(balances_minor) | set(flows)):
        deposited, withdrawn = flows.get(currency, (0, 0))
        totals.append(
            CurrencyTotals(
                currency,
                account_counts.get(currency, 0),
                deposited,
                withdrawn,
                balances_minor.get(currency, 0),
                in_flight_minor.get(currency, 0),
            )
        )
    return totals


@dataclass(frozen=True, slots=True)
class ShardedMerchant:
    """A merchant split into shards (schemas.commands.shard_account_id): its balance is the sum of
    its shards' balances, each of them an ordinary account of the ledger counted above."""

    merchant: str
    currency: str
    shards: int  # shards found in the log, shard 0 (the merchant's own id) included
    balance_minor: int

    def to_json(self) -> dict:
        return {
            "merchant": self.merchant,
            "currency": self.currency,
            "shards": self.shards,
            "balance": format_amount(self.balance_minor, self.currency),
        }


def sharded_merchants(states: Iterable[State]) -> list[ShardedMerchant]:
    """Every merchant with a shard in the replayed states, with the total of its shards, by id."""
    accounts = {account_id: account for state in states for account_id, account in state.accounts.items()}
    shards_of: dict[str, list[str]] = {}
    for account_id in accounts:
        merchant = merchant_of_shard(account_id)
        if merchant is not None:
            shards_of.setdefault(merchant, [merchant] if merchant in accounts else []).append(account_id)
    return [
        ShardedMerchant(
            merchant,
            accounts[shard_ids[0]].currency,
            len(shard_ids),
            sum(accounts[shard_id].balance_minor for shard_id in shard_ids),
        )
        for merchant, shard_ids in sorted(shards_of.items())
    ]
