"""The processor's local state in RocksDB (rocksdict): a snapshot of each partition it owns.

The snapshot is never ahead of Kafka: it is written only after the Kafka transaction that
produced its events has committed, together with the offset of `wallet.events` it covers.
Restoring a partition = load the snapshot, then fold `wallet.events` from that offset on.

Layout (one RocksDB per instance; partitions kept apart by a key prefix):
  a/<partition>/<account_id>            -> account (currency, kind, status, balance_minor, seq, owner)
  s/<partition>/<segment number><max ts> -> the memory entries written by one flush, each under its
                                           (account, transaction id, sender) key: pending debits with
                                           their amount and receiver, decided credit legs with their
                                           issued_ms
  h/<partition>/<(account_id, hold_id)>  -> a hold (to_account, amount, held, captured, expires_ms,
                                           digest, actor, placed_ms, status, ended_ms), open or ended
  o/<partition>                         -> (events_offset, clock_ms, next segment number, format)
An account's money in flight is not stored: it is exactly its pending debits and captures in
the memory (a debit adds one, its refund or its forgetting removes it), so `load` derives it
from the restored memory, and an account whose pending debit was forgotten without an event of
its own can never restore a stale count. Likewise its held total is the sum of its open holds.
An ended hold forgotten by the clock is skipped on load (and deleted when the horizon moves).
A snapshot of another format is ignored: the partition is then restored from the log alone.
Memory entries are stored in segments, one value per flush, because a flush writes tens of
thousands of new transaction ids and one value per id would cost more than the rest of the
processor; the core's memory is defined as a set (state.memory_horizon_ms), so replaying the
segments in any order and dropping expired ids restores it exactly.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import msgspec
from rocksdict import AccessType, Options, Rdict, WriteBatch

from streams.core.money import BALANCE_MINOR_MAX
from streams.core.state import (
    ACTIVE,
    CLOSED,
    FAILURE,
    FROZEN,
    HOLD_STATUSES,
    OPEN,
    PENDING,
    SUCCESS,
    Account,
    Hold,
    MemoryKey,
    Remembered,
    State,
    index_memory,
    memory_horizon_ms,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

log = logging.getLogger("wallet.store")

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.decode
# Typed decoders: a value of another shape or type is a DecodeError, not a half-read state.
_decode_meta = msgspec.msgpack.Decoder(tuple[int, int, int, int]).decode
_decode_account = msgspec.msgpack.Decoder(tuple[str, str, str, int, int, str]).decode
_decode_segment = msgspec.msgpack.Decoder(
    list[tuple[str, str, str, str, str, str | None, int, int, str | None, int | None]]
).decode
_decode_hold_key = msgspec.msgpack.Decoder(tuple[str, str]).decode
_decode_hold = msgspec.msgpack.Decoder(tuple[str, int, int, int, int, str, str, int, str, int | None]).decode
_PARTITION = struct.Struct(">I")
_SEGMENT = struct.Struct(">Q")
ACCOUNT_STATUSES = frozenset({ACTIVE, FROZEN, CLOSED})
MEMORY_STATUSES = frozenset({PENDING, SUCCESS, FAILURE})
# 3: contract v2 (owners, pending debits' amounts, credit legs' issued_ms) and holds; 4: memory
# keys name the sender of a credit leg (contract v4).
SNAPSHOT_FORMAT = 4


class CorruptSnapshot(Exception):
    """A snapshot that decodes but holds a state no fold of the log could have produced."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise CorruptSnapshot(what)


def _prefix(kind: bytes, partition: int) -> bytes:
    return kind + b"/" + _PARTITION.pack(partition) + b"/"


@dataclass(slots=True)
class Checkpoint:
    events_offset: int = 0  # the next offset of wallet.events not yet folded into the snapshot
    clock_ms: int = 0
    next_segment: int = 0


