"""`wallet bench core`: the cost of the pure core on a transfer's whole path, without Kafka.

A successful transfer makes the processor consume two command records and write five:

    transfer bytes -> decode -> apply -> encode debit event + credit leg
    credit leg bytes -> decode -> apply -> encode credit event + outcome

This times exactly that, for `--transfers` random transfers among `--accounts` funded USD
accounts held in one partition's `State`, and reports µs per transfer and per consumed command
(a transfer is two), then the same work split into its decode, apply and encode parts. The
split is measured in a second pass that runs each part over a chunk of transfers at a time,
so no timer call sits inside the per-message work; its sum is close to the end-to-end figure.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import pstats
import random
import time
from dataclasses import asdict, dataclass

from producers.client import local_command
from schemas.codec import decode_command, encode
from schemas.commands import LEG_COMMANDS, Deposit, OpenAccount, Transfer
from schemas.leg_auth import LegKeyring
from streams.core.machine import apply
from streams.core.state import State

COMMANDS_PER_TRANSFER = 2  # the transfer and its credit leg
CHUNK_TRANSFERS = 100  # per timed part of the split pass: hides the timer, keeps objects short-lived
WARMUP_TRANSFERS = 5_000
LEG_SAMPLE_TRANSFERS = 1_000
START_TS_MS = 1_700_000_000_000
# Far above what the transfers can move, so every transfer succeeds and takes the full path.
OPENING_DEPOSIT = "1000000.00"


@dataclass(frozen=True)
class CoreBenchResult:
    transfers: int
    accounts: int
    us_per_transfer: float
    us_per_command: float
    # µs per transfer, measured part by part
    decode_us: float
    apply_us: float
    encode_us: float
    # Kafka payload per transfer (values only, no keys or headers): what sizes disks and networks
    bytes_consumed_per_transfer: float  # the transfer command and its credit leg
    bytes_written_per_transfer: float  # 2 events, the leg and the outcome


RECORD_TIME_MS = 1_700_000_000_000  # every record of the run at one broker time (inside every window)
KEYRING = LegKeyring.parse("bench:" + "42" * 32)


def funded_state(account_ids: list[str]) -> State:
    state = State()
    for account_id in account_ids:
        apply(
            state,
            local_command(OpenAccount, transaction_id=f"open-{account_id}", account_id=account_id, currency="USD"),
            RECORD_TIME_MS,
        )
        apply(
            state,
            local_command(
                Deposit,
                transaction_id=f"fund-{account_id}",
                account_id=account_id,
                amount=OPENING_DEPOSIT,
                currency="USD",
            ),
            RECORD_TIME_MS,
        )
    return state


def transfer_records(account_ids: list[str], count: int, seed: int, tx_prefix: str) -> list[bytes]:
    """Encoded transfers between distinct random accounts, one millisecond apart (far inside the idempotency window)."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        from_account, to_account = rng.sample(account_ids, 2)
        records.append(
            encode(
                local_command(
                    Transfer,
                    transaction_id=f"{tx_prefix}{index}",
                    from_account=from_account,
                    to_account=to_account,
                    amount=f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}",
                    currency="USD",
                )
            )
        )
    return records


def run_whole_path(state: State, records: list[bytes]) -> int:
    """The processor's per-transfer work, back to back; returns the bytes written (so nothing is optimised away)."""
    written = 0
    for record in records:
        debit = apply(state, decode_command(record), RECORD_TIME_MS)
        for event in debit.events:
            written += len(encode(event))
        [leg] = debit.follow_ups
        assert isinstance(leg, LEG_COMMANDS)  # a debit's one follow-up is its credit leg
        leg_record = KEYRING.signed_record(leg)  # the processor signs every leg it emits ...
        written += len(leg_record)
        received = decode_command(leg_record)
        assert isinstance(received, LEG_COMMANDS)
        assert KEYRING.verify(received, leg_record) is None  # ... and verifies every leg it receives
        credit = apply(state, received, RECORD_TIME_MS)
        for event in credit.events:
            written += len(encode(event))
        written += len(encode(credit.outcome))
    return written


