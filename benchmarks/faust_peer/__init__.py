"""The peer a Python user would otherwise pick: the same transfer saga on faust-streaming.

One agent on a commands topic keyed by account, with a Table of balances (minor units) kept
by faust (changelog topic, in-memory store). The logic is the saga of the wallet, reduced to
balances: a transfer debits the sender and sends a credit leg keyed by the receiver back
through the commands topic; the credit leg credits the receiver and emits the outcome, or,
if the receiver does not exist, sends a refund leg back to the sender, which refunds and
emits a failure. Commands, legs and outcomes are the project's own wire format
(`schemas/`), so the input is byte for byte what the wallet processor reads.

Run it as a faust worker: `python -m benchmarks.faust_peer --bootstrap HOST:PORT
--topic-prefix P --data-dir DIR [--guarantee exactly_once] worker -l warn`. It reads
`<P>faust.commands` and writes `<P>faust.outcomes` (both must exist); faust creates its own
changelog topic. When the agent takes its first record it writes FIRST_RECORD_MARKER on
file descriptor 1 (the faust worker sends `print` to its logger, not to stdout), so a
harness can start its clock there, as it does for the wallet processor.
"""

from __future__ import annotations

import os
from typing import Any

import faust

from schemas.codec import command_digest, decode_command, encode
from schemas.commands import CreditLeg, Deposit, OpenAccount, RefundLeg, Transfer
from schemas.outcomes import Outcome, Reason
from streams.core.money import parse_amount_minor

COMMANDS_TOPIC = "faust.commands"
OUTCOMES_TOPIC = "faust.outcomes"
FIRST_RECORD_MARKER = "faust-peer: first record"
APP_NAME = "faust-peer"
BALANCES_TABLE = "balances"
# faust names a table's changelog `<app id>-<table>-changelog`. The bench creates it beforehand:
# faust's own creation raced its metadata on a loaded machine (PartitionsMismatch, "0 partitions").
CHANGELOG_TOPIC = f"{APP_NAME}-{BALANCES_TABLE}-changelog"
GUARANTEES = ("exactly_once", "at_least_once")


def create_app(bootstrap: str, topic_prefix: str, guarantee: str, partitions: int, data_dir: str) -> faust.App:
    app = faust.App(
        f"{topic_prefix}{APP_NAME}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=data_dir,
        processing_guarantee=guarantee,
        topic_partitions=partitions,
        topic_replication_factor=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
    )
    # faust's topic() options, of many types: Any lets them through its keyword signature.
    raw: dict[str, Any] = dict(
        key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw", partitions=partitions
    )
    commands = app.topic(f"{topic_prefix}{COMMANDS_TOPIC}", **raw)
    outcomes = app.topic(f"{topic_prefix}{OUTCOMES_TOPIC}", **raw)
    # faust's defaults serialise the changelog: key raw (a str key), value JSON (an int).
    balances = app.Table(BALANCES_TABLE, key_type=str, value_type=int, partitions=partitions)
    first_record_seen = False

    async def answer(transaction_id: str, digest: str, reason: str | None = None) -> None:
        # The peer keeps no owners: its answers name no account or actor.
        outcome = Outcome(
            transaction_id=transaction_id,
            account_id="",
            actor="",
            status="success" if reason is None else "failure",
            reason=reason,
            digest=digest,
        )
        await outcomes.send(key=transaction_id, value=encode(outcome))

    @app.agent(commands)
    async def saga(stream):
        nonlocal first_record_seen
        async for value in stream:
            if not first_record_seen:
                first_record_seen = True
                os.write(1, f"{FIRST_RECORD_MARKER}\n".encode())
            command = decode_command(value)
            kind = type(command)
            if kind is Transfer:
                digest = command_digest(command)
                amount_minor = parse_amount_minor(command.amount, command.currency)
                balance_minor = balances.get(command.from_account)
                if balance_minor is None:
                    await answer(command.transaction_id, digest, Reason.ACCOUNT_NOT_FOUND)
                elif balance_minor < amount_minor:
                    await answer(command.transaction_id, digest, Reason.INSUFFICIENT_FUNDS)
                else:
                    balances[command.from_account] = balance_minor - amount_minor
                    leg = CreditLeg(
                        transaction_id=command.transaction_id,
                        actor=command.actor,
                        issued_ms=0,
                        from_account=command.from_account,
                        to_account=command.to_account,
                        amount=command.amount,
                        currency=command.currency,
                        digest=digest,
                    )
                    await commands.send(key=command.to_account, value=encode(leg))
            elif kind is CreditLeg:
                balance_minor = balances.get(command.to_account)
                if balance_minor is None:
                    refund = RefundLeg(
                        transaction_id=command.transaction_id,
                        actor=command.actor,
                        issued_ms=0,
                        debit_ms=command.issued_ms,
                        from_account=command.from_account,
                        to_account=command.to_account,
                        amount=command.amount,
                        currency=command.currency,
                        digest=command.digest,
                        reason=Reason.ACCOUNT_NOT_FOUND,
                    )
                    await commands.send(key=command.from_account, value=encode(refund))
                else:
                    balances[command.to_account] = balance_minor + parse_amount_minor(command.amount, command.currency)
                    await answer(command.transaction_id, command.digest)
            elif kind is RefundLeg:
                balances[command.from_account] += parse_amount_minor(command.amount, command.currency)
                await answer(command.transaction_id, command.digest, command.reason)
            elif kind is OpenAccount:
                digest = command_digest(command)
                if command.account_id in balances:
                    await answer(command.transaction_id, digest, Reason.ACCOUNT_EXISTS)
                else:
                    balances[command.account_id] = 0
                    await answer(command.transaction_id, digest)
            elif kind is Deposit:
                digest = command_digest(command)
                balance_minor = balances.get(command.account_id)
                if balance_minor is None:
                    await answer(command.transaction_id, digest, Reason.ACCOUNT_NOT_FOUND)
                else:
                    balances[command.account_id] = balance_minor + parse_amount_minor(command.amount, command.currency)
                    await answer(command.transaction_id, digest)
            else:
                raise ValueError(f"the faust peer implements transfers only, not {kind.__name__}")

    return app
