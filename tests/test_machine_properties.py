"""Properties of the state machine over random histories, through the multi-partition driver.

Hypothesis draws a program: client commands over a few accounts in USD, JPY and BHD (users
and merchants, one merchant sharded over four partitions and paid with a shard count the
client states: right, too small, too large or invalid) from random actors under random
roles, holds among them (placed with short, long and invalid expiries, captured whole or in
parts, final or not, voided, on hold ids that exist or not), the processors' ticks, client
retries of earlier commands with the same or another payload, the order in which the
partitions consume their records, and records an attacker injects among them: ticks that
name another partition, forged legs (unsigned or signed with a wrong key), copies of genuine
legs replayed, and malformed legs (non-positive or non-canonical amounts, other currencies,
shard openings of ids that are not a merchant's derived ids) signed with the processors' own
key, so that the core's own validation is what refuses them. Kafka's exactly-once processing
consumes each record once; duplicates come from clients (a retry of a transfer in flight
re-sends a leg) and attackers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.codec import command_digest, decode_command, encode
from schemas.commands import (
    HOLD_EXPIRY_MS_MAX,
    AccountKind,
    CaptureHold,
    Close,
    Command,
    CreditLeg,
    Deposit,
    Freeze,
    OpenAccount,
    OpenShard,
    PayMerchant,
    PlaceHold,
    RefundLeg,
    Tick,
    Transfer,
    Unfreeze,
    VoidHold,
    Withdraw,
    owner_account,
)
from schemas.events import HoldCaptured, HoldPlaced, TransferDebited
from schemas.leg_auth import LegKeyring
from streams.core.money import BALANCE_MINOR_MAX, canonical_minor, format_amount
from streams.core.state import IDEMPOTENCY_EVICT_STEP_MS, IDEMPOTENCY_WINDOW_MS
from tests.support.saga_driver import SagaDriver

PARTITION_COUNT = 3
# account -> (currency, kind); with 3 partitions every currency has accounts on two partitions
# and USD also two accounts on one, so transfers take both the cross- and same-partition path.
ACCOUNTS: dict[str, tuple[str, AccountKind]] = {
    "a0": ("USD", "user"),
    "a1": ("USD", "merchant"),
    "a5": ("USD", "user"),
    "a2": ("JPY", "user"),
    "a6": ("JPY", "merchant"),
    "a3": ("BHD", "merchant"),
    "a4": ("BHD", "user"),
    "m9": ("USD", "merchant"),
}
# m9 is opened with SHARDS shards (m9, m9::s1 .. m9::s3); its shard 1 is also a target of any
# command, and a client's attempt to open it by hand must be refused.
SHARDED_MERCHANT, SHARDS = "m9", 4
A_SHARD = "m9::s1"
# The shard counts a payer may state: the true one, too few (fewer shards used), too many (a
# missing shard refuses, the payer is refunded), and invalid ones.
STATED_SHARDS = (SHARDS, SHARDS, SHARDS, 2, 1, 6, 65, 0)
NEVER_OPENED = "a7"
ACCOUNT_IDS = sorted(ACCOUNTS) + [NEVER_OPENED, A_SHARD]
CURRENCIES = ("USD", "JPY", "BHD")
INVALID_AMOUNTS = ("0", "-1", "1e3", "1.0001", "", " ")
OPENING_DEPOSIT_MINOR = 5000  # enough for a few transfers of up to 3000 minor units each
TRANSACTION_ID_COUNT = 100  # small enough that ids collide across accounts and requests
START_MS = 1_700_000_000_000
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WRONG_KEYRING = LegKeyring.parse("p1:" + "a5" * 32)  # same key id as the processors', another key
MALFORMED_AMOUNTS = ("-5.00", "0.00", "-0.00", "-.50", "00005.00", "5.0", "1e3", "-5")

amounts = st.sampled_from(["minor"] * 9 + ["text"]).flatmap(
    lambda kind: st.tuples(st.just(kind), st.integers(1, 3000) if kind == "minor" else st.sampled_from(INVALID_AMOUNTS))
)
# None: the account's own currency, the usual case.
currency_choice = st.sampled_from([None] * 9 + ["other"]).flatmap(
    lambda choice: st.just(None) if choice is None else st.sampled_from(CURRENCIES + ("EUR",))
)
# The other side of a transfer: usually an account of the sender's currency ("peer", n), else any.
counterparties = st.sampled_from(["peer"] * 4 + ["any"]).flatmap(
    lambda kind: st.tuples(st.just(kind), st.integers(0, 9) if kind == "peer" else st.sampled_from(ACCOUNT_IDS))
)
# Who asks: usually the actor and role the rules expect, sometimes a stranger or the wrong role.
credentials = st.sampled_from(["proper"] * 8 + ["stranger", "wrong_role"])
client_specs = st.tuples(
    st.sampled_from(
        [
            "transfer",
            "deposit",
            "transfer",
            "pay_merchant",
            "withdraw",
            "transfer",
            "deposit",
            "freeze",
            "transfer",
            "unfreeze",
            "pay_merchant",
            "open",
            "transfer",
            "close",
            "pay_sharded",
            "pay_sharded",
            "place_hold",
            "capture_hold",
            "place_hold",
            "capture_hold",
            "capture_hold",
            "void_hold",
        ]
    ),
    st.sampled_from(ACCOUNT_IDS),
    counterparties,
    amounts,
    currency_choice,
    st.integers(0, TRANSACTION_ID_COUNT - 1),
    credentials,
    # Of a hold command: the hold id (a transaction id, so often one that was placed), whether a
    # capture is final, whether it takes all that is held (no amount), the place's expiry.
    st.tuples(
        st.integers(0, TRANSACTION_ID_COUNT - 1),
        st.booleans(),
        st.booleans(),
        st.sampled_from([1, 1500, 4000] + [60_000] * 4 + [HOLD_EXPIRY_MS_MAX] * 2 + [0, -5, HOLD_EXPIRY_MS_MAX + 1]),
    ),
)
# (kind, which genuine leg or account, amount in minor units, malformed amount)
injections = st.tuples(
    st.sampled_from(["replay", "replay", "unsigned", "wrong_key", "malformed", "other_currency", "shard", "misroute"]),
    st.integers(0, 10**6),
    st.integers(1, 3000),
    st.sampled_from(MALFORMED_AMOUNTS),
)
# Mostly new requests and consumption, some client retries.
action_arguments = {
    "send": client_specs,
    "step": st.integers(0, PARTITION_COUNT - 1),
    # A processor's tick to a partition: (its partition, the partition it names: forged if other).
    "tick": st.tuples(st.integers(0, PARTITION_COUNT - 1), st.sampled_from([None] * 5 + list(range(PARTITION_COUNT)))),
    # (which earlier request, same payload?, only among transfers?): transfers are what clients retry most.
    "retry": st.tuples(st.integers(0, 10**6), st.booleans(), st.booleans()),
    "inject": injections,
}
actions = st.sampled_from(["send"] * 4 + ["step"] * 5 + ["retry", "tick"]).flatmap(
    lambda action: st.tuples(st.just(action), action_arguments[action])
)
attacked_actions = st.sampled_from(["send"] * 4 + ["step"] * 5 + ["retry", "tick", "inject", "inject"]).flatmap(
    lambda action: st.tuples(st.just(action), action_arguments[action])
)
programs = st.lists(actions, min_size=30, max_size=150)
attacked_programs = st.lists(attacked_actions, min_size=30, max_size=150)
small_delays_ms = st.integers(0, 2000)
# Jumps of half and more than a whole idempotency window, so that partitions forget
# transaction ids while some of their transfers are still in flight and clients retry them.
window_delays_ms = st.one_of(
    small_delays_ms, st.sampled_from([IDEMPOTENCY_WINDOW_MS // 2, IDEMPOTENCY_WINDOW_MS + IDEMPOTENCY_EVICT_STEP_MS])
)


def credentials_of(kind: str, account_id: str, how: str) -> dict[str, str]:
    proper = {
        "deposit": ("bank", "bank"),
        "withdraw": ("bank", "bank"),
        "freeze": ("operator", "operator"),
        "unfreeze": ("operator", "operator"),
        "close": ("operator", "operator"),
    }.get(kind, (account_id, "user"))
    if how == "stranger":
        return {"actor": "mallory", "role": proper[1]}
    if how == "wrong_role":
        return {"actor": proper[0], "role": {"user": "operator", "bank": "user", "operator": "bank"}[proper[1]]}
    return {"actor": proper[0], "role": proper[1]}


# The hold part of a spec drawn before holds were (the regression programs below).
NO_HOLD_SPEC = (0, True, True, 60_000)


def client_command(spec: tuple) -> Command:
    (
        kind,
        account_id,
        (counterparty_kind, counterparty),
        (amount_kind, amount_value),
        currency_override,
        tx_id,
        how,
    ) = spec[:7]
    hold_tx_id, final, whole, expires_in_ms = spec[7] if len(spec) > 7 else NO_HOLD_SPEC
    planned_currency, planned_kind = ACCOUNTS.get(account_id, ("USD", "user"))
    if counterparty_kind == "peer":
        peers = [
            peer for peer, (currency, _) in ACCOUNTS.items() if currency == planned_currency and peer != account_id
        ]
        other_account = peers[counterparty % len(peers)]
    else:
        other_account = counterparty
    currency = currency_override or planned_currency
    amount = (
        format_amount(amount_value, currency if currency in CURRENCIES else "USD")
        if amount_kind == "minor"
        else amount_value
    )
    common: dict[str, Any] = dict(transaction_id=f"t{tx_id}", **credentials_of(kind, account_id, how))
    if kind == "open":
        return OpenAccount(**common, account_id=account_id, currency=currency, kind=planned_kind)
    if kind in ("deposit", "withdraw"):
        return (Deposit if kind == "deposit" else Withdraw)(
            **common, account_id=account_id, amount=amount, currency=currency
        )
    if kind == "pay_sharded":
        return PayMerchant(
            **common,
            from_account=account_id,
            to_account=SHARDED_MERCHANT,
            amount=amount,
            currency=currency,
            to_shards=STATED_SHARDS[tx_id % len(STATED_SHARDS)],
        )
    if kind in ("transfer", "pay_merchant"):
        return (Transfer if kind == "transfer" else PayMerchant)(
            **common, from_account=account_id, to_account=other_account, amount=amount, currency=currency
        )
    if kind == "place_hold":
        return PlaceHold(
            **common,
            account_id=account_id,
            to_account=other_account,
            amount=amount,
            currency=currency,
            expires_in_ms=expires_in_ms,
        )
    if kind == "capture_hold":
        return CaptureHold(
            **common, account_id=account_id, hold_id=f"t{hold_tx_id}", amount=None if whole else amount, final=final
        )
    if kind == "void_hold":
        return VoidHold(**common, account_id=account_id, hold_id=f"t{hold_tx_id}")
    status_classes: dict[str, type[Freeze | Unfreeze | Close]] = {
        "freeze": Freeze,
        "unfreeze": Unfreeze,
        "close": Close,
    }
    return status_classes[kind](**common, account_id=account_id)


def with_another_payload(command: Command) -> Command:
    """The request a client sends when it reuses a transaction id for something else."""
    if hasattr(command, "amount"):
        return msgspec.structs.replace(command, amount="2" if command.amount == "1" else "1")
    if isinstance(command, OpenAccount):
        return msgspec.structs.replace(command, kind="merchant" if command.kind == "user" else "user")
    if isinstance(command, VoidHold):
        return msgspec.structs.replace(command, hold_id=command.hold_id + "x")
    assert isinstance(command, (Freeze, Unfreeze, Close)), f"no variant of {command!r}"
    others: dict[type, type[Freeze | Unfreeze | Close]] = {Freeze: Unfreeze, Unfreeze: Close, Close: Freeze}
    other = others[type(command)]
    return other(
        transaction_id=command.transaction_id, actor=command.actor, role=command.role, account_id=command.account_id
    )


class History:
    """Plays a program through a driver, checking the money invariants after every step."""

    def __init__(self, delays_ms: list[int]) -> None:
        self.driver = SagaDriver(PARTITION_COUNT)
        self.delays_ms = delays_ms
        self.driver.clock_ms = START_MS
        self.sent: list[Command] = []
        self.injected = 0
        self.placed: list[tuple[str, str]] = []  # (account, hold id) of every place_hold sent

    def play(self, program: list[tuple]) -> None:
        for account_id in sorted(ACCOUNTS):
            currency, kind = ACCOUNTS[account_id]
            self.send(
                OpenAccount(
                    transaction_id=f"open-{account_id}",
                    actor=account_id,
                    role="user",
                    account_id=account_id,
                    currency=currency,
                    kind=kind,
                    shards=SHARDS if account_id == SHARDED_MERCHANT else 1,
                )
            )
            self.send(
                Deposit(
                    transaction_id=f"fund-{account_id}",
                    actor="bank",
                    role="bank",
                    account_id=account_id,
                    amount=format_amount(OPENING_DEPOSIT_MINOR, currency),
                    currency=currency,
                )
            )
        for index, (action, argument) in enumerate(program):
            self.driver.clock_ms += self.delays_ms[index % len(self.delays_ms)]
            if action == "send":
                self.send(self.aimed(client_command(argument)))
            elif action == "inject":
                self.inject(*argument)
            elif action == "retry":
                position, same_payload, transfers_only = argument
                pool = (
                    [command for command in self.sent if isinstance(command, (Transfer, PayMerchant, CaptureHold))]
                    if transfers_only
                    else self.sent
                )
                if pool:
                    earlier = pool[position % len(pool)]
                    if same_payload:
                        self.driver.retry(earlier)
                    else:
                        self.send(with_another_payload(earlier))
            elif action == "tick":
                self.driver.tick(*argument)
            elif action == "step" and (waiting := self.driver.waiting()):
                self.driver.step(argument if argument in waiting else waiting[argument % len(waiting)])
                self.check_money()
        self.driver.drain()
        self.check_money()

    def aimed(self, command: Command) -> Command:
        """A capture or void, most of the time, aimed at a hold placed earlier (its account and
        id, with the credentials the command was drawn with), so that captures and voids meet
        open, ended and expired holds and not only unknown ones."""
        if not isinstance(command, (CaptureHold, VoidHold)) or not self.placed:
            return command
        number = int(command.hold_id[1:])
        if number % 5 == 0:
            return command  # a hold id as drawn: usually one that was never placed
        account_id, hold_id = self.placed[number % len(self.placed)]
        actor = account_id if command.actor == command.account_id else command.actor
        # Ids of their own (c0..c99), colliding among captures and voids more than with the rest.
        transaction_id = "c" + command.transaction_id[1:]
        return msgspec.structs.replace(
            command, transaction_id=transaction_id, account_id=account_id, hold_id=hold_id, actor=actor
        )

    def send(self, command: Command) -> None:
        if isinstance(command, PlaceHold):
            self.placed.append((command.account_id, command.transaction_id))
        self.sent.append(command)
        self.driver.submit(command)

    def inject(self, kind: str, choice: int, amount_minor: int, malformed_amount: str) -> None:
        """An attacker appends a leg: a copy of a genuine one, or a forged or malformed one."""
        driver = self.driver
        self.injected += 1
        if kind == "replay":
            if driver.leg_records:
                driver.inject(*driver.leg_records[choice % len(driver.leg_records)])
            return
        if kind == "shard":
            self.inject_shard_opening(choice)
            return
        if kind == "misroute":
            # A copy of a client's request on a partition that does not own its account: once
            # answered failure there while its own partition decided it, two answers to one request.
            if self.sent:
                command = self.sent[choice % len(self.sent)]
                owner_partition = driver.partition_of(owner_account(command))
                driver.inject_at(
                    (owner_partition + 1 + choice % (PARTITION_COUNT - 1)) % PARTITION_COUNT, encode(command)
                )
            return
        sender, receiver = ACCOUNT_IDS[choice % len(ACCOUNT_IDS)], ACCOUNT_IDS[(choice // 7) % len(ACCOUNT_IDS)]
        currency = ACCOUNTS.get(receiver, ("USD", "user"))[0]
        fields: dict[str, Any] = dict(
            transaction_id=f"forged-{self.injected}",
            actor=sender,
            issued_ms=driver.clock_ms,
            from_account=sender,
            to_account=receiver,
            amount=format_amount(amount_minor, currency),
            currency=currency,
            digest=f"forged-{choice}",
        )
        leg: CreditLeg | RefundLeg = (
            CreditLeg(**fields)
            if choice % 2
            else RefundLeg(**fields, reason="account_frozen", debit_ms=driver.clock_ms)
        )
        if kind == "unsigned":
            driver.inject(owner_account(leg), encode(leg))
        elif kind == "wrong_key":
            driver.inject(owner_account(leg), encode(WRONG_KEYRING.sign(leg)))
        elif money_legs := [(owner, value) for owner, value in driver.leg_records if b'"open_shard"' not in value]:
            # A genuine leg altered, then signed with the processors' key: only the core's own
            # validation stands between it and the ledger.
            owner, value = money_legs[choice % len(money_legs)]
            genuine = decode_command(value)
            assert isinstance(genuine, (CreditLeg, RefundLeg))  # leg_records holds the legs emitted
            if kind == "malformed":
                altered = msgspec.structs.replace(genuine, amount=malformed_amount)
            else:
                other = {"USD": "JPY", "JPY": "BHD", "BHD": "USD"}[genuine.currency]
                altered = msgspec.structs.replace(
                    genuine,
                    currency=other,
                    amount=format_amount(canonical_minor(genuine.amount, genuine.currency), other),
                )
            if type(altered) is RefundLeg or kind == "malformed":
                driver.inject(owner, encode(driver.keyring.sign(altered)))

    def inject_shard_opening(self, choice: int) -> None:
        """An attacker tries to open a shard for itself: of a user's account, of the sharded
        merchant under another owner, or under an id that is not a derived one; unsigned or under
        a wrong key, and the last also under the processors' key (the core's validation refuses it)."""
        driver = self.driver
        victim = ACCOUNT_IDS[choice % len(ACCOUNT_IDS)]
        merchant = victim if "::" not in victim else SHARDED_MERCHANT
        index = 1 + choice % (SHARDS - 1)
        derived = choice % 3 != 0
        leg = OpenShard(
            transaction_id=f"forged-{self.injected}",
            actor="mallory",
            issued_ms=driver.clock_ms,
            account_id=f"{merchant}::s{index}" if derived else f"{merchant}-s{index}",
            merchant_account=merchant,
            shard_index=index,
            shards=SHARDS,
            owner="mallory",
            currency="USD",
            digest=f"forged-{choice}",
        )
        how = (choice // 3) % 3
        if how == 0:
            driver.inject(leg.account_id, encode(leg))
        elif how == 1:
            driver.inject(leg.account_id, encode(WRONG_KEYRING.sign(leg)))
        elif not derived:
            # Signed by the processors' key, only the core stands in the way: an id that is not
            # the merchant's derived one.
            driver.inject(leg.account_id, encode(driver.keyring.sign(leg)))

    def check_money(self) -> None:
        driver = self.driver
        balances = driver.balances()
        for currency in driver.currencies():
            assert (
                balances[currency] + driver.money.in_flight[currency]
                == driver.money.deposited[currency] - driver.money.withdrawn[currency]
            ), currency
            assert driver.money.in_flight[currency] >= 0, currency
        for partition in driver.partitions:
            state = partition.state
            for account_id, account in state.accounts.items():
                assert 0 <= account.balance_minor <= BALANCE_MINOR_MAX, account_id
                assert account.balance_minor + account.in_flight_minor <= BALANCE_MINOR_MAX, account_id
                assert 0 <= account.held_minor <= account.balance_minor, account_id  # available never negative
                assert account.held_minor == sum(
                    hold.held_minor for (holder, _), hold in state.holds.items() if holder == account_id
                ), account_id
            for key, hold in state.holds.items():
                assert hold.held_minor >= 0 and hold.captured_minor + hold.held_minor <= hold.amount_minor, key

    def check_settled(self) -> None:
        """After draining: nothing in flight, every debit credited or refunded exactly once."""
        assert not +self.driver.money.in_flight
        assert not self.driver.money.open_transfers

    def check_settled_or_with_the_operators(self) -> None:
        """After draining, across idempotency windows: every debit still in flight has a genuine
        leg in the DLQ, undecidable because the saga outlived the window: a refund that reached a
        sender that forgot the debit, or a credit leg older than the receiver may decide
        (LEG_DECIDABLE_AGE_MAX_MS); the audit lists it for an operator. Nothing else is in flight."""
        stranded: Counter = Counter()
        for letter in self.driver.dead_letters:
            command = letter.command
            if (
                isinstance(command, (CreditLeg, RefundLeg))
                and self.driver.keyring.verify(command, letter.value) is None
            ):
                stranded[(command.from_account, command.transaction_id, command.digest)] += 1
        for key, count in self.driver.money.open_transfers.items():
            assert count <= stranded[key], key

    def check_attacks_refused(self) -> None:
        """Every forged leg went to the DLQ; no forged transaction id reached an event or outcome."""
        for partition in range(PARTITION_COUNT):
            for event in self.driver.events(partition):
                assert not event.transaction_id.startswith("forged-"), event
        assert not [o for o in self.driver.outcomes if o.transaction_id.startswith("forged-")]

    def check_fold_rebuilds_state(self) -> None:
        for index, partition in enumerate(self.driver.partitions):
            rebuilt = self.driver.refold(index)
            assert rebuilt.accounts == partition.state.accounts
            assert rebuilt.memory == partition.state.memory
            assert rebuilt.holds == partition.state.holds
            assert rebuilt.clock_ms == partition.state.clock_ms

    def check_no_hold_captured_beyond_its_amount(self) -> None:
        """From the events alone: what a hold's captures took never passes what it held."""
        placed: dict[tuple[str, str], int] = {}
        captured: Counter = Counter()
        for partition in range(PARTITION_COUNT):
            for event in self.driver.events(partition):
                key = (event.account_id, getattr(event, "hold_id", ""))
                if isinstance(event, HoldPlaced):
                    placed[key] = canonical_minor(event.amount, event.currency)
                    captured[key] = 0
                elif isinstance(event, HoldCaptured):
                    captured[key] += canonical_minor(event.amount, event.currency)
                    assert captured[key] <= placed[key], event

    def check_forged_ticks_refused(self) -> None:
        """A tick found on another partition than the one it names decided nothing."""
        for letter in self.driver.dead_letters:
            if letter.command is None and b'"tick"' in letter.value:
                tick = decode_command(letter.value)
                assert isinstance(tick, Tick) and tick.partition != letter.partition

    def check_shards(self) -> None:
        """The sharded merchant's shards are open, each on its own id's partition, with the
        merchant's owner; no id with `::` exists but theirs; every credit to a shard is of a
        payment to the merchant, at the shard its transaction id picks."""
        shard_ids = {SHARDED_MERCHANT if index == 0 else f"{SHARDED_MERCHANT}::s{index}" for index in range(SHARDS)}
        for partition_index, partition in enumerate(self.driver.partitions):
            for account_id, account in partition.state.accounts.items():
                assert "::" not in account_id or account_id in shard_ids, account_id
                if account_id in shard_ids:
                    assert self.driver.partition_of(account_id) == partition_index
                    assert (account.owner, account.kind, account.currency) == (SHARDED_MERCHANT, "merchant", "USD")
        opened = {
            account_id
            for partition in self.driver.partitions
            for account_id in partition.state.accounts
            if account_id in shard_ids
        }
        assert opened == shard_ids

    def check_one_answer_per_request(self) -> None:
        answers: dict[tuple[str, str], set[bytes]] = defaultdict(set)
        for outcome in self.driver.outcomes:
            answers[(outcome.transaction_id, outcome.digest)].add(encode(outcome))
        for command in self.sent:
            request = (command.transaction_id, command_digest(command))
            assert len(answers[request]) == 1, (command, answers[request])
        for partition in range(PARTITION_COUNT):
            for event in self.driver.events(partition):
                if type(event) in (TransferDebited, HoldCaptured):
                    assert len(answers[(event.transaction_id, event.digest)]) == 1, event

    def records(self) -> list[list[bytes]]:
        return [partition.event_records for partition in self.driver.partitions] + [self.driver.outcome_records]


