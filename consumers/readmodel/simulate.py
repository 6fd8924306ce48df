"""A realistic wallet log decided in-process by the core and published to real Kafka topics.

For the read model's benchmark and tests, which need `wallet.events` and `wallet.outcomes`
as the processor writes them without running one: commands go through
`streams.core.machine.apply` with one state per partition (as the processor keeps them),
saga legs are delivered a little later than the command that made them (so transfers are
in flight for a while, as live), and every event is published to the partition that owns
its account, inside Kafka transactions.
"""
from __future__ import annotations

import random
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
from confluent_kafka import Producer

from schemas.codec import encode
from schemas.commands import (
    Close, Command, CreditLeg, Deposit, Freeze, OpenAccount, PayMerchant, Transfer, Unfreeze, Withdraw, owner_account,
)
from schemas.events import Deposited, Event
from schemas.outcomes import Outcome
from schemas.partitioning import KAFKA_PARTITIONER, partition_for
from streams.core.machine import apply
from streams.core.money import format_amount
from streams.core.state import State
from wallet.config import Settings

TRANSACTION_TIMEOUT_S = 30
# How many saga legs wait before the next one is delivered: transfers stay in flight across
# this many later commands, as they do between partitions of a live processor.
LEG_DELAY_COMMANDS = 8
ABORTED_TRANSACTION_PREFIX = "aborted-"


@dataclass
class DecidedLog:
    records: list[Event | Outcome] = field(default_factory=list)  # in the order decided
    # Transfers whose credit leg was held back: debited, with no outcome ever.
    in_flight: set[str] = field(default_factory=set)

    @property
    def events(self) -> list[Event]:
        return [record for record in self.records if type(record) is not Outcome]

    @property
    def outcomes(self) -> list[Outcome]:
        return [record for record in self.records if type(record) is Outcome]


def decide(commands: Iterable[Command], partition_count: int, hold_legs_of: frozenset[str] = frozenset()) -> DecidedLog:
    """Runs client commands and the saga legs they cause through the core; `hold_legs_of`
    names transfers whose credit leg is never delivered."""
    states = [State() for _ in range(partition_count)]
    log = DecidedLog()
    legs: deque[Command] = deque()

    def run(command: Command) -> None:
        decision = apply(states[partition_for(owner_account(command), partition_count)], command)
        log.records.extend(decision.events)
        if decision.outcome is not None:
            log.records.append(decision.outcome)
        for follow_up in decision.follow_ups:
            if type(follow_up) is CreditLeg and follow_up.transaction_id in hold_legs_of:
                log.in_flight.add(follow_up.transaction_id)
            else:
                legs.append(follow_up)

    for command in commands:
        run(command)
        while len(legs) > LEG_DELAY_COMMANDS:
            run(legs.popleft())
    while legs:
        run(legs.popleft())
    return log


def workload(seed: int, account_count: int, operation_count: int, start_ts_ms: int = 1_700_000_000_000) -> list[Command]:
    """Client commands of a busy wallet: opens, deposits, transfers and merchant payments that
    succeed or are refunded (frozen receiver, missing receiver, other currency, not a merchant),
    withdrawals, freezes, closes, client retries and transaction ids reused with another payload."""
    rng = random.Random(seed)
    ts_ms = start_ts_ms
    commands: list[Command] = []
    currencies = {}
    kinds = {}

    def next_ts_ms() -> int:
        nonlocal ts_ms
        ts_ms += rng.randint(1, 40)
        return ts_ms

    def transaction_id() -> str:
        return f"tx-{seed}-{len(commands)}"

    def amount(currency: str, high_minor: int = 50_000) -> str:
        return format_amount(rng.randint(1, high_minor), currency)

    account_ids = [f"acct-{seed}-{index}" for index in range(account_count)]
    for account_id in account_ids:
        currencies[account_id] = rng.choices(["USD", "JPY", "BHD"], weights=[8, 1, 1])[0]
        kinds[account_id] = "merchant" if rng.random() < 0.15 else "user"
        commands.append(OpenAccount(transaction_id=transaction_id(), ts_ms=next_ts_ms(), account_id=account_id,
                                    currency=currencies[account_id], kind=kinds[account_id]))
        commands.append(Deposit(transaction_id=transaction_id(), ts_ms=next_ts_ms(), account_id=account_id,
                                amount=amount(currencies[account_id], 1_000_000), currency=currencies[account_id]))

    unfreezes_due: dict[int, list[str]] = {}
    for operation in range(operation_count):
        for frozen_account in unfreezes_due.pop(operation, ()):
            commands.append(Unfreeze(transaction_id=transaction_id(), ts_ms=next_ts_ms(), account_id=frozen_account))
        account_id = rng.choice(account_ids)
        currency = currencies[account_id]
        other = rng.choice(account_ids)
        roll = rng.random()
        if roll < 0.40:
            # Mostly the sender's currency; sometimes another one, refused by the receiver.
            to_account = other if rng.random() < 0.97 else f"missing-{rng.randint(0, 99)}"
            command: Command = Transfer(transaction_id=transaction_id(), ts_ms=next_ts_ms(), from_account=account_id,
                                        to_account=to_account, amount=amount(currency), currency=currency)
        elif roll < 0.50:
            command = PayMerchant(transaction_id=transaction_id(), ts_ms=next_ts_ms(), from_account=account_id,
                                  to_account=other, amount=amount(currency), currency=currency)
        elif roll < 0.68:
            command = Deposit(transaction_id=transaction_id(), ts_ms=next_ts_ms(), account_id=account_id,
                              amount=amount(currency), currency=currency)
        elif roll < 0.80:
            command = Withdraw(transaction_id=transaction_id(), ts_ms=next_ts_ms(), account_id=account_id,
                               amount=amount(currency), currency=currency)
        elif roll < 0.83:
            command = Freeze(transaction_id=transaction_id(), ts_ms=next_ts_ms(), account_id=account_id)
            unfreezes_due.setdefault(operation + rng.randint(5, 60), []).append(account_id)
        elif roll < 0.84:
            command = Close(transaction_id=transaction_id(), ts_ms=next_ts_ms(), account_id=account_id)
        elif roll < 0.92:
            # A client retry: the same request again (same id, same payload) a little later.
            command = msgspec.structs.replace(rng.choice(commands[-50:]), ts_ms=next_ts_ms())
        else:
            # A reused transaction id with another payload: a duplicate_conflict.
            reused = rng.choice(commands[-50:])
            owner = owner_account(reused)
            command = Deposit(transaction_id=reused.transaction_id, ts_ms=next_ts_ms(), account_id=owner,
                              amount=amount(currencies[owner]), currency=currencies[owner])
        commands.append(command)
    return commands


