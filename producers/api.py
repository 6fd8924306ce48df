"""The HTTP command API: each request becomes one command on `wallet.commands`, then waits for its outcome.

The pydantic models below are the API's contract (what clients send over HTTP); the Kafka
message contract stays in `schemas/`. Validation here uses the core's own rules
(`parse_amount_minor`; the id pattern and lengths of `schemas.commands`, which the Kafka
decoder leaves to the edges), so a request the API accepts is one the state machine can decide.

Every command answers `{"status": "success" | "failure" | "pending", "transaction_id", "reason"}`:
200 with a final status, or 202 `pending` when the outcome did not arrive within the wait
(retry the same request, or ask `GET /v1/transactions/{id}`). Retrying a request with the same
transaction id and payload returns the first answer; with another payload it answers
`failure` / `duplicate_conflict`. Invalid input answers 4xx with the field and the reason;
a Kafka outage answers 503 within the publish bound, never a hang.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from producers.client import (
    REQUEST_WAIT_MS_DEFAULT, CommandPublisher, OutcomesUnavailableError, OutcomeWaiter, PublishError, WalletClient,
    canonical_amount, local_command,
)
from schemas.commands import (
    ACCOUNT_ID_LENGTH_MAX, ID_PATTERN, TRANSACTION_ID_LENGTH_MAX, Close, Command, Deposit, Freeze, OpenAccount,
    PayMerchant, Transfer, Unfreeze, Withdraw, is_valid_id,
)
from streams.core.money import AmountError, minor_units_of
from infra.settings import Settings

REQUEST_WAIT_MS_MAX = 30_000
PUBLISH_TIMEOUT_MS_DEFAULT = 5000
BODY_BYTES_MAX = 16 * 1024
# How long a request waits for the outcome consumer to connect before answering 503.
CONSUMER_READY_WAIT_S = 2.0
BROKER_CHECK_TIMEOUT_S = 1.0
STATUS_CACHE_SIZE = 100_000


def _id_constraints(length_max: int) -> dict[str, Any]:
    # The contract's id rules (schemas.commands), which the edges enforce for the Kafka path.
    return {"min_length": 1, "max_length": length_max, "pattern": ID_PATTERN}


def _valid_id(length_max: int):
    # The one id rule (schemas.commands.is_valid_id) on top of the schema's pattern, which
    # documents it for clients and fuzzers.
    def check(value: str) -> str:
        if not is_valid_id(value, length_max):
            raise PydanticCustomError("invalid_id", "ids are 1 to {length_max} letters, digits and . _ : @ -, "
                                      "starting with a letter or digit", {"length_max": length_max})
        return value
    return AfterValidator(check)


AccountIdText = Annotated[str, Field(description=f"account id: letters, digits and . _ : @ -, 1 to "
                                                 f"{ACCOUNT_ID_LENGTH_MAX} characters",
                                     **_id_constraints(ACCOUNT_ID_LENGTH_MAX)), _valid_id(ACCOUNT_ID_LENGTH_MAX)]
TransactionIdText = Annotated[str, Field(description=f"client-chosen id of this request, 1 to "
                                                     f"{TRANSACTION_ID_LENGTH_MAX} characters; reuse it to retry the "
                                                     "same request", **_id_constraints(TRANSACTION_ID_LENGTH_MAX)),
                             _valid_id(TRANSACTION_ID_LENGTH_MAX)]


def _amount_is_text(value: Any) -> Any:
    if not isinstance(value, str):
        raise PydanticCustomError("amount_not_string",
                                  "amount must be a JSON string such as \"12.34\", not a {kind}: "
                                  "numbers lose cents in many JSON libraries", {"kind": type(value).__name__})
    return value


AmountText = Annotated[str, BeforeValidator(_amount_is_text), Field(
    description="positive decimal string, at most the currency's decimal places, e.g. \"12.34\"", examples=["12.34"])]
CurrencyCode = Annotated[str, Field(description="ISO 4217 code with minor units, e.g. USD", examples=["USD"])]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("currency", check_fields=False)
    @classmethod
    def _known_currency(cls, currency: str) -> str:
        try:
            minor_units_of(currency)
        except AmountError as error:
            raise PydanticCustomError(error.reason, error.detail) from None
        return currency

    @field_validator("amount", check_fields=False)
    @classmethod
    def _acceptable_amount(cls, amount: str, info: ValidationInfo) -> str:
        currency = info.data.get("currency")
        if currency is None:
            return amount  # the currency's own error is reported; decimals cannot be checked without it
        try:
            return canonical_amount(amount, currency)
        except AmountError as error:
            raise PydanticCustomError(error.reason, error.detail) from None


# `currency` is declared before `amount` in the money bodies because the amount's check needs it.
class BalanceTransferRequest(_Body):
    from_account: AccountIdText
    to_account: AccountIdText
    currency: CurrencyCode
    amount: AmountText
    transaction_id: TransactionIdText
    merchant_payment: bool = Field(False, description="require the receiver to be a merchant account (pay_merchant)")


class OpenAccountRequest(_Body):
    account_id: AccountIdText
    currency: CurrencyCode
    kind: Literal["user", "merchant"] = "user"
    transaction_id: TransactionIdText


class MoneyRequest(_Body):
    currency: CurrencyCode
    amount: AmountText
    transaction_id: TransactionIdText


class StatusChangeRequest(_Body):
    transaction_id: TransactionIdText


class CommandReply(BaseModel):
    status: Literal["success", "failure", "pending"]
    transaction_id: str
    reason: str | None = None


class TransactionStatusReply(BaseModel):
    """The read model's shape of a transaction's status, so that clients see one shape either way."""
    transaction_id: str
    status: Literal["success", "failure", "pending", "unknown"]
    reason: str | None = None


class FieldError(BaseModel):
    field: str
    reason: str
    message: str


class ErrorReply(BaseModel):
    error: str
    message: str
    errors: list[FieldError] = []


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": CommandReply, "description": "pending: the outcome was not known within the wait"},
    400: {"model": ErrorReply, "description": "the body is not valid JSON"},
    413: {"model": ErrorReply, "description": "the body is larger than the limit"},
    415: {"model": ErrorReply, "description": "the body is not sent as application/json"},
    422: {"model": ErrorReply, "description": "a field is missing or invalid; `errors` names each"},
    503: {"model": ErrorReply, "description": "Kafka is unavailable; retry with the same transaction_id"},
}

AccountPath = Annotated[str, Path(**_id_constraints(ACCOUNT_ID_LENGTH_MAX)), _valid_id(ACCOUNT_ID_LENGTH_MAX)]
WaitMs = Annotated[int | None, Query(ge=0, description="how long to wait for the outcome, in ms "
                                     "(default and maximum are server settings; larger values are capped)")]


def create_app(
    settings: Settings,
    request_wait_ms: int = REQUEST_WAIT_MS_DEFAULT,
    readmodel_db: str | None = None,
    *,
    request_wait_ms_max: int = REQUEST_WAIT_MS_MAX,
    publish_timeout_ms: int = PUBLISH_TIMEOUT_MS_DEFAULT,
    body_bytes_max: int = BODY_BYTES_MAX,
) -> FastAPI:
    """The API for the topics of `settings`; with `readmodel_db`, also the read model's query routes."""
    if not 0 <= request_wait_ms <= request_wait_ms_max:
        raise ValueError(f"request_wait_ms must be within 0..{request_wait_ms_max}, got {request_wait_ms}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        waiter = OutcomeWaiter.from_settings(settings, cache_size_max=STATUS_CACHE_SIZE)
        # Not waiting for readiness here: the API starts during an outage and answers 503
        # until Kafka is back, instead of refusing to start.
        waiter.start()
        publisher = CommandPublisher.from_settings(settings, message_timeout_ms=publish_timeout_ms, linger_ms=1,
                                                   client_id="wallet-api")
        app.state.client = WalletClient(publisher, waiter)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.client.close)

    app = FastAPI(
        title="Streamwallet command API",
        version="1",
        description=__doc__,
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
    )
    app.add_middleware(_BodyGate, body_bytes_max=body_bytes_max)
    app.add_exception_handler(RequestValidationError, _validation_error)

    async def execute(request: Request, command: Command, wait_ms: int | None) -> JSONResponse:
        client: WalletClient = request.app.state.client
        wait_s = min(request_wait_ms if wait_ms is None else wait_ms, request_wait_ms_max) / 1000
        unavailable = await _kafka_unavailable_reason(client)
        if unavailable is not None:
            return _error(503, "kafka_unavailable", unavailable)
        try:
            outcome = await client.request_async(command, wait_s)
        except OutcomesUnavailableError as error:
            return _error(503, "kafka_unavailable", str(error))
        except PublishError as error:
            fate = ("it may have been recorded" if error.possibly_persisted else "it was not recorded")
            return _error(503, "kafka_unavailable",
                          f"Kafka did not accept the command ({error}); {fate}: retry with the same transaction_id")
        if outcome is None:
            return JSONResponse(CommandReply(status="pending", transaction_id=command.transaction_id).model_dump(),
                                status_code=202)
        return JSONResponse(CommandReply(status=outcome.status, transaction_id=outcome.transaction_id,
                                         reason=outcome.reason).model_dump())

    @app.post("/v1/wallet/balance_transfer", response_model=CommandReply, tags=["commands"],
              summary="move money from one wallet to another (or pay a merchant)")
    async def balance_transfer(body: BalanceTransferRequest, request: Request, wait_ms: WaitMs = None) -> JSONResponse:
        command_class = PayMerchant if body.merchant_payment else Transfer
        command = local_command(command_class, transaction_id=body.transaction_id,
                                from_account=body.from_account, to_account=body.to_account, amount=body.amount,
                                currency=body.currency)
        return await execute(request, command, wait_ms)

    @app.post("/v1/accounts", response_model=CommandReply, tags=["commands"], summary="open an account")
    async def open_account(body: OpenAccountRequest, request: Request, wait_ms: WaitMs = None) -> JSONResponse:
        command = local_command(OpenAccount, transaction_id=body.transaction_id, account_id=body.account_id,
                              currency=body.currency, kind=body.kind)
        return await execute(request, command, wait_ms)

    def money_route(path: str, command_class: type[Deposit] | type[Withdraw], summary: str) -> None:
        @app.post(path, response_model=CommandReply, tags=["commands"], summary=summary,
                  name=command_class.__struct_config__.tag)
        async def move_money(account_id: AccountPath, body: MoneyRequest, request: Request,
                             wait_ms: WaitMs = None) -> JSONResponse:
            command = local_command(command_class, transaction_id=body.transaction_id, account_id=account_id,
                                    amount=body.amount, currency=body.currency)
            return await execute(request, command, wait_ms)

    def status_route(path: str, command_class: type[Freeze] | type[Unfreeze] | type[Close], summary: str) -> None:
        @app.post(path, response_model=CommandReply, tags=["commands"], summary=summary,
                  name=command_class.__struct_config__.tag)
        async def change_status(account_id: AccountPath, body: StatusChangeRequest, request: Request,
                                wait_ms: WaitMs = None) -> JSONResponse:
            command = local_command(command_class, transaction_id=body.transaction_id, account_id=account_id)
            return await execute(request, command, wait_ms)

    money_route("/v1/accounts/{account_id}/deposit", Deposit, "deposit money from a bank account")
    money_route("/v1/accounts/{account_id}/withdraw", Withdraw, "withdraw money to a bank account")
    status_route("/v1/accounts/{account_id}/freeze", Freeze, "freeze an account (it can neither send nor receive)")
    status_route("/v1/accounts/{account_id}/unfreeze", Unfreeze, "unfreeze a frozen account")
    status_route("/v1/accounts/{account_id}/close", Close, "close an account whose balance is zero")

    @app.get("/healthz", tags=["operations"], summary="the process answers; is its outcome consumer connected?")
    async def health(request: Request) -> dict:
        client: WalletClient = request.app.state.client
        return {"status": "ok", "outcomes_consumer_ready": client.waiter.ready,
                "readmodel": readmodel_db is not None}

    if readmodel_db is not None:
        # Imported only when configured: the command API runs without the read model's dependencies.
        from consumers.readmodel.query_api import query_router
        app.include_router(query_router(readmodel_db, settings))
    else:
        @app.get("/v1/transactions/{transaction_id}", response_model=TransactionStatusReply, tags=["queries"],
                 summary="status of a recent transaction, from this API process's memory",
                 description="Without a read model (`--readmodel-db`), the status comes from a bounded cache of "
                             f"the last {STATUS_CACHE_SIZE} transactions this process published or saw an "
                             "outcome of since it started; any other is `unknown`. With a read model, the read "
                             "model serves this path from the ledger, in the same shape.")
        async def transaction_status(transaction_id: Annotated[str, Path(max_length=TRANSACTION_ID_LENGTH_MAX)],
                                     request: Request) -> TransactionStatusReply:
            client: WalletClient = request.app.state.client
            known = client.waiter.status(transaction_id)
            if known is None:
                return TransactionStatusReply(transaction_id=transaction_id, status="unknown")
            return TransactionStatusReply(transaction_id=transaction_id, status=known.status, reason=known.reason)

    return app