class PartitionChanges:
    """What a partition changed since its last flush: written in one RocksDB write batch."""

    __slots__ = ("accounts", "memory_keys", "hold_keys")

    def __init__(self) -> None:
        self.accounts: set[str] = set()
        self.memory_keys: set[MemoryKey] = set()
        self.hold_keys: set[tuple[str, str]] = set()  # (account, hold id)


class PartitionSnapshot:
    """The committed values of the keys a partition changed since its last flush, copied right
    after each commit (`take`: only that batch's keys, so the copy is bounded per batch) and
    handed whole to the snapshot's writer thread by the next flush. Nothing here is what the
    processor mutates afterwards (accounts and holds as tuples of their fields; `Remembered`
    entries are immutable), so it is written on another thread; a key changed again is copied
    again, over its earlier value."""

    __slots__ = ("accounts", "memory", "holds")

    def __init__(self) -> None:
        self.accounts: dict[str, tuple[str, str, str, int, int, str]] = {}
        self.memory: dict[MemoryKey, Remembered] = {}
        self.holds: dict[tuple[str, str], tuple | None] = {}  # None: forgotten, deleted from the snapshot

    def take(self, state: State, changes: PartitionChanges) -> None:
        """Copies the values `changes` names from a committed `state`, and empties `changes`."""
        accounts, staged_accounts = state.accounts, self.accounts
        for account_id in changes.accounts:
            account = accounts[account_id]
            staged_accounts[account_id] = (
                account.currency,
                account.kind,
                account.status,
                account.balance_minor,
                account.seq,
                account.owner,
            )
        remembered_of, staged_memory = state.memory.get, self.memory
        for key in changes.memory_keys:
            remembered = remembered_of(key)
            if remembered is None:  # forgotten by the clock meanwhile: written by no segment
                staged_memory.pop(key, None)
            else:
                staged_memory[key] = remembered
        holds, staged_holds = state.holds, self.holds
        for hold_key in changes.hold_keys:
            hold = holds.get(hold_key)
            staged_holds[hold_key] = (
                None
                if hold is None
                else (
                    hold.to_account,
                    hold.amount_minor,
                    hold.held_minor,
                    hold.captured_minor,
                    hold.expires_ms,
                    hold.digest,
                    hold.actor,
                    hold.placed_ms,
                    hold.status,
                    hold.ended_ms,
                )
            )
        changes.accounts.clear()
        changes.memory_keys.clear()
        changes.hold_keys.clear()


@dataclass(frozen=True, slots=True)
class SnapshotWrite:
    """One partition's part of a flush: its staged values and the checkpoint they bring it to."""

    partition: int
    values: PartitionSnapshot
    checkpoint: Checkpoint  # a copy: the loop's own moves on


def advance(partition: int, values: PartitionSnapshot, state: State, checkpoint: Checkpoint) -> SnapshotWrite:
    """Moves `checkpoint` (whose events offset the caller set) to the state's clock and next
    segment: once the returned write lands, it is the checkpoint the snapshot holds."""
    if values.memory:
        checkpoint.next_segment += 1  # the segment this write adds is the one before
    checkpoint.clock_ms = state.clock_ms
    copied = Checkpoint(checkpoint.events_offset, checkpoint.clock_ms, checkpoint.next_segment)
    return SnapshotWrite(partition, values, copied)