@PROPERTY_SETTINGS
@given(program=programs, delays_ms=st.lists(small_delays_ms, min_size=1, max_size=8))
def test_money_is_conserved_and_every_request_gets_one_answer(program: list[tuple], delays_ms: list[int]) -> None:
    history = History(delays_ms)
    history.play(program)
    history.check_settled()
    history.check_one_answer_per_request()
    history.check_fold_rebuilds_state()
    history.check_no_hold_captured_beyond_its_amount()
    history.check_forged_ticks_refused()
    history.check_shards()
    replay = History(delays_ms)
    replay.play(program)
    assert replay.records() == history.records()  # byte-identical events and outcomes


@PROPERTY_SETTINGS
@given(program=attacked_programs, delays_ms=st.lists(small_delays_ms, min_size=1, max_size=8))
def test_forged_replayed_and_malformed_legs_create_double_or_lose_no_money(
    program: list[tuple], delays_ms: list[int]
) -> None:
    history = History(delays_ms)
    history.play(program)
    history.check_settled()
    history.check_one_answer_per_request()
    history.check_fold_rebuilds_state()
    history.check_no_hold_captured_beyond_its_amount()
    history.check_forged_ticks_refused()
    history.check_attacks_refused()
    history.check_shards()


# Regressions found by the window property below, cut down by hand: on the first core (commit
# 42c12a7) both left money in flight for good. Unit versions are in test_machine_rules.
PAST_WINDOW_MS = IDEMPOTENCY_WINDOW_MS + IDEMPOTENCY_EVICT_STEP_MS
# a0 on partition 0, a1 on 2
TRANSFER_A0_TO_A1 = ("send", ("transfer", "a0", ("peer", 0), ("minor", 1), None, 0, "proper"))
DEPOSIT_A0 = ("send", ("deposit", "a0", ("peer", 0), ("minor", 1), None, 1, "proper"))
FREEZE_A1 = ("send", ("freeze", "a1", ("peer", 0), ("minor", 1), None, 2, "proper"))
DEPOSIT_A1 = ("send", ("deposit", "a1", ("peer", 0), ("minor", 1), None, 3, "proper"))
# The sender forgets t0 and debits its retry again; the quiet receiver still remembers crediting
# t0 and drops the second credit leg: the money stays in flight forever.
CREDIT_LEG_DROPPED = [TRANSFER_A0_TO_A1, DEPOSIT_A0, TRANSFER_A0_TO_A1]
# Both debits of t0 are refused by the frozen receiver, which forgot the first refusal; the
# sender, which remembers the first refund as t0's answer, drops the second refund leg.
REFUND_LEG_DROPPED = (
    [FREEZE_A1, TRANSFER_A0_TO_A1, DEPOSIT_A0, TRANSFER_A0_TO_A1]
    + [("step", 0)] * 9
    + [("step", 2)] * 4
    + [DEPOSIT_A1, ("step", 2)]
)


