"""The ceiling that is really one: the wallet's transfer saga as a bare confluent-kafka loop.

It does the processor's whole job on the same records with nothing but the job: consume a
batch of its commands topic (the bench writes it the same records, on the same partitions, as
ours; the loop sends its legs back into it, as ours does; read_committed, the processor's own
client settings), decide each record against a dict of balances, produce what ours produces
for it (events, legs, outcome, in the project's JSON and partitioner), send the consumed
offsets into the transaction, commit. No schema validation (records are decoded to plain
dicts), no idempotency memory, no state store, no dead-letter path, no metrics: whatever rate
it reaches is the most a Python transactional saga on this broker can reach, so ours is judged
against it. Where it must compute what ours computes (a digest on every message, a MAC on
every leg) it does, with the same primitives (BLAKE2b over the client command's bytes,
HMAC-SHA256/128 over the leg with mac ""). A leg whose account is on the partition that made it
is decided there at once and never written, as the processor does (streams.core.admission).

Run as `python -m benchmarks.saga_ceiling --commands-topic C --events-topic E
--outcomes-topic O ...`; it prints FIRST_RECORD_MARKER when its first batch arrives and runs
until SIGTERM (the harness stops it once every transfer has its outcome).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import signal
import sys
import time
from functools import lru_cache
from pathlib import Path

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from infra.kafka_clients import processor_consumer_config, processor_producer_config
from infra.produce import produce_with_room
from schemas.partitioning import partition_for
from streams.runtime.processor import ProcessorConfig

KAFKA_CALL_TIMEOUT_S = ProcessorConfig(instance_id="", store_path=Path()).kafka_call_timeout_ms / 1000
FIRST_RECORD_MARKER = "saga-ceiling: first record"
COMMANDS_TOPIC = "ceiling.commands"
EVENTS_TOPIC = "ceiling.events"
OUTCOMES_TOPIC = "ceiling.outcomes"
DIGEST_BYTES = 12
MAC_BYTES = 16

_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode


def _minor(amount: str) -> int:
    # No validation: the bench writes every amount with two decimals.
    whole, _, fraction = amount.partition(".")
    return int(whole) * 100 + int(fraction or 0)


def _text(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


class Saga:
    """The decisions, on a dict of accounts: account id -> [balance_minor, seq, owner]."""

    def __init__(
        self,
        produce,
        commands_topic: str,
        events_topic: str,
        outcomes_topic: str,
        leg_key_id: str,
        leg_key: bytes,
        partitions: int,
    ) -> None:
        self.accounts: dict[str, list] = {}
        self._partition_of = lru_cache(maxsize=1 << 20)(lambda account: partition_for(account, partitions))
        self._partition = -1  # of the record being decided
        self._produce = produce
        self._commands_topic = commands_topic
        self._events_topic = events_topic
        self._outcomes_topic = outcomes_topic
        self._kid = leg_key_id
        self._key = leg_key

    def decide(self, value: bytes, time_ms: int, partition: int) -> None:
        self._partition = partition
        command = _decode(value)
        kind = command["type"]
        if kind == "transfer":
            self._transfer(command, value, time_ms)
        elif kind == "credit_leg":
            self._credit(command, time_ms)
        elif kind == "refund_leg":
            self._refund(command, time_ms)
        elif kind == "open_account":
            self._open(command, value, time_ms)
        elif kind == "deposit":
            self._deposit(command, value, time_ms)
        else:
            raise ValueError(f"the saga ceiling implements transfers only, not {kind}")

    # -- steps -------------------------------------------------------------------------------

    def _transfer(self, command: dict, value: bytes, time_ms: int) -> None:
        sender_id = command["from_account"]
        digest = hashlib.blake2b(value, digest_size=DIGEST_BYTES).hexdigest()
        sender = self.accounts.get(sender_id)
        amount = command["amount"]
        amount_minor = _minor(amount)
        if sender is None:
            return self._reject(command, sender_id, sender_id, digest, "account_not_found", time_ms)
        if sender[0] < amount_minor:
            return self._reject(command, sender_id, sender_id, digest, "insufficient_funds", time_ms)
        sender[0] -= amount_minor
        sender[1] += 1
        to_account = command["to_account"]
        self._event(
            "transfer_debited",
            command,
            sender_id,
            digest,
            time_ms,
            seq=sender[1],
            amount=amount,
            currency=command["currency"],
            balance=_text(sender[0]),
            to_account=to_account,
            merchant_only=False,
        )
        self._leg(
            "credit_leg",
            to_account,
            command,
            time_ms,
            from_account=sender_id,
            to_account=to_account,
            amount=amount,
            currency=command["currency"],
            digest=digest,
            merchant_only=False,
            resend=False,
        )

    def _credit(self, leg: dict, time_ms: int) -> None:
        receiver_id, sender_id = leg["to_account"], leg["from_account"]
        receiver = self.accounts.get(receiver_id)
        if receiver is None:
            reason = "account_not_found"
            self._reject(
                leg,
                sender_id,
                receiver_id,
                leg["digest"],
                reason,
                time_ms,
                issued_ms=leg["issued_ms"],
                from_account=sender_id,
                answer=False,
            )
            self._leg(
                "refund_leg",
                sender_id,
                leg,
                time_ms,
                from_account=sender_id,
                to_account=receiver_id,
                amount=leg["amount"],
                currency=leg["currency"],
                digest=leg["digest"],
                reason=reason,
                debit_ms=leg["issued_ms"],
            )
            return
        receiver[0] += _minor(leg["amount"])
        receiver[1] += 1
        self._event(
            "transfer_credited",
            leg,
            receiver_id,
            leg["digest"],
            time_ms,
            seq=receiver[1],
            amount=leg["amount"],
            currency=leg["currency"],
            balance=_text(receiver[0]),
            from_account=sender_id,
            issued_ms=leg["issued_ms"],
        )
        self._answer(leg, sender_id, leg["digest"], None)

    def _refund(self, leg: dict, time_ms: int) -> None:
        sender_id = leg["from_account"]
        sender = self.accounts[sender_id]
        sender[0] += _minor(leg["amount"])
        sender[1] += 1
        self._event(
            "transfer_refunded",
            leg,
            sender_id,
            leg["digest"],
            time_ms,
            seq=sender[1],
            amount=leg["amount"],
            currency=leg["currency"],
            balance=_text(sender[0]),
            to_account=leg["to_account"],
            reason=leg["reason"],
        )
        self._answer(leg, sender_id, leg["digest"], leg["reason"])

    def _open(self, command: dict, value: bytes, time_ms: int) -> None:
        account_id = command["account_id"]
        digest = hashlib.blake2b(value, digest_size=DIGEST_BYTES).hexdigest()
        if account_id in self.accounts:
            return self._reject(command, account_id, account_id, digest, "account_exists", time_ms)
        actor = command["actor"]
        self.accounts[account_id] = [0, 1, actor]
        self._event(
            "account_opened",
            command,
            account_id,
            digest,
            time_ms,
            seq=1,
            owner=actor,
            currency=command["currency"],
            kind=command.get("kind", "user"),
            balance="0.00",
        )
        self._answer(command, account_id, digest, None)

    def _deposit(self, command: dict, value: bytes, time_ms: int) -> None:
        account_id = command["account_id"]
        digest = hashlib.blake2b(value, digest_size=DIGEST_BYTES).hexdigest()
        account = self.accounts.get(account_id)
        if account is None:
            return self._reject(command, account_id, account_id, digest, "account_not_found", time_ms)
        account[0] += _minor(command["amount"])
        account[1] += 1
        self._event(
            "deposited",
            command,
            account_id,
            digest,
            time_ms,
            seq=account[1],
            amount=command["amount"],
            currency=command["currency"],
            balance=_text(account[0]),
        )
        self._answer(command, account_id, digest, None)

    # -- messages ----------------------------------------------------------------------------

    def _event(self, event_type: str, cause: dict, account_id: str, digest: str, time_ms: int, **tail) -> None:
        """An event as the core encodes it: the common fields in the schema's order, then `tail`."""
        event = {
            "type": event_type,
            "v": cause["v"],
            "account_id": account_id,
            "transaction_id": cause["transaction_id"],
            "ts_ms": time_ms,
            "command": cause["type"],
            "digest": digest,
            "actor": cause["actor"],
            **tail,
        }
        self._produce(self._events_topic, _encode(event), account_id)

    def _reject(
        self,
        command: dict,
        owning_account: str,
        account_id: str,
        digest: str,
        reason: str,
        time_ms: int,
        issued_ms: int | None = None,
        from_account: str | None = None,
        answer: bool = True,
    ) -> None:
        self._event(
            "command_rejected",
            command,
            account_id,
            digest,
            time_ms,
            reason=reason,
            issued_ms=issued_ms,
            from_account=from_account,
        )
        if answer:
            self._answer(command, owning_account, digest, reason)

    def _answer(self, command: dict, owning_account: str, digest: str, reason: str | None) -> None:
        transaction_id = command["transaction_id"]
        outcome = {
            "type": "outcome",
            "v": command["v"],
            "transaction_id": transaction_id,
            "account_id": owning_account,
            "actor": command["actor"],
            "status": "success" if reason is None else "failure",
            "reason": reason,
            "digest": digest,
        }
        self._produce(self._outcomes_topic, _encode(outcome), transaction_id)

    def _leg(self, leg_type: str, key: str, cause: dict, time_ms: int, **tail) -> None:
        """A saga leg as the core builds it (the common fields in the schema's order, then `tail`),
        signed as the processor signs it: HMAC over the leg with mac "", or decided at once when
        `key` is on the partition deciding the cause."""
        leg = {
            "type": leg_type,
            "v": cause["v"],
            "transaction_id": cause["transaction_id"],
            "actor": cause["actor"],
            "issued_ms": time_ms,
            "kid": self._kid,
            "mac": "",
            **tail,
        }
        if self._partition_of(key) == self._partition:
            (self._credit if leg_type == "credit_leg" else self._refund)(leg, time_ms)
            return
        leg["mac"] = hmac.new(self._key, _encode(leg), "sha256").digest()[:MAC_BYTES].hex()
        self._produce(self._commands_topic, _encode(leg), key)