def run_split(state: State, records: list[bytes]) -> tuple[float, float, float]:
    """(decode_s, apply_s, encode_s) over all records, each part timed a chunk at a time."""
    clock = time.perf_counter
    decode_s = apply_s = encode_s = 0.0
    for start in range(0, len(records), CHUNK_TRANSFERS):
        chunk = records[start : start + CHUNK_TRANSFERS]
        t0 = clock()
        transfers = [decode_command(record) for record in chunk]
        t1 = clock()
        debits = [apply(state, transfer, RECORD_TIME_MS) for transfer in transfers]
        t2 = clock()
        debit_events = [encode(event) for debit in debits for event in debit.events]
        leg_records = [encode(debit.follow_ups[0]) for debit in debits]
        t3 = clock()
        legs = [decode_command(record) for record in leg_records]
        t4 = clock()
        credits = [apply(state, leg, RECORD_TIME_MS) for leg in legs]
        t5 = clock()
        credit_events = [encode(event) for credit in credits for event in credit.events]
        outcomes = [encode(credit.outcome) for credit in credits]
        t6 = clock()
        assert len(debit_events) == len(credit_events) == len(outcomes) == len(chunk), "a transfer did not succeed"
        decode_s += (t1 - t0) + (t4 - t3)
        apply_s += (t2 - t1) + (t5 - t4)
        encode_s += (t3 - t2) + (t6 - t5)
    return decode_s, apply_s, encode_s


def run(transfer_count: int, account_count: int, seed: int = 1) -> CoreBenchResult:
    account_ids = [f"acct-{index:06d}" for index in range(account_count)]
    records = transfer_records(account_ids, transfer_count, seed, "bench-")
    run_whole_path(funded_state(account_ids), transfer_records(account_ids, WARMUP_TRANSFERS, seed + 1, "warm-"))

    state = funded_state(account_ids)
    start_s = time.perf_counter()
    written = run_whole_path(state, records)
    elapsed_s = time.perf_counter() - start_s
    leg_bytes = written_leg_bytes(account_ids, records[:LEG_SAMPLE_TRANSFERS])

    decode_s, apply_s, encode_s = run_split(funded_state(account_ids), records)
    per_transfer_us = 1e6 / transfer_count
    return CoreBenchResult(
        transfers=transfer_count,
        accounts=account_count,
        us_per_transfer=elapsed_s * per_transfer_us,
        us_per_command=elapsed_s * per_transfer_us / COMMANDS_PER_TRANSFER,
        decode_us=decode_s * per_transfer_us,
        apply_us=apply_s * per_transfer_us,
        encode_us=encode_s * per_transfer_us,
        bytes_consumed_per_transfer=(sum(map(len, records)) / transfer_count) + leg_bytes,
        bytes_written_per_transfer=written / transfer_count,
    )


def written_leg_bytes(account_ids: list[str], records: list[bytes]) -> float:
    """The mean size of a signed credit leg, over the debits of `records` on a fresh state."""
    state = funded_state(account_ids)
    legs = [
        KEYRING.signed_record(apply(state, decode_command(record), RECORD_TIME_MS).follow_ups[0]) for record in records
    ]
    return sum(map(len, legs)) / len(legs)


def profile(transfer_count: int, account_count: int, seed: int = 1, lines: int = 25) -> str:
    """cProfile of the whole path, by own time: where the microseconds go."""
    account_ids = [f"acct-{index:06d}" for index in range(account_count)]
    records = transfer_records(account_ids, transfer_count, seed, "bench-")
    state = funded_state(account_ids)
    profiler = cProfile.Profile()
    profiler.runcall(run_whole_path, state, records)
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(lines)
    return report.getvalue()


def format_result(result: CoreBenchResult) -> str:
    split_total_us = result.decode_us + result.apply_us + result.encode_us
    return "\n".join(
        [
            f"core, whole transfer path: {result.transfers} transfers among {result.accounts} accounts "
            f"(gc {'on' if gc.isenabled() else 'off'})",
            f"  {result.us_per_transfer:6.2f} µs per transfer (2 commands consumed, 5 messages written)",
            f"  {result.us_per_command:6.2f} µs per command",
            f"split, µs per transfer (sum {split_total_us:.2f}):",
            f"  decode {result.decode_us:6.2f}  (transfer + leg)",
            f"  apply  {result.apply_us:6.2f}  (debit + credit, digest and fold included)",
            f"  encode {result.encode_us:6.2f}  (2 events + leg + outcome)",
            f"Kafka payload per transfer: {result.bytes_consumed_per_transfer:.0f} bytes consumed (transfer + leg), "
            f"{result.bytes_written_per_transfer:.0f} bytes written (2 events + leg + outcome)",
        ]
    )


def to_json(result: CoreBenchResult) -> str:
    return json.dumps(asdict(result), sort_keys=True)
