"""Holds end to end on a real broker, through real `wallet processor` processes: captures across
partitions and to a refusing destination, partial captures, a void racing a capture, expiry
driven by the processor's ticks alone, and a processor SIGKILLed with holds open."""

from __future__ import annotations

import itertools
import time

import pytest

from consumers.audit import run_audit
from schemas.codec import command_digest, decode_command, decode_event
from schemas.commands import CaptureHold, Command, Deposit, Freeze, OpenAccount, PlaceHold, Tick, VoidHold
from schemas.events import HoldCaptured, HoldExpired, HoldPlaced, HoldVoided
from schemas.outcomes import Reason
from schemas.partitioning import partition_for
from streams.cli import state_dump
from streams.core.money import format_amount
from streams.core.state import State, fold
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic, wait_for
from tests.support.processes import ProcessorProcess
from tests.test_processor_faults import check_ledger

PARTITIONS = 4
# Partition 3 carries the tick test's account alone: no other test's traffic may expire its hold.
QUIET_PARTITION = 3
TICK_INTERVAL_MS = 200
LONG_EXPIRY_MS = 3_600_000
EXPIRY_WAIT_S = 30.0
_ids = itertools.count()


def _tx(label: str) -> str:
    return f"{label}-{next(_ids)}"


def _account_on(partition_wanted: int, prefix: str) -> str:
    return next(
        f"{prefix}{i}" for i in itertools.count() if partition_for(f"{prefix}{i}", PARTITIONS) == partition_wanted
    )


PROCESSOR_ARGS = ("--tick-interval-ms", str(TICK_INTERVAL_MS), "--state-flush-interval-ms", "200")


class Pipeline:
    def __init__(self, settings, instance_id: str) -> None:
        self.settings = settings
        self.processor = ProcessorProcess(settings, instance_id, *PROCESSOR_ARGS).start()
        self.producer = command_producer(settings)
        self.outcomes = OutcomeCollector(settings)
        self.sent: list = []

    def publish(self, *commands) -> None:
        self.sent += commands
        publish(self.producer, self.settings, list(commands))

    def ask(self, command, count: int = 1):
        self.publish(command)
        return self.outcomes.wait(command.transaction_id, count=count)[-1]

    def open_funded(self, account_id: str, amount: str = "100.00") -> None:
        assert self.ask(
            edge(OpenAccount, transaction_id=_tx("open"), account_id=account_id, currency="USD")
        ).status == ("success")
        if amount:
            deposit = edge(Deposit, transaction_id=_tx("dep"), account_id=account_id, amount=amount, currency="USD")
            assert self.ask(deposit).status == "success"

    def close(self) -> None:
        self.outcomes.close()


@pytest.fixture(scope="module")
def pipeline(make_settings):
    line = Pipeline(make_settings(PARTITIONS), "holds-1")
    yield line
    line.close()
    assert line.processor.stop() == 0, line.processor.log_tail()


def place(account_id: str, to_account: str, amount: str, expires_in_ms: int = LONG_EXPIRY_MS) -> Command:
    return edge(
        PlaceHold,
        transaction_id=_tx("hold"),
        account_id=account_id,
        to_account=to_account,
        amount=amount,
        currency="USD",
        expires_in_ms=expires_in_ms,
    )


def capture(account_id: str, hold_id: str, amount: str | None = None, final: bool = True) -> Command:
    return edge(
        CaptureHold, transaction_id=_tx("capture"), account_id=account_id, hold_id=hold_id, amount=amount, final=final
    )


def void(account_id: str, hold_id: str) -> Command:
    return edge(VoidHold, transaction_id=_tx("void"), account_id=account_id, hold_id=hold_id)


def folded(settings) -> State:
    """Every partition's events folded into one state (accounts and holds are keyed apart)."""
    states: dict[int, State] = {}
    for record in read_topic(settings, settings.events_topic):
        assert record.value is not None  # the wallet writes no tombstones
        fold(states.setdefault(record.partition, State()), decode_event(record.value))
    merged = State()
    for state in states.values():
        merged.accounts.update(state.accounts)
        merged.holds.update(state.holds)
    return merged


def hold_events(settings, hold_id: str) -> list:
    return [
        event
        for record in read_topic(settings, settings.events_topic)
        if record.value is not None
        and isinstance(event := decode_event(record.value), (HoldPlaced, HoldCaptured, HoldVoided, HoldExpired))
        and event.hold_id == hold_id
    ]


