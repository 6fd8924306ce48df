"""Audit replay benchmark: generate a large clean log, write it to fresh topics, time `run_audit`.

    .venv/bin/python -m benchmarks.audit_bench --events 500000

The log is made by the reference pipeline (the core deciding every command in-process, as the
processors would) from a seeded random workload: opens, deposits, withdrawals, transfers
(most credited, some refunded because the receiver is missing, frozen or in another
currency), refused withdrawals and transfers, client retries and conflicting reuses of a
transaction id. It is written to topics under a fresh prefix, audited once, and the topics
are deleted (unless --keep). Not a test: it asserts only that the clean log passes.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections.abc import Iterator

from benchmarks.support.reference_pipeline import decide, publish
from consumers.audit.runner import run_audit
from infra.admin import delete_topics, ensure_topics
from infra.settings import Settings
from producers.client import local_command
from schemas.commands import Command, Deposit, Freeze, OpenAccount, Transfer, Unfreeze, Withdraw

COMMAND_INTERVAL_MS = 7  # command time between two client commands: ~10 minutes per 100k commands
TS_START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
# Events per client command in this workload (measured): used to size the command count.
EVENTS_PER_COMMAND = 1.5
# Large transactions: the log is written fast, and the audit still meets a marker every so often.
TRANSACTION_RECORDS_MAX = 20_000


def workload(account_count: int, command_count: int, seed: int) -> Iterator[Command]:
    """A seeded mix of every kind of client command, realistic enough to exercise every check."""
    rng = random.Random(seed)
    accounts = [f"user-{index:07d}" for index in range(account_count)]
    euro_accounts = accounts[: account_count // 20]  # 5% hold euros: transfers to them from dollars are refunded
    recent: list[Command] = []

    for account in accounts:
        currency = "EUR" if account in euro_accounts else "USD"
        yield local_command(OpenAccount, transaction_id=f"open-{account}", account_id=account, currency=currency)
        yield local_command(
            Deposit, transaction_id=f"fund-{account}", account_id=account, amount="1000.00", currency=currency
        )
    dollar_accounts = accounts[len(euro_accounts) :]
    frozen: set[str] = set()
    for number in range(command_count - 2 * account_count):
        roll = rng.random()
        transaction_id = f"tx-{number:09d}"
        account = rng.choice(dollar_accounts)
        amount = f"{rng.randint(1, 20000) / 100:.2f}"
        if roll < 0.62:
            target = rng.choice(accounts) if rng.random() < 0.97 else f"missing-{number}"
            if target == account:
                continue
            command = local_command(
                Transfer,
                transaction_id=transaction_id,
                from_account=account,
                to_account=target,
                amount=amount,
                currency="USD",
            )
        elif roll < 0.80:
            command = local_command(
                Deposit, transaction_id=transaction_id, account_id=account, amount=amount, currency="USD"
            )
        elif roll < 0.92:
            command = local_command(
                Withdraw, transaction_id=transaction_id, account_id=account, amount=amount, currency="USD"
            )
        elif roll < 0.94:
            command = local_command(
                Unfreeze if account in frozen else Freeze, transaction_id=transaction_id, account_id=account
            )
            frozen.symmetric_difference_update({account})
        elif roll < 0.99 and recent:
            # A client retry: the same request again, later.
            previous = rng.choice(recent)
            command = previous
        elif recent:
            # A different request reusing a transaction id: answered duplicate_conflict.
            previous = rng.choice(recent)
            account_id = getattr(previous, "account_id", None)
            if not account_id:
                assert isinstance(previous, Transfer)  # the only command here without an account_id
                account_id = previous.from_account
            command = local_command(
                Deposit, transaction_id=previous.transaction_id, account_id=account_id, amount="0.01", currency="USD"
            )
        else:
            continue
        recent.append(command)
        if len(recent) > 1000:
            del recent[:500]
        yield command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500_000, help="approximate events to generate (default 500000)")
    parser.add_argument("--accounts", type=int, default=20_000, help="accounts (default 20000)")
    parser.add_argument("--partitions", type=int, default=8, help="partitions per topic (default 8)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-determinism", action="store_true", help="skip the determinism check")
    parser.add_argument("--workers", type=int, help="processes for the replays (default: one per core)")
    parser.add_argument("--keep", action="store_true", help="keep the topics (their prefix is printed)")
    args = parser.parse_args(argv)

    command_count = int(args.events / EVENTS_PER_COMMAND)
    settings = Settings().with_overrides(topic_prefix=f"auditbench-{uuid.uuid4().hex[:8]}.", partitions=args.partitions)
    started_s = time.monotonic()
    log = decide(workload(args.accounts, command_count, args.seed), args.partitions)
    generated_s = time.monotonic() - started_s
    print(
        f"generated {log.event_count:,} events from {sum(map(len, log.commands)):,} commands in "
        f"{generated_s:.1f} s (reference pipeline)",
        file=sys.stderr,
    )
    ensure_topics(settings)
    try:
        started_s = time.monotonic()
        publish(settings, log, transaction_records_max=TRANSACTION_RECORDS_MAX)
        print(
            f"wrote the log to {settings.topic_prefix}* in {time.monotonic() - started_s:.1f} s"
            + (" (kept)" if args.keep else ""),
            file=sys.stderr,
        )
        report = run_audit(
            settings, check_determinism=not args.no_determinism, progress=sys.stderr.isatty(), workers=args.workers
        )
    finally:
        if not args.keep:
            delete_topics(settings)
    read_records = sum(topic.records for topic in report.topics)
    read_s = max(topic.read_s for topic in report.topics if topic.topic == settings.events_topic)
    print(report.render_text())
    print()
    print(
        f"events replayed: {report.events_replayed:,} in {report.replay_s:.2f} s = "
        f"{report.replay_events_per_s:,.0f} events/s (decode + fold + every check, {report.workers} process(es))"
    )
    print(
        f"events read: {report.topics[0].records:,} in {read_s:.2f} s = {report.topics[0].records / read_s:,.0f} "
        f"records/s; all topics {read_records:,} records"
    )
    if report.determinism is not None:
        print(
            f"determinism: {report.determinism.commands_replayed:,} commands in {report.determinism_s:.2f} s = "
            f"{report.determinism_commands_per_s:,.0f} commands/s"
        )
    print(f"whole audit: {report.total_s:.2f} s = {report.events_replayed / report.total_s:,.0f} events/s end to end")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