async def _kafka_unavailable_reason(client: WalletClient) -> str | None:
    """Why a command cannot be published now, found quickly; None when it can be tried."""
    if not client.waiter.ready and not await asyncio.to_thread(client.waiter.wait_ready, CONSUMER_READY_WAIT_S):
        return client.waiter.unavailable_reason(CONSUMER_READY_WAIT_S)
    if client.publisher.brokers_down and not await asyncio.to_thread(client.publisher.broker_reachable,
                                                                     BROKER_CHECK_TIMEOUT_S):
        return f"no Kafka broker answered within {BROKER_CHECK_TIMEOUT_S:.0f} s; retry with the same transaction_id"
    return None


def _error(status_code: int, error: str, message: str, errors: list[FieldError] | None = None) -> JSONResponse:
    body = ErrorReply(error=error, message=message, errors=errors or [])
    return JSONResponse(body.model_dump(), status_code=status_code)


# pydantic's error types that deserve a plainer name for API clients.
_REASONS = {"missing": "missing", "extra_forbidden": "unknown_field", "string_type": "must_be_string",
            "bool_type": "must_be_boolean", "string_pattern_mismatch": "invalid_characters",
            "string_too_short": "too_short", "string_too_long": "too_long", "literal_error": "not_allowed",
            "model_attributes_type": "must_be_object", "dict_type": "must_be_object", "json_invalid": "malformed_json"}