def test_partial_captures_across_partitions_reach_the_destination_and_never_pass_the_hold(pipeline):
    payer, payee = _account_on(0, "payer"), _account_on(1, "payee")
    pipeline.open_funded(payer)
    pipeline.open_funded(payee, amount="")
    hold = place(payer, payee, "30.00")
    assert pipeline.ask(hold).status == "success"
    first = pipeline.ask(capture(payer, hold.transaction_id, "10.00", final=False))
    assert (first.status, first.account_id) == ("success", payer)  # answered by the payee's partition
    too_much = pipeline.ask(capture(payer, hold.transaction_id, "20.01"))
    assert (too_much.status, too_much.reason) == ("failure", Reason.CAPTURE_EXCEEDS_HOLD)
    assert pipeline.ask(capture(payer, hold.transaction_id, "5.00")).status == "success"  # final: 15.00 released
    state = folded(pipeline.settings)
    assert (state.accounts[payer].balance_minor, state.accounts[payer].held_minor) == (8500, 0)
    assert state.accounts[payee].balance_minor == 1500
    ended = state.holds[(payer, hold.transaction_id)]
    assert (ended.status, ended.captured_minor, ended.held_minor) == ("captured", 1500, 0)
    late = pipeline.ask(capture(payer, hold.transaction_id, "1.00"))
    assert (late.status, late.reason) == ("failure", Reason.HOLD_CAPTURED)


def test_a_capture_to_a_frozen_destination_is_refunded_and_the_hold_stays_released(pipeline):
    payer, payee = _account_on(0, "fpayer"), _account_on(2, "fpayee")
    pipeline.open_funded(payer)
    pipeline.open_funded(payee, amount="")
    assert pipeline.ask(edge(Freeze, transaction_id=_tx("freeze"), account_id=payee)).status == "success"
    hold = place(payer, payee, "40.00")
    assert pipeline.ask(hold).status == "success"
    outcome = pipeline.ask(capture(payer, hold.transaction_id, "25.00"))
    assert (outcome.status, outcome.reason, outcome.account_id) == ("failure", Reason.ACCOUNT_FROZEN, payer)
    state = folded(pipeline.settings)
    payer_account = state.accounts[payer]
    assert (payer_account.balance_minor, payer_account.held_minor, payer_account.in_flight_minor) == (10000, 0, 0)
    assert state.holds[(payer, hold.transaction_id)].status == "captured"  # not re-opened by the refund
    assert state.accounts[payee].balance_minor == 0


def test_a_void_racing_a_capture_lets_exactly_one_win(pipeline):
    payer, payee = _account_on(0, "rpayer"), _account_on(1, "rpayee")
    pipeline.open_funded(payer)
    pipeline.open_funded(payee, amount="")
    results = []
    for round_number in range(3):
        hold = place(payer, payee, "10.00")
        assert pipeline.ask(hold).status == "success"
        racers = [capture(payer, hold.transaction_id), void(payer, hold.transaction_id)]
        if round_number % 2:
            racers.reverse()  # the other one first on the partition
        pipeline.publish(*racers)  # one produce batch: the partition decides them back to back
        answers = {type(c).__name__: pipeline.outcomes.wait(c.transaction_id)[-1] for c in racers}
        winners = [name for name, outcome in answers.items() if outcome.status == "success"]
        assert len(winners) == 1, answers
        loser = answers["VoidHold" if winners == ["CaptureHold"] else "CaptureHold"]
        assert loser.reason == (Reason.HOLD_CAPTURED if winners == ["CaptureHold"] else Reason.HOLD_VOIDED)
        results.append(winners[0])
    assert results == ["CaptureHold", "VoidHold", "CaptureHold"]  # the first on the partition wins
    state = folded(pipeline.settings)
    assert (state.accounts[payer].balance_minor, state.accounts[payer].held_minor) == (8000, 0)
    assert state.accounts[payee].balance_minor == 2000