def run(
    bootstrap: str,
    commands_topic: str,
    events_topic: str,
    outcomes_topic: str,
    group_id: str,
    leg_key: str,
    batch_size_max: int,
    commit_interval_ms: int,
    transaction_timeout_ms: int,
    partitions: int,
) -> int:
    consumer = Consumer(processor_consumer_config(bootstrap, group_id, "ceiling"))
    producer = Producer(processor_producer_config(bootstrap, f"{group_id}-ceiling", transaction_timeout_ms))
    raw_produce = producer.produce

    def produce(topic: str, value: bytes, key: str) -> None:
        try:
            raw_produce(topic, value, key)
        except BufferError:
            produce_with_room(producer, topic, value, key)

    key_id, _, key_hex = leg_key.partition(":")
    saga = Saga(produce, commands_topic, events_topic, outcomes_topic, key_id, bytes.fromhex(key_hex), partitions)
    stopping = False

    def stop(*_signal_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    producer.init_transactions(KAFKA_CALL_TIMEOUT_S)
    consumer.subscribe([commands_topic])
    decide = saga.decide
    first = True
    transactions = 0
    try:
        while not stopping:
            records = consumer.consume(num_messages=batch_size_max, timeout=commit_interval_ms / 1000)
            if not records:
                continue
            if first:
                print(FIRST_RECORD_MARKER, flush=True)
                first = False
            next_offsets: dict[int, int] = {}
            producer.begin_transaction()
            for record in records:
                error = record.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    continue
                decide(record.value(), record.timestamp()[1], record.partition())  # type: ignore[arg-type]
                next_offsets[record.partition()] = record.offset() + 1  # type: ignore[index, operator]
            producer.send_offsets_to_transaction(
                [TopicPartition(commands_topic, partition, offset) for partition, offset in next_offsets.items()],
                consumer.consumer_group_metadata(),
                KAFKA_CALL_TIMEOUT_S,
            )
            producer.commit_transaction(KAFKA_CALL_TIMEOUT_S)
            transactions += 1
    finally:
        consumer.close()
        producer.flush(KAFKA_CALL_TIMEOUT_S)
    print(f'{{"transactions": {transactions}, "accounts": {len(saga.accounts)}}}', flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    defaults = ProcessorConfig(instance_id="", store_path=Path())
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saga_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--commands-topic", required=True)
    parser.add_argument("--events-topic", required=True)
    parser.add_argument("--outcomes-topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--leg-key", required=True, help="kid:hex, the key that signs the loop's legs")
    parser.add_argument("--batch-size-max", type=int, default=defaults.batch_size_max)
    parser.add_argument("--commit-interval-ms", type=int, default=defaults.commit_interval_ms)
    parser.add_argument("--transaction-timeout-ms", type=int, default=defaults.transaction_timeout_ms)
    parser.add_argument(
        "--partitions", type=int, required=True, help="of the commands topic: which legs stay on their partition"
    )
    args = parser.parse_args(argv)
    started_s = time.monotonic()
    try:
        return run(
            args.bootstrap,
            args.commands_topic,
            args.events_topic,
            args.outcomes_topic,
            args.group_id,
            args.leg_key,
            args.batch_size_max,
            args.commit_interval_ms,
            args.transaction_timeout_ms,
            args.partitions,
        )
    except KafkaException as error:
        print(f"saga ceiling failed after {time.monotonic() - started_s:.1f} s: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