class StateStore:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(not read_only)
        access = AccessType.read_only() if read_only else AccessType.read_write()
        self._db = Rdict(str(path), options, access_type=access)
        self._read_only = read_only

    def close(self) -> None:
        self._db.close()

    def partitions(self) -> list[int]:
        found = []
        for key in self._raw_keys(b"o/"):
            if not key.startswith(b"o/"):
                break
            found.append(_PARTITION.unpack(key[2:6])[0])
        return found

    def load(self, partition: int) -> tuple[State, Checkpoint]:
        """The partition's snapshot, or an empty state at offset 0 (restore from the log alone)
        when there is none, it has another format, or it cannot be trusted."""
        # Trust boundary: the snapshot is bytes read back from disk, a cache of the log that a
        # torn write, a disk fault or a stray tool may have changed. What no fold of the log could
        # have produced is not loaded; the log, kept forever, rebuilds the partition instead.
        try:
            return self._load(partition)
        except (msgspec.DecodeError, UnicodeDecodeError, CorruptSnapshot) as error:
            log.warning(
                "partition %d: the snapshot cannot be trusted (%s); restoring from the log alone", partition, error
            )
            if not self._read_only:
                self._drop(partition)  # so the next save writes a whole, clean snapshot
            return State(), Checkpoint()

    def _load(self, partition: int) -> tuple[State, Checkpoint]:
        meta = self._db.get(_prefix(b"o", partition)[:-1])
        if meta is None:
            return State(), Checkpoint()
        fields = _unpack(meta)
        if type(fields) is not list or len(fields) != 4 or fields[3] != SNAPSHOT_FORMAT:
            return State(), Checkpoint()  # another format: restore from the log alone
        checkpoint = Checkpoint(*_decode_meta(meta)[:3])
        _require(
            min(checkpoint.events_offset, checkpoint.clock_ms, checkpoint.next_segment) >= 0, "a negative checkpoint"
        )
        state = State(clock_ms=checkpoint.clock_ms)
        for raw_account_id, account_fields in self._scan(_prefix(b"a", partition)):
            account = Account(*_decode_account(account_fields))
            _require(
                account.status in ACCOUNT_STATUSES
                and 0 <= account.balance_minor <= BALANCE_MINOR_MAX
                and account.seq >= 1,
                f"account {raw_account_id!r} has no reachable state: {account}",
            )
            state.accounts[raw_account_id.decode()] = account
        horizon_ms = memory_horizon_ms(checkpoint.clock_ms)
        for _, segment in self._scan(_prefix(b"s", partition)):
            for account_id, transaction_id, sender, *fields in _decode_segment(segment):
                entry = Remembered(*fields)
                if entry.ts_ms >= horizon_ms:
                    state.memory[(account_id, transaction_id, sender)] = entry
                else:
                    state.memory.pop((account_id, transaction_id, sender), None)
        for (account_id, transaction_id, sender), remembered in state.memory.items():
            _require(
                remembered.status in MEMORY_STATUSES
                and remembered.amount_minor >= 0
                and not (sender and remembered.status == PENDING),
                f"{transaction_id!r} of {account_id!r} (sender {sender!r}) is remembered as {remembered}",
            )
            if remembered.status == PENDING:
                debtor = state.accounts.get(account_id)
                _require(debtor is not None, f"pending debit {transaction_id!r} of unknown account {account_id!r}")
                assert debtor is not None  # for mypy: _require raised otherwise
                debtor.in_flight_count += 1
                debtor.in_flight_minor += remembered.amount_minor
        for raw_key, hold_fields in self._scan(_prefix(b"h", partition)):
            account_id, hold_id = _decode_hold_key(raw_key)
            hold = Hold(*_decode_hold(hold_fields))
            if hold.ended_ms is not None and hold.ended_ms < horizon_ms:
                continue  # forgotten by the clock, as the core forgets it
            holder = state.accounts.get(account_id)
            _require(
                holder is not None
                and hold.status in HOLD_STATUSES
                and (hold.status == OPEN) == (hold.ended_ms is None) == (hold.held_minor > 0)
                and 0 <= hold.captured_minor
                and hold.held_minor + hold.captured_minor <= hold.amount_minor,
                f"hold {hold_id!r} of {account_id!r} has no reachable state: {hold}",
            )
            assert holder is not None  # for mypy: _require raised otherwise
            holder.held_minor += hold.held_minor
            state.holds[(account_id, hold_id)] = hold
        for account_id, account in state.accounts.items():
            _require(
                account.held_minor <= account.balance_minor,
                f"account {account_id!r} holds {account.held_minor} of a balance of {account.balance_minor}",
            )
        return index_memory(state), checkpoint

    def save(self, partition: int, state: State, changes: PartitionChanges, checkpoint: Checkpoint) -> None:
        """Writes one partition's changes and its new checkpoint atomically."""
        values = PartitionSnapshot()
        values.take(state, changes)
        self.write(advance(partition, values, state, checkpoint))

    def write(self, write: SnapshotWrite) -> None:
        """Writes one partition's staged values and its checkpoint in one RocksDB write batch: a
        crash leaves the snapshot before or after it, never between."""
        partition, values, checkpoint = write.partition, write.values, write.checkpoint
        batch = WriteBatch(raw_mode=True)
        account_prefix = _prefix(b"a", partition)
        for account_id, account_fields in values.accounts.items():
            batch.put(account_prefix + account_id.encode(), _pack(account_fields))
        hold_prefix = _prefix(b"h", partition)
        for key, hold_fields in values.holds.items():
            if hold_fields is None:
                batch.delete(hold_prefix + _pack(key))
            else:
                batch.put(hold_prefix + _pack(key), _pack(hold_fields))
        if values.memory:
            entries = [
                (
                    account_id,
                    transaction_id,
                    sender,
                    remembered.digest,
                    remembered.status,
                    remembered.reason,
                    remembered.ts_ms,
                    remembered.amount_minor,
                    remembered.to_account,
                    remembered.issued_ms,
                )
                for (account_id, transaction_id, sender), remembered in values.memory.items()
            ]
            newest_ts_ms = max(entry[6] for entry in entries)
            segment_key = _SEGMENT.pack(checkpoint.next_segment - 1) + _SEGMENT.pack(newest_ts_ms)
            batch.put(_prefix(b"s", partition) + segment_key, _pack(entries))
        batch.put(
            _prefix(b"o", partition)[:-1],
            _pack((checkpoint.events_offset, checkpoint.clock_ms, checkpoint.next_segment, SNAPSHOT_FORMAT)),
        )
        self._db.write(batch)

    def drop_expired_segments(self, partition: int, clock_ms: int) -> int:
        """Deletes segments whose every id is past the horizon; returns how many."""
        horizon_ms = memory_horizon_ms(clock_ms)
        prefix = _prefix(b"s", partition)
        batch = WriteBatch(raw_mode=True)
        dropped = 0
        for key in self._raw_keys(prefix):
            if not key.startswith(prefix):
                break
            if _SEGMENT.unpack(key[-8:])[0] < horizon_ms:
                batch.delete(key)
                dropped += 1
        if dropped:
            self._db.write(batch)
        return dropped

    def drop_forgotten_holds(self, partition: int, clock_ms: int) -> int:
        """Deletes the ended holds the clock has forgotten; returns how many."""
        horizon_ms = memory_horizon_ms(clock_ms)
        batch = WriteBatch(raw_mode=True)
        prefix = _prefix(b"h", partition)
        dropped = 0
        for raw_key, hold_fields in self._scan(prefix):
            ended_ms = _decode_hold(hold_fields)[9]
            if ended_ms is not None and ended_ms < horizon_ms:
                batch.delete(prefix + raw_key)
                dropped += 1
        if dropped:
            self._db.write(batch)
        return dropped

    def _drop(self, partition: int) -> None:
        batch = WriteBatch(raw_mode=True)
        for kind in (b"a", b"s", b"h"):
            prefix = _prefix(kind, partition)
            for key in self._raw_keys(prefix):
                if not key.startswith(prefix):
                    break
                batch.delete(key)
        batch.delete(_prefix(b"o", partition)[:-1])
        self._db.write(batch)

    # The database is opened with raw_mode=True: its keys and values are bytes, whatever
    # rocksdict's stubs say of a database in general.
    def _raw_keys(self, from_key: bytes) -> Iterable[bytes]:
        return cast("Iterable[bytes]", self._db.keys(from_key=from_key))

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        items = cast("Iterable[tuple[bytes, bytes]]", self._db.items(from_key=prefix))
        for key, value in items:
            if not key.startswith(prefix):
                break
            yield key[len(prefix) :], value