_ID_CHARACTERS = "must start with a letter or digit and contain only letters, digits and . _ : @ -"


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = []
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        field = ".".join(location[1:]) if item["type"] != "json_invalid" and len(location) > 1 else location[0]
        reason = _REASONS.get(item["type"], item["type"])
        message = _ID_CHARACTERS if reason == "invalid_characters" else item["msg"]
        errors.append(FieldError(field=field, reason=reason, message=message))
    malformed = any(item.reason == "malformed_json" for item in errors)
    summary = "; ".join(f"{item.field}: {item.message}" for item in errors)
    if malformed:
        return _error(400, "malformed_json", f"the body is not valid JSON ({summary})", errors)
    return _error(422, "invalid_request", summary, errors)


class _BodyGate:
    """Refuses non-JSON bodies (415) and bodies above the limit (413) before validation sees them.

    Without the content-type check a form-encoded body (curl's default) would reach the
    models as an empty object and be reported as a confusing "must be an object".
    """

    def __init__(self, app, body_bytes_max: int) -> None:
        self.app = app
        self.body_bytes_max = body_bytes_max

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if content_type != b"application/json" and not content_type.endswith(b"+json"):
            await _send(send, _error(415, "unsupported_media_type",
                                     f"the body must be JSON sent with Content-Type: application/json, "
                                     f"not {content_type.decode(errors='replace')}",
                                     [FieldError(field="content-type", reason="not_json",
                                                 message="use Content-Type: application/json")]))
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.body_bytes_max:
            await self._refuse(send)
            return
        chunks, size_bytes, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size_bytes += len(chunk)
            if size_bytes > self.body_bytes_max:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        await _send(send, _error(413, "body_too_large", f"the request body exceeds {self.body_bytes_max} bytes",
                                 [FieldError(field="body", reason="too_large",
                                             message=f"at most {self.body_bytes_max} bytes are accepted")]))


async def _send(send, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