def publish(settings: Settings, log: DecidedLog, *, transaction_records_max: int = 2_000,
            aborted_transaction_at: int | None = None) -> None:
    """Publishes the log's events and outcomes in Kafka transactions of at most
    `transaction_records_max` records. With `aborted_transaction_at`, one transaction of
    forged records (a deposit event continuing a real account's sequence, an outcome) is
    written and aborted after that many records: read_committed readers must never see it."""
    producer = Producer({
        "bootstrap.servers": settings.bootstrap,
        "transactional.id": f"{settings.topic_prefix}simulate-{uuid.uuid4().hex[:8]}",
        "partitioner": KAFKA_PARTITIONER,
        "linger.ms": 20,
        "queue.buffering.max.messages": 1_000_000,
    })
    producer.init_transactions(TRANSACTION_TIMEOUT_S)
    records = [(settings.outcomes_topic, record.transaction_id, encode(record)) if type(record) is Outcome
               else (settings.events_topic, record.account_id, encode(record)) for record in log.records]
    # The topic's real partition count, not the settings' default: placement must match the processor's.
    metadata = producer.list_topics(settings.events_topic, timeout=TRANSACTION_TIMEOUT_S)
    partition_count = len(metadata.topics[settings.events_topic].partitions)
    for start in range(0, len(records), transaction_records_max):
        if aborted_transaction_at is not None and start <= aborted_transaction_at < start + transaction_records_max:
            _publish_aborted(producer, settings, log, partition_count)
        producer.begin_transaction()
        for topic, key, value in records[start:start + transaction_records_max]:
            # Events go to their account's partition as the processor places them; outcomes
            # are placed by the producer's partitioner from the transaction id.
            partition = partition_for(key, partition_count) if topic == settings.events_topic else -1
            _produce(producer, topic, key, value, partition)
        producer.commit_transaction(TRANSACTION_TIMEOUT_S)
    producer.flush(TRANSACTION_TIMEOUT_S)


def _publish_aborted(producer: Producer, settings: Settings, log: DecidedLog, partition_count: int) -> None:
    # A deposit taking a real deposit's place in its account's sequence, under another id.
    victim = next(record for record in log.records if type(record) is Deposited)
    forged_event = msgspec.structs.replace(victim, transaction_id=f"{ABORTED_TRANSACTION_PREFIX}event", digest="forged")
    forged_outcome = Outcome(transaction_id=f"{ABORTED_TRANSACTION_PREFIX}outcome", status="success", digest="forged")
    producer.begin_transaction()
    _produce(producer, settings.events_topic, victim.account_id, encode(forged_event),
             partition_for(victim.account_id, partition_count))
    _produce(producer, settings.outcomes_topic, forged_outcome.transaction_id, encode(forged_outcome), -1)
    # Flushed first so the aborted records really are in the log, not dropped unsent.
    producer.flush(TRANSACTION_TIMEOUT_S)
    producer.abort_transaction(TRANSACTION_TIMEOUT_S)


def _produce(producer: Producer, topic: str, key: str, value: bytes, partition: int) -> None:
    deadline_s = time.monotonic() + TRANSACTION_TIMEOUT_S
    while True:
        try:
            producer.produce(topic, key=key, value=value, partition=partition)
            return
        except BufferError:
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"the producer's queue did not drain within {TRANSACTION_TIMEOUT_S} s") from None
            producer.poll(0.1)  # the local queue is full: let deliveries drain it
