"""The audit's checks on logs held in memory (no broker): the cases a real broker cannot stage
on demand, such as a partition read before a transfer's debit was committed."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from benchmarks.support.reference_pipeline import REFERENCE_LEG_KEYS, Record, ReferenceLog, decide, raw_command
from consumers.audit.determinism import DeterminismResult, check_determinism
from consumers.audit.ledger import LedgerReplay
from consumers.audit.snapshots import StateSnapshot, accounts_view
from consumers.audit.violations import Kind
from infra.log_reader import PartitionLog
from schemas.codec import decode_event, decode_outcome, encode
from schemas.commands import CreditLeg, Deposit, OpenAccount, Transfer
from schemas.events import CommandRejected, TransferCredited, TransferDebited, TransferRefunded
from schemas.leg_auth import LegKeyring
from schemas.outcomes import Outcome, Reason
from schemas.partitioning import partition_for
from streams.core.money import canonical_balance_minor, format_amount
from tests.support.commands import edge

PARTITIONS = 2
# The reference pipeline's processors sign legs with this keyring; the audit verifies with it.
KEYRING = LegKeyring.parse(REFERENCE_LEG_KEYS)
SENDER, RECEIVER = "alice", "bob"  # on partitions 1 and 0 of 2
T0_MS = 1_767_225_600_000


def test_the_accounts_are_on_two_partitions():
    assert partition_for(SENDER, PARTITIONS) != partition_for(RECEIVER, PARTITIONS)


def _log(*extra) -> ReferenceLog:
    commands = [
        edge(OpenAccount, transaction_id="o-s", account_id=SENDER, currency="USD"),
        edge(OpenAccount, transaction_id="o-r", account_id=RECEIVER, currency="USD"),
        edge(Deposit, transaction_id="d-s", account_id=SENDER, amount="10.00", currency="USD"),
        edge(Transfer, transaction_id="t-1", from_account=SENDER, to_account=RECEIVER, amount="4.00", currency="USD"),
        edge(Transfer, transaction_id="t-2", from_account=SENDER, to_account="nobody", amount="1.00", currency="USD"),
        *extra,
    ]
    return decide(commands, PARTITIONS)


def _partition_logs(records: list[list[Record]]) -> dict[int, PartitionLog]:
    return {
        partition: PartitionLog(
            partition,
            0,
            len(items),
            list(range(len(items))),
            [r.key for r in items],
            [r.value for r in items],
            [r.timestamp_ms for r in items],
        )
        for partition, items in enumerate(records)
    }


@dataclass
class Replayed:
    replay: LedgerReplay
    in_flight: list
    currencies: list

    @property
    def violations(self) -> list:
        return self.replay.violations


def _replay(log: ReferenceLog, *, settled: bool = False, later: list[bytes] | None = None, snapshots=()) -> Replayed:
    replay = LedgerReplay("events", "outcomes", PARTITIONS)
    replay.index_outcomes(_partition_logs(log.outcomes).values())
    replay.replay(_partition_logs(log.events), snapshots)
    return Replayed(replay, *replay.finish(settled, (lambda: later) if later is not None else None))


def _position(records: list[Record], event_class: type, transaction_id: str) -> int:
    return next(
        index
        for index, record in enumerate(records)
        if type(event := decode_event(record.value)) is event_class and event.transaction_id == transaction_id
    )


def test_a_clean_log_passes_with_every_transfer_settled():
    replay = _replay(_log(), settled=True)
    assert replay.violations == [] and replay.in_flight == []
    [usd] = replay.currencies
    assert (usd.deposited_minor, usd.balances_minor, usd.in_flight_minor, usd.created_minor) == (1000, 1000, 0, 0)


def test_a_debit_committed_after_its_partition_was_read_explains_the_credit():
    log = _log()
    sender_partition = partition_for(SENDER, PARTITIONS)
    events = log.events[sender_partition]
    cut = _position(events, TransferDebited, "t-1")
    later = [record.value for record in events[cut:]]
    log.events[sender_partition] = events[:cut]  # the sender's partition was read just before the debit

    explained = _replay(log, later=later)
    assert explained.violations == [], explained.violations
    assert explained.replay.explained_by_later_events > 0
    # In this cut the credit arrived before the debit left: the in-flight sum offsets it.
    [usd] = explained.currencies
    assert (usd.balances_minor, usd.in_flight_minor, usd.created_minor) == (1400, -400, 0)

    unexplained = _replay(log, later=[])
    assert {Kind.CREDIT_WITHOUT_DEBIT, Kind.CONSERVATION} <= {v.kind for v in unexplained.violations}


def test_a_conflicting_request_is_answered_apart_from_the_transaction():
    conflict = edge(
        Transfer, transaction_id="t-1", from_account=SENDER, to_account=RECEIVER, amount="5.00", currency="USD"
    )
    log = _log(conflict)
    assert _replay(log).violations == []  # its own digest: not the transfer's answer

    # A duplicate_conflict that claims to answer the transfer itself (the transfer's digest).
    debit = decode_event(
        log.events[partition_for(SENDER, PARTITIONS)][
            _position(log.events[partition_for(SENDER, PARTITIONS)], TransferDebited, "t-1")
        ].value
    )
    forged = Outcome(
        transaction_id="t-1",
        account_id=SENDER,
        actor=SENDER,
        status="failure",
        reason=Reason.DUPLICATE_CONFLICT,
        digest=debit.digest,
    )
    log.outcomes[partition_for("t-1", PARTITIONS)].append(Record(b"t-1", encode(forged)))
    [violation] = _replay(log).violations
    assert (violation.kind, violation.transaction_id, violation.topic) == (Kind.OUTCOME_MISMATCH, "t-1", "outcomes")


def test_a_refund_without_the_receivers_refusal_is_named():
    log = _log()
    receiver_events = log.events[partition_for("nobody", PARTITIONS)]
    del receiver_events[_position(receiver_events, CommandRejected, "t-2")]
    kinds = {v.kind: v for v in _replay(log).violations}
    assert kinds[Kind.REFUND_WITHOUT_REFUSAL].transaction_id == "t-2"


def test_a_second_credit_of_a_settled_transfer_is_named_whatever_the_replay_order():
    log = _log()
    events = log.events[partition_for(RECEIVER, PARTITIONS)]
    credit = decode_event(events[_position(events, TransferCredited, "t-1")].value)
    again = msgspec.structs.replace(credit, seq=credit.seq + 1, balance="8.00")
    events.append(Record(RECEIVER.encode(), encode(again)))
    violations = _replay(log).violations
    assert [(v.kind, v.offset, v.transaction_id) for v in violations if v.kind != Kind.CONSERVATION] == [
        (Kind.SETTLED_TWICE, len(events) - 1, "t-1")
    ]
    assert any(v.kind == Kind.CONSERVATION and "4.00 created" in v.message for v in violations)


def test_a_refund_for_a_credited_transfer_is_settled_twice():
    log = _log()
    sender_events = log.events[partition_for(SENDER, PARTITIONS)]
    last = decode_event(sender_events[-1].value)
    refund = TransferRefunded(
        account_id=SENDER,
        transaction_id="t-1",
        ts_ms=last.ts_ms,
        command="refund_leg",
        actor=SENDER,
        digest=decode_event(sender_events[_position(sender_events, TransferDebited, "t-1")].value).digest,
        seq=last.seq + 1,
        amount="4.00",
        currency="USD",
        balance="9.00",
        to_account=RECEIVER,
        reason="account_frozen",
    )
    sender_events.append(Record(SENDER.encode(), encode(refund)))
    assert Kind.SETTLED_TWICE in {v.kind for v in _replay(log).violations}


def test_a_snapshot_ahead_of_the_log_and_one_that_differs_are_named():
    log = _log()
    partition = partition_for(SENDER, PARTITIONS)
    end = len(log.events[partition])
    truth = accounts_view(log.states[partition])
    wrong = {account: dict(view, seq=view["seq"] + 1) for account, view in truth.items()}
    replay = _replay(
        log,
        snapshots=[
            StateSnapshot("state_dump", "good", partition, end, truth),
            StateSnapshot("state_dump", "wrong", partition, end, wrong),
            StateSnapshot("state_dump", "ahead", partition, end + 5, truth),
        ],
    )
    assert replay.replay.snapshots_compared == 3
    assert sorted((v.kind, v.message.split(",")[0]) for v in replay.violations) == [
        (Kind.SNAPSHOT_AHEAD, "ahead"),
        ("state_dump_mismatch", "wrong"),
    ]


def test_undecodable_events_and_outcomes_are_named_and_skipped():
    log = _log()
    log.events[0].append(Record(b"x", b"{not json"))
    log.outcomes[0].append(Record(b"y", b'{"type": "outcome"}'))
    replay = _replay(log)
    assert {(v.kind, v.partition, v.offset) for v in replay.violations} == {
        (Kind.UNDECODABLE_EVENT, 0, len(log.events[0]) - 1),
        (Kind.UNDECODABLE_OUTCOME, 0, len(log.outcomes[0]) - 1),
    }


def _determinism(
    log: ReferenceLog, dead_lettered: set, *, settled: bool = False, keyring: LegKeyring = KEYRING
) -> DeterminismResult:
    result = DeterminismResult()
    commands, events = _partition_logs(log.commands), _partition_logs(log.events)
    for partition in range(PARTITIONS):
        check_determinism(
            commands[partition],
            events[partition],
            PARTITIONS,
            "commands",
            "events",
            dead_lettered,
            result,
            keyring=keyring,
            settled=settled,
        )
    return result


def test_replaying_the_commands_reproduces_the_events_and_skips_what_the_processor_dead_letters():
    log = _log(
        raw_command(SENDER, b"poison"),
        edge(Deposit, transaction_id="d-2", account_id=SENDER, amount="1.00", currency="USD"),
    )
    [letter] = log.dead_letters
    dead_lettered = {(letter.source_partition, letter.source_offset)}
    result = _determinism(log, dead_lettered)
    assert result.violations == []
    assert (result.events_reproduced, result.commands_dead_lettered) == (log.event_count, 1)

    missing_letter = _determinism(log, set())
    [violation] = missing_letter.violations
    assert (violation.kind, violation.partition, violation.offset) == (
        Kind.NOT_DEAD_LETTERED,
        letter.source_partition,
        letter.source_offset,
    )


def test_commands_not_processed_yet_are_pending_and_a_trailing_poison_is_judged_only_when_settled():
    log = _log()
    partition = partition_for(SENDER, PARTITIONS)
    log.commands[partition] += [
        raw_command(SENDER, b"poison"),
        Record(
            SENDER.encode(),
            encode(edge(Deposit, transaction_id="late", account_id=SENDER, amount="1.00", currency="USD")),
        ),
    ]
    live = _determinism(log, set())
    assert live.violations == [] and live.pending == [(partition, len(log.commands[partition]) - 1)]
    drained = _determinism(log, set(), settled=True)
    assert [v.kind for v in drained.violations] == [Kind.NOT_DEAD_LETTERED]


def test_an_event_no_command_decides_and_a_changed_event_are_named():
    log = _log()
    partition = partition_for(RECEIVER, PARTITIONS)
    extra = msgspec.structs.replace(decode_event(log.events[partition][0].value), transaction_id="extra")
    log.events[partition].append(Record(RECEIVER.encode(), encode(extra)))
    [violation] = _determinism(log, {(d.source_partition, d.source_offset) for d in log.dead_letters}).violations
    assert (violation.kind, violation.offset, violation.transaction_id) == (
        Kind.EXTRA_EVENT,
        len(log.events[partition]) - 1,
        "extra",
    )


def test_replaying_in_worker_processes_finds_exactly_what_one_process_finds(monkeypatch):
    from consumers.audit import workers

    log = decide(
        [edge(OpenAccount, transaction_id=f"o-{n}", account_id=f"acct-{n}", currency="USD") for n in range(8)]
        + [
            edge(Deposit, transaction_id=f"d-{n}", account_id=f"acct-{n}", amount="10.00", currency="USD")
            for n in range(8)
        ]
        + [
            edge(
                Transfer,
                transaction_id=f"t-{n}",
                from_account=f"acct-{n}",
                to_account=f"acct-{(n + 3) % 9}",
                amount="1.00",
                currency="USD",
            )
            for n in range(8)
        ],
        4,
    )
    # Tampering across partitions: one transfer's credit lost, another's debit duplicated.
    for records in log.events:
        for index, record in enumerate(records):
            event = decode_event(record.value)
            if type(event) is TransferCredited and event.transaction_id == "t-1":
                del records[index]
                break
    debit_partition = partition_for("acct-2", 4)
    debit_index = next(
        i for i, r in enumerate(log.events[debit_partition]) if type(decode_event(r.value)) is TransferDebited
    )
    log.events[debit_partition].insert(debit_index + 1, log.events[debit_partition][debit_index])
    events, outcomes = _partition_logs(log.events), _partition_logs(log.outcomes)

    def audit(worker_count: int):
        replay = LedgerReplay("events", "outcomes", 4)
        replay.index_outcomes(outcomes.values())
        workers.replay_events(replay, events, (), worker_count, None)
        in_flight, currencies = replay.finish(False)
        return sorted(map(repr, replay.violations)), in_flight, currencies, replay.events_replayed

    monkeypatch.setattr(workers, "PARALLEL_RECORDS_MIN", 0)
    alone, split = audit(1), audit(2)
    assert alone == split
    assert alone[0] and alone[1]  # the tampering was seen: violations, and t-1 in flight


def test_re_deciding_in_worker_processes_finds_exactly_what_one_process_finds(monkeypatch):
    from consumers.audit import workers

    log = _log(
        raw_command(SENDER, b"poison"),
        edge(Deposit, transaction_id="d-2", account_id=SENDER, amount="1.00", currency="USD"),
    )
    changed = log.events[partition_for(RECEIVER, PARTITIONS)]
    changed[-1] = Record(changed[-1].key, changed[-1].value.replace(b'"ts_ms":', b'"ts_ms":1'))
    commands, events = _partition_logs(log.commands), _partition_logs(log.events)

    def check(worker_count: int) -> DeterminismResult:
        return workers.check_commands(
            commands, events, PARTITIONS, "commands", "events", set(), False, worker_count, None, KEYRING
        )

    monkeypatch.setattr(workers, "PARALLEL_RECORDS_MIN", 0)
    alone, split = check(1), check(2)
    assert sorted(map(repr, alone.violations)) == sorted(map(repr, split.violations))
    assert {v.kind for v in alone.violations} == {Kind.NONDETERMINISTIC, Kind.NOT_DEAD_LETTERED}
    assert (alone.commands_replayed, alone.events_reproduced) == (split.commands_replayed, split.events_reproduced)


def test_a_whole_transfer_written_twice_is_named():
    log = _log()
    for account, event_class in ((SENDER, TransferDebited), (RECEIVER, TransferCredited)):
        records = log.events[partition_for(account, PARTITIONS)]
        original = decode_event(records[_position(records, event_class, "t-1")].value)
        last = decode_event(records[-1].value)
        balance_minor = canonical_balance_minor(last.balance, "USD") + (-400 if account == SENDER else 400)
        records.append(
            Record(
                account.encode(),
                encode(
                    msgspec.structs.replace(original, seq=last.seq + 1, balance=format_amount(balance_minor, "USD"))
                ),
            )
        )
    violations = _replay(log).violations
    # Every balance follows and no money is created (debited and credited alike): only the
    # repetition gives it away, named on the second debit and the second credit.
    assert {(v.kind, v.transaction_id) for v in violations} == {
        (Kind.DEBITED_TWICE, "t-1"),
        (Kind.SETTLED_TWICE, "t-1"),
    }


def test_every_money_event_is_listed_with_its_actor_when_asked(monkeypatch):
    from consumers.audit import workers

    log = _log()
    events, outcomes = _partition_logs(log.events), _partition_logs(log.outcomes)

    def movements(worker_count: int) -> list:
        replay = LedgerReplay("events", "outcomes", PARTITIONS, record_movements=True)
        replay.index_outcomes(outcomes.values())
        workers.replay_events(replay, events, (), worker_count, None)
        assert replay.movements is not None  # record_movements=True
        return sorted(replay.movements)

    monkeypatch.setattr(workers, "PARALLEL_RECORDS_MIN", 0)
    alone = movements(1)
    assert alone == movements(2)
    assert sorted((m.type, m.account_id, m.transaction_id, m.amount_minor) for m in alone) == sorted(
        [
            ("deposited", SENDER, "d-s", 1000),
            ("transfer_debited", SENDER, "t-1", -400),
            ("transfer_credited", RECEIVER, "t-1", 400),
            ("transfer_debited", SENDER, "t-2", -100),
            ("transfer_refunded", SENDER, "t-2", 100),
        ]
    )
    logged_actors = {
        (event.transaction_id, getattr(event, "actor", None))
        for records in log.events
        for event in map(lambda record: decode_event(record.value), records)
    }
    assert {(m.transaction_id, m.actor) for m in alone} <= logged_actors
    assert LedgerReplay("events", "outcomes", PARTITIONS).movements is None  # not kept unless asked


def test_an_answer_naming_another_account_than_its_request_is_named():
    log = _log()
    records = log.outcomes[partition_for("d-s", PARTITIONS)]
    index = next(i for i, record in enumerate(records) if decode_outcome(record.value).transaction_id == "d-s")
    records[index] = Record(
        records[index].key, encode(msgspec.structs.replace(decode_outcome(records[index].value), account_id=RECEIVER))
    )
    [violation] = _replay(log).violations
    assert (violation.kind, violation.transaction_id, violation.account_id) == (
        Kind.OUTCOME_WRONG_ACCOUNT,
        "d-s",
        RECEIVER,
    )


def test_a_forged_leg_is_skipped_as_the_processor_skips_it_and_must_be_in_the_dlq():
    forged = CreditLeg(
        transaction_id="forged",
        from_account=SENDER,
        to_account=RECEIVER,
        amount="500.00",
        currency="USD",
        digest="f" * 24,
        actor=SENDER,
        issued_ms=T0_MS,
    )  # unsigned: no kid, no mac
    log = _log(raw_command(RECEIVER, encode(forged)))
    [letter] = log.dead_letters  # the reference processor refused it
    result = _determinism(log, {(letter.source_partition, letter.source_offset)})
    assert result.violations == [] and result.commands_dead_lettered == 1
    [violation] = _determinism(log, set()).violations
    assert (violation.kind, violation.offset) == (Kind.NOT_DEAD_LETTERED, letter.source_offset)
    assert "only a processor may originate a leg" in violation.message


def test_legs_verified_with_another_keyring_are_not_decided():
    log = _log()
    other = LegKeyring.parse("other:" + "5a" * 32)
    kinds = {violation.kind for violation in _determinism(log, set(), keyring=other, settled=True).violations}
    # Every genuine leg now looks forged: not in the DLQ, and the events it decided have no command.
    assert {Kind.NOT_DEAD_LETTERED, Kind.EXTRA_EVENT} <= kinds
