"""The query side of the HTTP API: balances, history and transaction status, read from the read model.

`query_router(db_url)` is mounted by the command API's app (`producers/api.py`), so one HTTP
app serves both sides; `wallet readmodel serve` runs it alone (`create_app`).

Reading your own write: the account and history routes take `min_sequence` (the account
sequence a client's write produced) and `wait_ms` (default 1000, at most 10000); they answer
once the read model has reached that sequence, or with 504 and a JSON error naming the
sequence reached when the wait runs out. Nothing stale is ever returned as if it were fresh.

Errors are JSON `{"error": code, "message": text, "field": name?}` like the command API's:
404 `account_not_found`, 504 `not_caught_up` for a wait that ran out, 503 `readmodel_unavailable`
or `kafka_unavailable`; out-of-bounds parameters are 422 `invalid_request` (in the command
API's app, its own validation handler answers them).
"""
from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Literal

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from consumers.readmodel.consumer import PartitionLag, ReadModelError, read_lag
from consumers.readmodel.projection import AccountRow
from consumers.readmodel.store import ReadModelStore, describe_db_url
from streams.core.money import format_amount
from infra.settings import Settings
from infra.admin import admin_client


WAIT_MS_DEFAULT = 1_000
WAIT_MS_MAX = 10_000
# How often a waiting request looks again: short next to the consumer's batch wait (100 ms).
WAIT_POLL_INTERVAL_S = 0.02
HISTORY_LIMIT_DEFAULT = 50
HISTORY_LIMIT_MAX = 500
LAG_TIMEOUT_S = 5.0
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_DATABASE_ERRORS = (sqlite3.Error, psycopg.Error)


class ErrorBody(BaseModel):
    error: str  # machine readable
    message: str
    field: str | None = None


class AccountView(BaseModel):
    account_id: str
    currency: str
    kind: str
    status: str
    balance: str
    sequence: int


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


def _error(status_code: int, error: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code,
                        content=ErrorBody(error=error, message=message, field=field).model_dump(exclude_none=True))


