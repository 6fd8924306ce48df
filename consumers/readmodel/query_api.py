"""The query side of the HTTP API: balances, history, holds and transaction status, read from the read model.

`query_router(db_url, settings, caller=...)` is mounted by the app of `wallet api`
(`wallet/api_app.py`), so one HTTP app serves both sides; `wallet readmodel serve` runs it
alone (`create_app`). `caller` is the FastAPI dependency that authenticates a request and
answers who it is (`.sub`) and whether it may read every account (`.reads_everything`:
the operator and audit scopes); a user reads only the accounts it owns and the requests it
made. Another's account answers 404 like a missing one, so ids do not leak. A hold is shown
to the owners of its two accounts (the held one and the destination); `hold_finder` gives the
command side the holds a caller may capture or void (`producers/api_holds.py`).

Reading your own write: the account and history routes take `min_sequence` (the account
sequence a client's write produced) and `wait_ms` (default 1000, at most 10000); they answer
once the read model has reached that sequence; when the wait runs out they answer 404
`account_not_found` if the read model has no such account, else 409 `not_caught_up` naming the
sequence reached. Nothing stale is ever returned as if it were fresh.

Errors are the project's one shape (`infra/http.py`): 404 `account_not_found` or
`hold_not_found`, 409 `not_caught_up` or `ambiguous_transaction_id`, 503 `readmodel_unavailable`
or `kafka_unavailable`, 422 `invalid_request`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple, cast

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from fastapi import APIRouter, Depends, FastAPI, Path, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from consumers.readmodel.consumer import PartitionLag, ReadModelError, read_lag
from consumers.readmodel.projection import HOLD_OPEN, AccountRow, HoldRow
from consumers.readmodel.store import ReadModelStore, TopicPartitionKey, describe_db_url
from infra.admin import admin_client
from infra.http import ApiError, FieldError, error_responses, install_error_handlers
from infra.settings import Settings
from schemas.commands import ACCOUNT_ID_LENGTH_MAX, TRANSACTION_ID_LENGTH_MAX, is_reserved_id
from streams.core.money import format_amount

WAIT_MS_DEFAULT = 1_000
WAIT_MS_MAX = 10_000
# How often a waiting request looks again: short next to the consumer's batch wait (100 ms).
WAIT_POLL_INTERVAL_S = 0.02
HISTORY_LIMIT_DEFAULT = 50
HISTORY_LIMIT_MAX = 500
LAG_TIMEOUT_S = 5.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DATABASE_ERRORS = (sqlite3.Error, psycopg.Error)


class ShardView(BaseModel):
    account_id: str  # the shard's own account: pay out of it by its id
    status: str
    balance: str
    held: str
    available: str
    sequence: int


class AccountView(BaseModel):
    account_id: str
    currency: str
    kind: str
    status: str
    # A sharded merchant's balance, held and available are the sums over all its shards (this
    # account, shard 0, and `shards`); `sequence` and `status` are this account's own.
    balance: str  # held money included
    held: str  # reserved by open holds
    available: str  # balance - held: what withdrawals, transfers, payments and new holds may use
    sequence: int
    shards: list[ShardView] = []  # a sharded merchant's shards 1.. (empty for any other account)


class HoldView(BaseModel):
    hold_id: str
    account_id: str  # the held (payer's) account
    to_account: str  # the destination of captures
    currency: str
    amount: str  # placed
    captured: str  # by every capture so far
    released: str  # by a final capture, a void or the expiry
    held: str  # what the hold still holds: amount - captured - released
    state: Literal["open", "captured", "voided", "expired"]
    expires_ms: int  # the decision time from which the hold is expired (epoch ms of the log's clock)
    placed_ms: int
    updated_ms: int


class HoldPage(BaseModel):
    account_id: str
    holds: list[HoldView]  # the latest placed first


class EntryView(BaseModel):
    transaction_id: str
    type: str
    amount: str  # signed: what the entry did to the balance
    balance_after: str
    sequence: int
    time: str  # ISO 8601 UTC, from the event's ts_ms
    counterparty: str | None  # the other account of a transfer


class HistoryPage(BaseModel):
    account_id: str
    currency: str
    entries: list[EntryView]  # newest first
    next_cursor: str | None  # pass as `cursor` for the next (older) page; null on the last page


class TransactionView(BaseModel):
    transaction_id: str
    status: Literal["success", "failure", "pending", "unknown"]
    reason: str | None


class PartitionLagView(BaseModel):
    topic: str
    partition: int
    next_offset: int | None
    end_offset: int
    lag: int


class LagView(BaseModel):
    total_lag: int
    partitions: list[PartitionLagView]


class _Unavailable(Exception):
    pass


class _Readers:
    """One connection per worker thread, opened on first use: sqlite3 and psycopg connections are not shared."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self._local = threading.local()
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    def call(self, method: str, *args: object) -> object:
        store = getattr(self._local, "store", None)
        try:
            if store is None:
                store = self._local.store = ReadModelStore(self.db_url)
                self._ensure_schema(store)
            return getattr(store, method)(*args)
        except _DATABASE_ERRORS as error:
            # Drop the connection: the next request reconnects (a database restart heals).
            self._local.store = None
            if store is not None:
                store.close()
            raise _Unavailable(f"read model database {describe_db_url(self.db_url)} failed: {error}") from None

    def _ensure_schema(self, store: ReadModelStore) -> None:
        # The API may start before the consumer ever ran: empty tables answer 404, not 500.
        with self._schema_lock:
            if not self._schema_ready:
                store.create_schema()
                self._schema_ready = True