@PROPERTY_SETTINGS
@example(program=CREDIT_LEG_DROPPED, delays_ms=[PAST_WINDOW_MS])
@example(program=REFUND_LEG_DROPPED, delays_ms=[PAST_WINDOW_MS])
@given(program=programs, delays_ms=st.lists(window_delays_ms, min_size=1, max_size=8))
def test_money_is_conserved_when_retries_outlive_the_idempotency_window(
    program: list[tuple], delays_ms: list[int]
) -> None:
    # Across the window a retry is a new request and may get another answer; money must still
    # never be created, destroyed or left in flight.
    history = History(delays_ms)
    history.play(program)
    history.check_settled_or_with_the_operators()
    history.check_fold_rebuilds_state()
    history.check_no_hold_captured_beyond_its_amount()


@PROPERTY_SETTINGS
@given(program=attacked_programs, delays_ms=st.lists(window_delays_ms, min_size=1, max_size=8))
def test_replayed_legs_across_the_idempotency_window_create_no_money(
    program: list[tuple], delays_ms: list[int]
) -> None:
    history = History(delays_ms)
    history.play(program)
    history.check_settled_or_with_the_operators()
    history.check_fold_rebuilds_state()
    history.check_no_hold_captured_beyond_its_amount()
    history.check_attacks_refused()


def test_the_regression_programs_still_debit_one_transfer_twice() -> None:
    # They only guard something while they reach the double debit (partitioning, setup order).
    # With record times every step of these programs is more than a window after the last, so
    # the receiver may not decide a credit leg that waited a step (older than
    # LEG_DECIDABLE_AGE_MAX_MS: dead-lettered, the operators'); what matters is that no money is
    # created or lost.
    for program, undecidable in ((CREDIT_LEG_DROPPED, 1), (REFUND_LEG_DROPPED, 2)):
        history = History([PAST_WINDOW_MS])
        history.play(program)
        kinds = [
            type(event)
            for partition in range(PARTITION_COUNT)
            for event in history.driver.events(partition)
            if event.transaction_id == "t0"
        ]
        assert kinds.count(TransferDebited) == 2
        assert [type(letter.command) for letter in history.driver.dead_letters] == [CreditLeg] * undecidable