def query_router(db_url: str, settings: Settings | None = None) -> APIRouter:
    """The query routes, reading the read model at `db_url`; `settings` names the Kafka
    cluster and topics for the lag route (default: from the environment)."""
    readers = _Readers(db_url)
    kafka_settings = settings if settings is not None else Settings()
    router = APIRouter(tags=["queries"])
    account_errors = {404: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}}
    unavailable = {503: {"model": ErrorBody}}

    async def read(method: str, *args: object) -> object:
        return await run_in_threadpool(readers.call, method, *args)

    async def account_at(account_id: str, min_sequence: int | None, wait_ms: int) -> AccountRow | JSONResponse:
        """The account once the read model has reached `min_sequence`, or the error to answer."""
        deadline_s = time.monotonic() + wait_ms / 1000
        while True:
            try:
                account = await read("account", account_id)
            except _Unavailable as error:
                return _error(503, "readmodel_unavailable", str(error))
            if min_sequence is None:
                return account if account is not None else _error(
                    404, "account_not_found", f"account {account_id!r} not found", "account_id")
            if account is not None and account.sequence >= min_sequence:
                return account
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                reached = f"is at sequence {account.sequence}" if account is not None else "does not have it yet"
                return _error(504, "not_caught_up", f"the read model {reached}; account {account_id!r} did not reach "
                                                    f"sequence {min_sequence} within {wait_ms} ms, retry later",
                              "min_sequence")
            await asyncio.sleep(min(WAIT_POLL_INTERVAL_S, remaining_s))

    min_sequence_query = Query(None, ge=1, description="wait until the account has reached this sequence")
    wait_ms_query = Query(WAIT_MS_DEFAULT, ge=0, le=WAIT_MS_MAX,
                          description="how long to wait for min_sequence before answering 504")

    @router.get("/v1/accounts/{account_id}", response_model=AccountView, responses=account_errors)
    async def get_account(account_id: str = Path(max_length=64), min_sequence: int | None = min_sequence_query,
                          wait_ms: int = wait_ms_query):
        account = await account_at(account_id, min_sequence, wait_ms)
        if isinstance(account, JSONResponse):
            return account
        return AccountView(account_id=account.account_id, currency=account.currency, kind=account.kind,
                           status=account.status, balance=format_amount(account.balance_minor, account.currency),
                           sequence=account.sequence)

    @router.get("/v1/accounts/{account_id}/transactions", response_model=HistoryPage, responses=account_errors)
    async def get_history(
        account_id: str = Path(max_length=64),
        limit: int = Query(HISTORY_LIMIT_DEFAULT, ge=1, le=HISTORY_LIMIT_MAX),
        cursor: str | None = Query(None, pattern=r"^[1-9][0-9]{0,17}$",
                                   description="the next_cursor of the previous page (opaque)"),
        min_sequence: int | None = min_sequence_query,
        wait_ms: int = wait_ms_query,
    ):
        account = await account_at(account_id, min_sequence, wait_ms)
        if isinstance(account, JSONResponse):
            return account
        try:
            # One row more than asked tells whether an older page exists.
            rows = await read("entries", account_id, limit + 1, int(cursor) if cursor is not None else None)
        except _Unavailable as error:
            return _error(503, "readmodel_unavailable", str(error))
        currency = account.currency
        page = rows[:limit]
        return HistoryPage(
            account_id=account_id, currency=currency,
            entries=[EntryView(transaction_id=row.transaction_id, type=row.type,
                               amount=format_amount(row.amount_minor, currency),
                               balance_after=format_amount(row.balance_after_minor, currency), sequence=row.sequence,
                               time=iso_utc(row.ts_ms), counterparty=row.counterparty) for row in page],
            next_cursor=str(page[-1].sequence) if len(rows) > limit else None)

    @router.get("/v1/transactions/{transaction_id}", response_model=TransactionView, responses=unavailable)
    async def get_transaction(transaction_id: str = Path(max_length=128)):
        try:
            row = await read("transaction", transaction_id)
        except _Unavailable as error:
            return _error(503, "readmodel_unavailable", str(error))
        if row is None:
            return TransactionView(transaction_id=transaction_id, status="unknown", reason=None)
        return TransactionView(transaction_id=transaction_id, status=row.status, reason=row.reason)

    @functools.cache
    def admin() -> AdminClient:
        return admin_client(kafka_settings.bootstrap, role="readmodel")

    def lag() -> list[PartitionLag]:
        return read_lag(admin(), kafka_settings, readers.call("offsets"), LAG_TIMEOUT_S)

    @router.get("/v1/readmodel/lag", response_model=LagView, responses=unavailable)
    async def get_lag():
        try:
            lags = await run_in_threadpool(lag)
        except _Unavailable as error:
            return _error(503, "readmodel_unavailable", str(error))
        except (KafkaException, ReadModelError, TimeoutError) as error:
            return _error(503, "kafka_unavailable",
                          f"cannot read the end offsets from Kafka at {kafka_settings.bootstrap}: {error}")
        return LagView(total_lag=sum(item.lag for item in lags),
                       partitions=[PartitionLagView(topic=item.topic, partition=item.partition,
                                                    next_offset=item.next_offset, end_offset=item.end_offset,
                                                    lag=item.lag) for item in lags])

    return router


async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    """A 422 naming the first offending parameter, in the API's error shape."""
    first = error.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else None
    return _error(422, "invalid_request", f"{field}: {first['msg']}" if field else first["msg"], field)


def create_app(db_url: str, settings: Settings | None = None) -> FastAPI:
    """The query API on its own (`wallet readmodel serve`)."""
    app = FastAPI(title="Streamwallet query API", version="1")
    app.include_router(query_router(db_url, settings))
    app.add_exception_handler(RequestValidationError, validation_error)
    return app