def iso_utc(ts_ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ts_ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class OpenReader:
    """The caller of a query API served without authentication: reads everything."""

    sub: str = "anonymous"
    reads_everything: bool = True


async def _open_reader() -> OpenReader:
    return OpenReader()


def _owns(caller: Any, owner: str) -> bool:
    return caller.reads_everything or (bool(owner) and hmac.compare_digest(owner.encode(), caller.sub.encode()))


def _field_error(status_code: int, error: str, message: str, field: str) -> ApiError:
    return ApiError(status_code, error, message, [FieldError(field=field, reason=error, message=message)])


def query_router(db_url: str, settings: Settings | None = None, caller: Callable | None = None) -> APIRouter:
    """The query routes, reading the read model at `db_url`; `settings` names the Kafka
    cluster and topics for the lag route (default: from the environment); `caller` is the
    authentication dependency (default: none, everything readable)."""
    readers = _Readers(db_url)
    who = Depends(caller if caller is not None else _open_reader)
    router = APIRouter(tags=["queries"], responses=error_responses(401, 403, 422, 429, 503))
    _account_routes(router, readers, who)
    _transaction_route(router, readers, who)
    _hold_routes(router, readers, who)
    _lag_route(router, readers, who, settings if settings is not None else Settings())
    return router


async def _read(readers: _Readers, method: str, *args: object) -> Any:
    try:
        return await run_in_threadpool(readers.call, method, *args)
    except _Unavailable as error:
        raise ApiError(503, "readmodel_unavailable", str(error)) from None


async def _account_at(
    readers: _Readers, caller: Any, account_id: str, min_sequence: int | None, wait_ms: int
) -> AccountRow:
    """The caller's account once the read model has reached `min_sequence`; raises the error to answer."""
    deadline_s = time.monotonic() + wait_ms / 1000
    while True:
        account = await _read(readers, "account", account_id)
        if account is not None and not _owns(caller, account.owner):
            account = None  # another's account: answered like a missing one, which leaks nothing
            min_sequence = None
        if account is not None and (min_sequence is None or account.sequence >= min_sequence):
            return account
        remaining_s = deadline_s - time.monotonic()
        if min_sequence is None or remaining_s <= 0:
            if account is None:
                raise _field_error(404, "account_not_found", f"account {account_id!r} not found", "account_id")
            raise _field_error(
                409,
                "not_caught_up",
                f"the read model is at sequence {account.sequence} of account "
                f"{account_id!r}, not {min_sequence}, after {wait_ms} ms; "
                "retry later",
                "min_sequence",
            )
        await asyncio.sleep(min(WAIT_POLL_INTERVAL_S, remaining_s))


AccountIdPath = Path(max_length=64)
MIN_SEQUENCE_QUERY = Query(None, ge=1, description="wait until the account has reached this sequence")
WAIT_MS_QUERY = Query(
    WAIT_MS_DEFAULT, ge=0, le=WAIT_MS_MAX, description="how long to wait for min_sequence before answering 404 or 409"
)
_ACCOUNT_ERRORS = error_responses(404, 409)


def _account_routes(router: APIRouter, readers: _Readers, who: Any) -> None:
    @router.get(
        "/v1/accounts/{account_id}",
        response_model=AccountView,
        responses=_ACCOUNT_ERRORS,
        summary="balance and status of one of your accounts (any account for operator and audit)",
    )
    async def get_account(
        account_id: str = AccountIdPath,
        min_sequence: int | None = MIN_SEQUENCE_QUERY,
        wait_ms: int = WAIT_MS_QUERY,
        caller: Any = who,
    ):
        account = await _account_at(readers, caller, account_id, min_sequence, wait_ms)
        shards: list[AccountRow] = []
        if account.kind == "merchant" and not is_reserved_id(account_id):
            # The shards are the merchant's owner's too (the core opens them with its owner).
            shards = [shard for shard in await _read(readers, "shards_of", account_id) if _owns(caller, shard.owner)]
        currency = account.currency
        balance_minor = account.balance_minor + sum(shard.balance_minor for shard in shards)
        held_minor = account.held_minor + sum(shard.held_minor for shard in shards)
        return AccountView(
            account_id=account.account_id,
            currency=currency,
            kind=account.kind,
            status=account.status,
            balance=format_amount(balance_minor, currency),
            held=format_amount(held_minor, currency),
            available=format_amount(balance_minor - held_minor, currency),
            sequence=account.sequence,
            shards=[
                ShardView(
                    account_id=shard.account_id,
                    status=shard.status,
                    balance=format_amount(shard.balance_minor, currency),
                    held=format_amount(shard.held_minor, currency),
                    available=format_amount(shard.balance_minor - shard.held_minor, currency),
                    sequence=shard.sequence,
                )
                for shard in shards
            ],
        )

    @router.get(
        "/v1/accounts/{account_id}/transactions",
        response_model=HistoryPage,
        responses=_ACCOUNT_ERRORS,
        summary="history of one of your accounts, newest first, in pages",
    )
    async def get_history(
        account_id: str = AccountIdPath,
        limit: int = Query(HISTORY_LIMIT_DEFAULT, ge=1, le=HISTORY_LIMIT_MAX),
        cursor: str | None = Query(
            None, pattern=r"^[1-9][0-9]{0,17}$", description="the next_cursor of the previous page (opaque)"
        ),
        min_sequence: int | None = MIN_SEQUENCE_QUERY,
        wait_ms: int = WAIT_MS_QUERY,
        caller: Any = who,
    ):
        account = await _account_at(readers, caller, account_id, min_sequence, wait_ms)
        # One row more than asked tells whether an older page exists.
        rows = await _read(readers, "entries", account_id, limit + 1, int(cursor) if cursor is not None else None)
        currency = account.currency
        page = rows[:limit]
        return HistoryPage(
            account_id=account_id,
            currency=currency,
            entries=[
                EntryView(
                    transaction_id=row.transaction_id,
                    type=row.type,
                    amount=format_amount(row.amount_minor, currency),
                    balance_after=format_amount(row.balance_after_minor, currency),
                    sequence=row.sequence,
                    time=iso_utc(row.ts_ms),
                    counterparty=row.counterparty,
                )
                for row in page
            ],
            next_cursor=str(page[-1].sequence) if len(rows) > limit else None,
        )


def hold_view(row: HoldRow) -> HoldView:
    def amount(minor: int) -> str:
        return format_amount(minor, row.currency)

    held_minor = row.amount_minor - row.captured_minor - row.released_minor if row.state == HOLD_OPEN else 0
    return HoldView(
        hold_id=row.hold_id,
        account_id=row.account_id,
        to_account=row.to_account,
        currency=row.currency,
        amount=amount(row.amount_minor),
        captured=amount(row.captured_minor),
        released=amount(row.released_minor),
        held=amount(held_minor),
        state=cast(Any, row.state),
        expires_ms=row.expires_ms,
        placed_ms=row.placed_ms,
        updated_ms=row.updated_ms,
    )


def _hold_routes(router: APIRouter, readers: _Readers, who: Any) -> None:
    @router.get(
        "/v1/holds/{transaction_id}",
        response_model=HoldView,
        responses=error_responses(404, 409),
        summary="one hold on or to one of your accounts (any hold for operator and audit)",
        description="The hold's owner (of the held account) and the destination's owner see it, operator and "
        "audit every one; another's hold answers 404 `hold_not_found` like a missing one. `account_id` "
        "names the held account, and is needed (409 `ambiguous_transaction_id`) when the hold id names "
        "holds of several accounts you see.",
    )
    async def get_hold(
        transaction_id: str = Path(max_length=TRANSACTION_ID_LENGTH_MAX),
        account_id: str | None = Query(None, max_length=ACCOUNT_ID_LENGTH_MAX, description="the held account"),
        caller: Any = who,
    ):
        found = await _read(readers, "holds_named", transaction_id, None if caller.reads_everything else caller.sub)
        rows = [owned.hold for owned in found if account_id is None or owned.hold.account_id == account_id]
        if len(rows) > 1:
            accounts = ", ".join(sorted(row.account_id for row in rows))
            raise _field_error(
                409,
                "ambiguous_transaction_id",
                f"hold id {transaction_id!r} names holds of accounts {accounts}: ask with ?account_id=",
                "account_id",
            )
        if not rows:
            raise _field_error(404, "hold_not_found", f"hold {transaction_id!r} not found", "transaction_id")
        return hold_view(rows[0])

    @router.get(
        "/v1/accounts/{account_id}/holds",
        response_model=HoldPage,
        responses=_ACCOUNT_ERRORS,
        summary="the holds of one of your accounts, the latest placed first (open ones with ?state=open)",
    )
    async def get_account_holds(
        account_id: str = AccountIdPath,
        state: Literal["open", "captured", "voided", "expired"] | None = Query(None),
        limit: int = Query(HISTORY_LIMIT_DEFAULT, ge=1, le=HISTORY_LIMIT_MAX),
        caller: Any = who,
    ):
        await _account_at(readers, caller, account_id, None, 0)
        rows = await _read(readers, "account_holds", account_id, state, limit)
        return HoldPage(account_id=account_id, holds=[hold_view(row) for row in rows])


class HoldOwners(NamedTuple):
    """A hold as the command side's capture and void need it (`producers.api_holds.FoundHold`)."""

    account_id: str
    currency: str
    owner: str
    to_owner: str


def hold_finder(db_url: str) -> Callable[[str, str | None], Awaitable[list[HoldOwners]]]:
    """Finds holds by id for the command side: every hold `hold_id` of an account `actor` owns or
    destined to one it owns (`actor` None: every one); 503 when the database cannot be read."""
    readers = _Readers(db_url)

    async def find(hold_id: str, actor: str | None) -> list[HoldOwners]:
        found = await _read(readers, "holds_named", hold_id, actor)
        return [HoldOwners(owned.hold.account_id, owned.hold.currency, owned.owner, owned.to_owner) for owned in found]

    return find


def _transaction_route(router: APIRouter, readers: _Readers, who: Any) -> None:
    @router.get(
        "/v1/transactions/{transaction_id}",
        response_model=TransactionView,
        responses=error_responses(409),
        summary="status of one of your requests (any request for operator and audit)",
        description="A request is identified by its owning account and its transaction id; "
        "`account_id` narrows the lookup to one account, and is needed (409 "
        "`ambiguous_transaction_id`) when you used the id on several accounts. Another "
        "caller's request is `unknown`, as is one the read model has not seen.",
    )
    async def get_transaction(
        transaction_id: str = Path(max_length=128),
        account_id: str | None = Query(None, max_length=64, description="the account that owns the request"),
        caller: Any = who,
    ):
        rows = await _read(
            readers, "requests_visible_to", None if caller.reads_everything else caller.sub, transaction_id
        )
        # Only the caller's own requests: one that another principal made on an account the caller
        # owns (a bank deposit, say) is that principal's request, not the caller's.
        mine = [
            row
            for row in rows
            if caller.reads_everything
            or (bool(row.actor) and hmac.compare_digest(row.actor.encode(), caller.sub.encode()))
        ]
        if account_id is not None:
            mine = [row for row in mine if row.account_id == account_id]
        if len(mine) > 1:
            accounts = ", ".join(sorted(row.account_id for row in mine))
            raise _field_error(
                409,
                "ambiguous_transaction_id",
                f"transaction id {transaction_id!r} names requests of accounts {accounts}: ask with ?account_id=",
                "account_id",
            )
        if not mine:
            return TransactionView(transaction_id=transaction_id, status="unknown", reason=None)
        row = mine[0]
        return TransactionView(transaction_id=transaction_id, status=row.status, reason=row.reason)


def _lag_route(router: APIRouter, readers: _Readers, who: Any, kafka_settings: Settings) -> None:
    @functools.cache
    def admin() -> AdminClient:
        return admin_client(kafka_settings.bootstrap, role="readmodel")

    def lag() -> list[PartitionLag]:
        # ReadModelStore.offsets answers dict[TopicPartitionKey, int]; `call` returns it as object.
        stored = cast(dict[TopicPartitionKey, int], readers.call("offsets"))
        return read_lag(admin(), kafka_settings, stored, LAG_TIMEOUT_S)

    @router.get("/v1/readmodel/lag", response_model=LagView, summary="how far the read model is behind the log")
    async def get_lag(caller: Any = who):
        try:
            lags = await run_in_threadpool(lag)
        except _Unavailable as error:
            raise ApiError(503, "readmodel_unavailable", str(error)) from None
        except (KafkaException, ReadModelError, TimeoutError) as error:
            raise ApiError(
                503,
                "kafka_unavailable",
                f"cannot read the end offsets from Kafka at {kafka_settings.bootstrap}: {error}",
            ) from None
        return LagView(
            total_lag=sum(item.lag for item in lags),
            partitions=[
                PartitionLagView(
                    topic=item.topic,
                    partition=item.partition,
                    next_offset=item.next_offset,
                    end_offset=item.end_offset,
                    lag=item.lag,
                )
                for item in lags
            ],
        )


def create_app(db_url: str, settings: Settings | None = None, caller: Callable | None = None) -> FastAPI:
    """The query API on its own (`wallet readmodel serve`)."""
    app = FastAPI(title="Streamwallet query API", version="1")
    install_error_handlers(app)
    app.include_router(query_router(db_url, settings, caller))
    return app