def test_a_hold_on_a_partition_without_traffic_expires_by_the_processors_ticks(pipeline):
    quiet = _account_on(QUIET_PARTITION, "quiet")
    pipeline.open_funded(quiet)
    hold = place(quiet, "somebody", "60.00", expires_in_ms=1_000)
    assert pipeline.ask(hold).status == "success"
    # Nothing else is sent to the partition: only a tick can bring its time past the expiry.
    [expired] = wait_for(
        lambda: [e for e in hold_events(pipeline.settings, hold.transaction_id) if isinstance(e, HoldExpired)],
        EXPIRY_WAIT_S,
        "the hold's expiry",
    )
    assert (expired.command, expired.released, expired.held) == ("tick", "60.00", "0.00")
    placed = hold_events(pipeline.settings, hold.transaction_id)[0]
    assert expired.ts_ms >= placed.expires_ms
    ticks = [
        command
        for record in read_topic(pipeline.settings, pipeline.settings.commands_topic)
        if record.value is not None and isinstance(command := decode_command(record.value), Tick)
    ]
    assert ticks and {tick.partition for tick in ticks} == {QUIET_PARTITION}  # only a partition with a due hold
    late = pipeline.ask(void(quiet, hold.transaction_id))
    assert (late.status, late.reason) == ("failure", Reason.HOLD_EXPIRED)
    state = folded(pipeline.settings)
    assert (state.accounts[quiet].balance_minor, state.accounts[quiet].held_minor) == (10000, 0)


def test_the_audit_passes_and_replays_the_holds_ticks_and_expiries_byte_for_byte(pipeline):
    # Last in the module: it audits everything the tests above did, settled.
    check_ledger(pipeline.settings, pipeline.sent, [state_dump(pipeline.processor.store)])  # the audit, settled
    report = run_audit(pipeline.settings, settled=True)
    assert report.determinism is not None and report.determinism.commands_replayed > 0
    assert [hold.state for hold in report.holds_expired] == ["expired"]
    assert report.holds_open == []


def test_a_processor_sigkilled_with_holds_open_restores_them_and_its_state_equals_the_audit(make_settings):
    settings = make_settings(PARTITIONS)
    line = Pipeline(settings, "holds-kill")
    try:
        payers = [_account_on(partition, f"kpayer{partition}-") for partition in range(PARTITIONS)]
        payee = _account_on(1, "kpayee")
        for account in payers:
            line.open_funded(account)
        line.open_funded(payee, amount="")
        holds = [place(account, payee, "20.00") for account in payers]
        expiring = place(payers[2], payee, "5.00", expires_in_ms=3_000)
        for command in [*holds, expiring]:
            assert line.ask(command).status == "success"
        line.processor.wait_until_assigned()
        time.sleep(0.5)  # a snapshot flush: the restore loads the holds from RocksDB ...
        assert line.ask(capture(payers[0], holds[0].transaction_id, "5.00", final=False)).status == "success"
        line.processor.kill()  # ... and folds this capture from the log, if no flush came between
        line.processor = ProcessorProcess(settings, "holds-kill", *PROCESSOR_ARGS).start()
        line.processor.wait_until_assigned()
        # The restored holds are the ones placed: captured on, voided, and the short one expires.
        assert line.ask(capture(payers[0], holds[0].transaction_id, "15.00")).status == "success"
        assert line.ask(void(payers[1], holds[1].transaction_id)).status == "success"
        retried = line.ask(holds[2], count=2)  # a retry after the restore: the first answer, no second hold
        assert retried.status == "success"
        wait_for(
            lambda: [e for e in hold_events(settings, expiring.transaction_id) if isinstance(e, HoldExpired)],
            EXPIRY_WAIT_S,
            "the expiry of the hold placed before the kill",
        )
        line.processor.stop()
        dump = state_dump(line.processor.store)
        state = folded(settings)
        for account in payers:
            partition = str(partition_for(account, PARTITIONS))
            dumped = dump["partitions"][partition]["accounts"][account]
            assert dumped["held"] == format_amount(state.accounts[account].held_minor, "USD")
        assert [state.accounts[account].held_minor for account in payers] == [0, 0, 2000, 2000]
        assert len([e for e in hold_events(settings, holds[2].transaction_id) if isinstance(e, HoldPlaced)]) == 1
        check_ledger(settings, line.sent, [dump])
        assert command_digest(holds[2]) == state.holds[(payers[2], holds[2].transaction_id)].digest
    finally:
        line.close()
        if line.processor.process is not None and line.processor.process.poll() is None:
            line.processor.stop()
