"""`wallet audit balance`: one account's balance at a point in the past, from the log alone.

The account's events are folded with the core's `fold` in log order, up to and including:
- `--offset N`: the event at offset N of the account's partition of wallet.events (offsets are
  the ones the audit report and `kafka-console-consumer` show);
- `--at TIME`: the last event before the first one whose `ts_ms` is later than TIME. `ts_ms` is
  the command's own timestamp, the only clock of the ledger; the log's order decides, so the
  answer is "the balance as the ledger stood when it reached TIME", a prefix of the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from infra.log_reader import READ_TIMEOUT_S_DEFAULT, partition_count, read_topic
from infra.settings import Settings
from schemas.codec import decode_event
from schemas.events import CommandRejected
from schemas.partitioning import partition_for
from streams.core.money import format_amount
from streams.core.state import CorruptLog, State, fold


@dataclass(frozen=True, slots=True)
class BalanceAt:
    account_id: str
    partition: int
    opened: bool  # False: the account had no event yet at that point
    currency: str | None
    balance: str | None
    status: str | None
    seq: int  # of the last event folded (0: none)
    last_offset: int | None  # offset of the last event folded
    last_ts_ms: int | None
    events_folded: int

    def to_json(self) -> dict:
        return {
            "account_id": self.account_id,
            "partition": self.partition,
            "opened": self.opened,
            "currency": self.currency,
            "balance": self.balance,
            "status": self.status,
            "seq": self.seq,
            "last_offset": self.last_offset,
            "last_ts_ms": self.last_ts_ms,
            "events_folded": self.events_folded,
        }

    def render_text(self) -> str:
        if not self.opened:
            return f"{self.account_id}: not opened at that point (partition {self.partition})"
        return (
            f"{self.account_id}: {self.balance} {self.currency} ({self.status}), seq {self.seq}, after the event "
            f"at partition {self.partition} offset {self.last_offset} (ts_ms {self.last_ts_ms})"
        )


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 time (UTC when it names no zone)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither epoch milliseconds nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def balance_at(
    settings: Settings,
    account_id: str,
    *,
    at_ms: int | None = None,
    offset: int | None = None,
    timeout_s: float = READ_TIMEOUT_S_DEFAULT,
) -> BalanceAt:
    """The account as the log had it at `at_ms` (event time) or after `offset`; exactly one must be given."""
    if (at_ms is None) == (offset is None):
        raise ValueError("give exactly one of at_ms and offset")
    partition = partition_for(account_id, partition_count(settings.bootstrap, settings.events_topic))
    log = read_topic(settings.bootstrap, settings.events_topic, partitions=[partition], timeout_s=timeout_s)
    part = log.partitions[partition]
    key = account_id.encode()
    state = State()
    last_offset = last_ts_ms = None
    folded = 0
    for record_offset, record_key, value in zip(part.offsets, part.keys, part.values, strict=True):
        if offset is not None and record_offset > offset:
            break
        if record_key != key:
            continue  # another account's: not decoded, which keeps a point query fast
        assert value is not None  # wallet.events has no tombstones (decode_event(None) is a TypeError)
        event = decode_event(value)
        if at_ms is not None and event.ts_ms > at_ms:
            break
        if type(event) is CommandRejected:
            continue  # a decision that changed nothing
        try:
            fold(state, event)
        except CorruptLog as error:
            raise CorruptLog(
                f"{settings.events_topic} partition {partition} offset {record_offset}: {error} "
                f"(`wallet audit` names every such record)"
            ) from None
        last_offset, last_ts_ms = record_offset, event.ts_ms
        folded += 1
    account = state.accounts.get(account_id)
    if account is None:
        return BalanceAt(account_id, partition, False, None, None, None, 0, None, None, 0)
    balance = format_amount(account.balance_minor, account.currency)
    return BalanceAt(
        account_id,
        partition,
        True,
        account.currency,
        balance,
        account.status,
        account.seq,
        last_offset,
        last_ts_ms,
        folded,
    )
