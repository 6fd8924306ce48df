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
import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, NamedTuple

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from infra.http import ApiError, FieldError, error_response, error_responses
from infra.settings import Settings
from producers.auth import SCOPE_BANK, SCOPE_OPERATOR, SCOPE_USER, SCOPES, Gate, Principal
from producers.client import (
    REQUEST_WAIT_MS_DEFAULT,
    CommandPublisher,
    OutcomesUnavailableError,
    OutcomeWaiter,
    PublishError,
    WalletClient,
    canonical_amount,
)
from schemas.commands import (
    ACCOUNT_ID_LENGTH_MAX,
    ID_PATTERN,
    SHARDS_MAX,
    TRANSACTION_ID_LENGTH_MAX,
    Close,
    Command,
    Deposit,
    Freeze,
    OpenAccount,
    PayMerchant,
    Transfer,
    Unfreeze,
    Withdraw,
    is_valid_id,
)
from streams.core.currencies import MINOR_UNITS
from streams.core.money import AmountError, minor_units_of

REQUEST_WAIT_MS_MAX = 30_000
PUBLISH_TIMEOUT_MS_DEFAULT = 5000
BODY_BYTES_MAX = 16 * 1024
# How long a request waits for the outcome consumer to connect before answering 503.
CONSUMER_READY_WAIT_S = 2.0
BROKER_CHECK_TIMEOUT_S = 1.0
READY_CHECK_TIMEOUT_S = 1.0
STATUS_CACHE_SIZE = 100_000


def _id_constraints(length_max: int) -> dict[str, Any]:
    # The contract's id rules (schemas.commands), which the edges enforce for the Kafka path.
    return {"min_length": 1, "max_length": length_max, "pattern": ID_PATTERN}


def _valid_id(length_max: int):
    # The one id rule (schemas.commands.is_valid_id) on top of the schema's pattern, which
    # documents it for clients and fuzzers. An optional id that is absent (null) has no rule.
    def check(value: str | None) -> str | None:
        if value is not None and not is_valid_id(value, length_max):
            raise PydanticCustomError(
                "invalid_id",
                "ids are 1 to {length_max} letters, digits and . _ : @ -, starting with a letter or digit",
                {"length_max": length_max},
            )
        return value

    return AfterValidator(check)


AccountIdText = Annotated[
    str,
    Field(
        description=f"account id: letters, digits and . _ : @ -, 1 to {ACCOUNT_ID_LENGTH_MAX} characters",
        **_id_constraints(ACCOUNT_ID_LENGTH_MAX),
    ),
    _valid_id(ACCOUNT_ID_LENGTH_MAX),
]
TransactionIdText = Annotated[
    str,
    Field(
        description=f"client-chosen id of this request, 1 to "
        f"{TRANSACTION_ID_LENGTH_MAX} characters; reuse it to retry the "
        "same request",
        **_id_constraints(TRANSACTION_ID_LENGTH_MAX),
    ),
    _valid_id(TRANSACTION_ID_LENGTH_MAX),
]


def _amount_is_text(value: Any) -> Any:
    if not isinstance(value, str):
        raise PydanticCustomError(
            "amount_not_string",
            'amount must be a JSON string such as "12.34", not a {kind}: numbers lose cents in many JSON libraries',
            {"kind": type(value).__name__},
        )
    return value


def _amount_pattern(decimals: int) -> str:
    """A positive plain decimal with at most `decimals` places and at most 10^15 minor units, as a regex.

    Written out without lookahead, so that fuzzers generating from the document can use it.
    """
    whole = f"[1-9][0-9]{{0,{AMOUNT_DIGITS_MAX - decimals - 1}}}"
    if decimals == 0:
        return f"^{whole}$"
    below_one = "|".join(f"0\\.{'0' * zeros}[1-9][0-9]{{0,{decimals - zeros - 1}}}" for zeros in range(decimals))
    return f"^({whole}(\\.[0-9]{{1,{decimals}}})?|{below_one})$"


# The amount's rule depends on the currency's minor units: stated in the document as JSON
# Schema if/then per group of currencies, so that a request the document allows is one the API accepts.
AMOUNT_DIGITS_MAX = 15
_CURRENCIES_BY_DECIMALS = {
    decimals: sorted(code for code, units in MINOR_UNITS.items() if units == decimals)
    for decimals in sorted(set(MINOR_UNITS.values()))
}
_AMOUNT_BY_CURRENCY: dict[str, Any] = {
    "allOf": [
        {
            "if": {"properties": {"currency": {"enum": codes}}, "required": ["currency"]},
            "then": {"properties": {"amount": {"pattern": _amount_pattern(decimals)}}},
        }
        for decimals, codes in _CURRENCIES_BY_DECIMALS.items()
    ]
}

AmountText = Annotated[
    str,
    BeforeValidator(_amount_is_text),
    Field(
        description='positive decimal string, at most the currency\'s decimal places, e.g. "12.34"',
        examples=["12.34"],
        json_schema_extra={"pattern": _amount_pattern(max(MINOR_UNITS.values()))},
    ),
]
CurrencyCode = Annotated[
    str,
    Field(
        description="ISO 4217 code with minor units, e.g. USD",
        examples=["USD"],
        json_schema_extra={"enum": sorted(MINOR_UNITS)},
    ),
]


def _whole_number(value: Any) -> Any:
    """An integer, or a JSON number with no fraction (60.0: an integer to JSON Schema, found by
    schemathesis); never a string or a boolean."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


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
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_AMOUNT_BY_CURRENCY)

    from_account: AccountIdText
    to_account: AccountIdText
    currency: CurrencyCode
    amount: AmountText
    transaction_id: TransactionIdText
    merchant_payment: bool = Field(False, description="require the receiver to be a merchant account (pay_merchant)")
    # Client-chosen, so it only picks among to_account's own shards (the core's rule: a shard
    # that does not exist refuses the credit and the payer is refunded).
    to_shards: WholeNumber = Field(
        1,
        ge=1,
        le=SHARDS_MAX,
        description="the receiving merchant's shard count (GET /v1/accounts/{id} shows it): the payment is "
        "credited to one of its shards, picked by the transaction id; 1: to_account itself",
    )


class OpenAccountRequest(_Body):
    account_id: AccountIdText
    currency: CurrencyCode
    kind: Literal["user", "merchant"] = "user"
    transaction_id: TransactionIdText
    shards: WholeNumber = Field(
        1,
        ge=1,
        le=SHARDS_MAX,
        description="a merchant only: split it into this many accounts on different partitions (a hot "
        "merchant); shard 0 is account_id, shard k is account_id::sk, opened by the ledger itself",
    )


class MoneyRequest(_Body):
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_AMOUNT_BY_CURRENCY)

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


class ApiOptions(NamedTuple):
    """The command API's bounds; the defaults are `wallet api`'s."""

    request_wait_ms: int = REQUEST_WAIT_MS_DEFAULT
    request_wait_ms_max: int = REQUEST_WAIT_MS_MAX
    publish_timeout_ms: int = PUBLISH_TIMEOUT_MS_DEFAULT
    body_bytes_max: int = BODY_BYTES_MAX

    def check(self) -> None:
        if not 0 <= self.request_wait_ms <= self.request_wait_ms_max:
            raise ValueError(
                f"request_wait_ms must be within 0..{self.request_wait_ms_max}, got {self.request_wait_ms}"
            )


_COMMAND_RESPONSES = {
    202: {"model": CommandReply, "description": "pending: the outcome was not known within the wait"},
    **error_responses(400, 401, 403, 413, 415, 422, 429, 503),
}

AccountPath = Annotated[str, Path(**_id_constraints(ACCOUNT_ID_LENGTH_MAX)), _valid_id(ACCOUNT_ID_LENGTH_MAX)]
WaitMs = Annotated[
    int | None,
    Query(
        ge=0,
        description="how long to wait for the outcome, in ms "
        "(default and maximum are server settings; larger values are capped)",
    ),
]
# Who may ask for each command (CONTRACT.md); the first scope the token holds becomes `role`.
SCOPES_OPEN = (SCOPE_USER, SCOPE_OPERATOR)
SCOPES_MOVE = (SCOPE_USER,)
SCOPES_BANK = (SCOPE_BANK,)
SCOPES_WITHDRAW = (SCOPE_BANK, SCOPE_USER)
SCOPES_STATUS = (SCOPE_OPERATOR,)


@contextlib.asynccontextmanager
async def command_side(app: FastAPI, settings: Settings, publish_timeout_ms: int) -> AsyncIterator[None]:
    """The process's one outcome waiter and one publisher, as `app.state.client`, for the app's life."""
    waiter = OutcomeWaiter.from_settings(settings, cache_size_max=STATUS_CACHE_SIZE)
    # Not waiting for readiness here: the API starts during an outage and answers 503
    # until Kafka is back, instead of refusing to start.
    waiter.start()
    publisher = CommandPublisher.from_settings(
        settings, message_timeout_ms=publish_timeout_ms, linger_ms=1, client_id="wallet-api"
    )
    app.state.client = WalletClient(publisher, waiter)
    try:
        yield
    finally:
        await asyncio.to_thread(app.state.client.close)


class _Executor:
    """Publishes one command for a caller and waits for its answer, within the caller's bound of waits."""

    def __init__(self, gate: Gate, options: ApiOptions) -> None:
        self.gate = gate
        self.options = options

    async def __call__(self, request: Request, command: Command, wait_ms: int | None) -> JSONResponse:
        client: WalletClient = request.app.state.client
        wait_s = (
            min(self.options.request_wait_ms if wait_ms is None else wait_ms, self.options.request_wait_ms_max) / 1000
        )
        unavailable = await _kafka_unavailable_reason(client)
        if unavailable is not None:
            raise ApiError(503, "kafka_unavailable", unavailable)
        limited = self.gate.verifier is not None  # authentication off: no principals to bound
        if limited and not self.gate.limiter.enter_wait(command.actor):
            raise ApiError(
                429,
                "too_many_waiting",
                f"{command.actor} already has {self.gate.limiter.limits.concurrent_waits_max} requests "
                "waiting for outcomes; retry after one has answered",
                headers={"Retry-After": "1"},
            )
        try:
            outcome = await client.request_async(command, wait_s)
        except OutcomesUnavailableError as error:
            raise ApiError(503, "kafka_unavailable", str(error)) from None
        except PublishError as error:
            fate = "it may have been recorded" if error.possibly_persisted else "it was not recorded"
            raise ApiError(
                503,
                "kafka_unavailable",
                f"Kafka did not accept the command ({error}); {fate}: retry with the same transaction_id",
            ) from None
        finally:
            if limited:
                self.gate.limiter.leave_wait(command.actor)
        answers = request.app.state.metrics.command_answers
        if outcome is None:
            answers.labels(command_type_name(type(command)), "pending").inc()
            return JSONResponse(
                CommandReply(status="pending", transaction_id=command.transaction_id).model_dump(), status_code=202
            )
        answers.labels(command_type_name(type(command)), outcome.status).inc()
        return JSONResponse(
            CommandReply(
                status=outcome.status, transaction_id=outcome.transaction_id, reason=outcome.reason
            ).model_dump()
        )


def command_type_name(command_class: type[Command]) -> str:
    """The route name of a command class: its tag on the wire."""
    return str(command_class.__struct_config__.tag)


def _who(caller: Principal, scopes: tuple[str, ...]) -> dict[str, Any]:
    """The command's `actor` and `role`: set here, at the trusted edge, never from the body."""
    role = caller.role_for(scopes)
    assert role is not None, f"{caller.sub} passed the gate without any of {scopes}"
    return {"actor": caller.sub, "role": role}


def command_router(gate: Gate, options: ApiOptions) -> APIRouter:
    """Every command route: authenticate, authorise by scope, publish with the caller as actor, wait."""
    options.check()
    router = APIRouter(tags=["commands"], responses=_COMMAND_RESPONSES)
    execute = _Executor(gate, options)
    _transfer_routes(router, gate, execute)
    _money_routes(router, gate, execute)
    _status_routes(router, gate, execute)
    return router


# The gate's dependencies are made once per router and named, because FastAPI resolves a
# parameter's annotation in the module's namespace (postponed annotations) but its default as a value.
def _transfer_routes(router: APIRouter, gate: Gate, execute: _Executor) -> None:
    mover, opener = Depends(gate.requires(*SCOPES_MOVE)), Depends(gate.requires(*SCOPES_OPEN))

    @router.post(
        "/v1/wallet/balance_transfer",
        response_model=CommandReply,
        summary="move money from one of your wallets to any wallet (or pay a merchant); scope wallet:user",
    )
    async def balance_transfer(
        body: BalanceTransferRequest, request: Request, wait_ms: WaitMs = None, caller: Principal = mover
    ) -> JSONResponse:
        command_class = PayMerchant if body.merchant_payment else Transfer
        command = command_class(
            transaction_id=body.transaction_id,
            from_account=body.from_account,
            to_account=body.to_account,
            amount=body.amount,
            currency=body.currency,
            to_shards=body.to_shards,
            **_who(caller, SCOPES_MOVE),
        )
        return await execute(request, command, wait_ms)

    @router.post(
        "/v1/accounts",
        response_model=CommandReply,
        summary="open an account, owned by the caller; scope wallet:user or wallet:operator",
    )
    async def open_account(
        body: OpenAccountRequest, request: Request, wait_ms: WaitMs = None, caller: Principal = opener
    ) -> JSONResponse:
        command = OpenAccount(
            transaction_id=body.transaction_id,
            account_id=body.account_id,
            currency=body.currency,
            kind=body.kind,
            shards=body.shards,
            **_who(caller, SCOPES_OPEN),
        )
        return await execute(request, command, wait_ms)


def _money_routes(router: APIRouter, gate: Gate, execute: _Executor) -> None:
    def money_route(
        path: str, command_class: type[Deposit] | type[Withdraw], scopes: tuple[str, ...], summary: str
    ) -> None:
        allowed = Depends(gate.requires(*scopes))

        @router.post(path, response_model=CommandReply, summary=summary, name=command_type_name(command_class))
        async def move_money(
            account_id: AccountPath,
            body: MoneyRequest,
            request: Request,
            wait_ms: WaitMs = None,
            caller: Principal = allowed,
        ) -> JSONResponse:
            command = command_class(
                transaction_id=body.transaction_id,
                account_id=account_id,
                amount=body.amount,
                currency=body.currency,
                **_who(caller, scopes),
            )
            return await execute(request, command, wait_ms)

    money_route(
        "/v1/accounts/{account_id}/deposit",
        Deposit,
        SCOPES_BANK,
        "deposit money from a bank account; scope wallet:bank",
    )
    money_route(
        "/v1/accounts/{account_id}/withdraw",
        Withdraw,
        SCOPES_WITHDRAW,
        "withdraw money to a bank account; scope wallet:bank, or wallet:user for the owner",
    )


def _status_routes(router: APIRouter, gate: Gate, execute: _Executor) -> None:
    operator = Depends(gate.requires(*SCOPES_STATUS))

    def status_route(path: str, command_class: type[Freeze] | type[Unfreeze] | type[Close], summary: str) -> None:
        @router.post(path, response_model=CommandReply, summary=summary, name=command_type_name(command_class))
        async def change_status(
            account_id: AccountPath,
            body: StatusChangeRequest,
            request: Request,
            wait_ms: WaitMs = None,
            caller: Principal = operator,
        ) -> JSONResponse:
            command = command_class(
                transaction_id=body.transaction_id, account_id=account_id, **_who(caller, SCOPES_STATUS)
            )
            return await execute(request, command, wait_ms)

    status_route(
        "/v1/accounts/{account_id}/freeze",
        Freeze,
        "freeze an account (it can neither send nor receive); scope wallet:operator",
    )
    status_route("/v1/accounts/{account_id}/unfreeze", Unfreeze, "unfreeze a frozen account; scope wallet:operator")
    status_route(
        "/v1/accounts/{account_id}/close", Close, "close an account whose balance is zero; scope wallet:operator"
    )


def cached_status_router(gate: Gate) -> APIRouter:
    """`GET /v1/transactions/{id}` from this process's memory, for an API without a read model."""
    router = APIRouter(tags=["queries"], responses=error_responses(401, 403, 422, 429))
    reader = Depends(gate.requires(*SCOPES))

    @router.get(
        "/v1/transactions/{transaction_id}",
        response_model=TransactionStatusReply,
        summary="status of one of your recent transactions, from this API process's memory",
        description="Without a read model (`--readmodel-db`), the status comes from a bounded cache of "
        f"the last {STATUS_CACHE_SIZE} transactions this process published or saw an "
        "outcome of since it started; any other, or another caller's, is `unknown`.",
    )
    async def transaction_status(
        transaction_id: Annotated[str, Path(max_length=TRANSACTION_ID_LENGTH_MAX)],
        request: Request,
        account_id: Annotated[str | None, Query(max_length=64)] = None,
        caller: Principal = reader,
    ) -> TransactionStatusReply:
        client: WalletClient = request.app.state.client
        known = client.waiter.status(transaction_id)
        if (
            known is None
            or not (caller.reads_everything or hmac.compare_digest(known.actor, caller.sub))
            or (account_id is not None and known.account_id != account_id)
        ):
            return TransactionStatusReply(transaction_id=transaction_id, status="unknown")
        return TransactionStatusReply.model_validate(
            {"transaction_id": transaction_id, "status": known.status, "reason": known.reason}
        )

    return router


def health_router(readmodel: bool) -> APIRouter:
    """`/healthz`: liveness (the process answers; 200 whatever Kafka does, so a supervisor restarts only a
    hung process). `/readyz`: readiness (200 only while a command can be published and answered; 503
    naming each check that failed, so a load balancer sends no traffic to an API cut off from Kafka)."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="the process answers; is its outcome consumer connected? (no token needed)")
    async def health(request: Request) -> HealthReply:
        client: WalletClient = request.app.state.client
        return HealthReply(status="ok", outcomes_consumer_ready=client.waiter.ready, readmodel=readmodel)

    @router.get(
        "/readyz",
        summary="can a command be published and answered now? 503 names what is not usable (no token needed)",
        responses=error_responses(503),
    )
    async def ready(request: Request) -> ReadyReply:
        client: WalletClient = request.app.state.client
        problems = await asyncio.to_thread(readiness_problems, client, READY_CHECK_TIMEOUT_S)
        if problems:
            raise ApiError(
                503,
                "not_ready",
                "; ".join(problem.message for problem in problems),
                problems,
                headers={"Retry-After": "1"},
            )
        return ReadyReply(status="ready", readmodel=readmodel)

    return router


def readiness_problems(client: WalletClient, timeout_s: float) -> list[FieldError]:
    """What stops a command from being published and answered now: each an error naming its check."""
    problems = []
    if not client.waiter.ready:
        problems.append(
            FieldError(
                field="outcomes_consumer",
                reason="not_ready",
                message=f"the outcome consumer of {client.waiter.outcomes_topic} is not positioned yet "
                f"(last error: {client.waiter.last_error or 'none reported'})",
            )
        )
    if not client.publisher.broker_reachable(timeout_s):
        problems.append(
            FieldError(
                field="kafka",
                reason="unreachable",
                message=f"no Kafka broker answered a metadata request for the commands topic within {timeout_s:.0f} s",
            )
        )
    return problems


class HealthReply(BaseModel):
    status: Literal["ok"]
    outcomes_consumer_ready: bool
    readmodel: bool


class ReadyReply(BaseModel):
    status: Literal["ready"]
    readmodel: bool


async def _kafka_unavailable_reason(client: WalletClient) -> str | None:
    """Why a command cannot be published now, found quickly; None when it can be tried."""
    if not client.waiter.ready and not await asyncio.to_thread(client.waiter.wait_ready, CONSUMER_READY_WAIT_S):
        return client.waiter.unavailable_reason(CONSUMER_READY_WAIT_S)
    if client.publisher.brokers_down and not await asyncio.to_thread(
        client.publisher.broker_reachable, BROKER_CHECK_TIMEOUT_S
    ):
        return f"no Kafka broker answered within {BROKER_CHECK_TIMEOUT_S:.0f} s; retry with the same transaction_id"
    return None


class BodyGate:
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
            await _send(
                send,
                error_response(
                    415,
                    "unsupported_media_type",
                    f"the body must be JSON sent with Content-Type: application/json, "
                    f"not {content_type.decode(errors='replace')}",
                    [FieldError(field="content-type", reason="not_json", message="use Content-Type: application/json")],
                ),
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.body_bytes_max:
            await self._refuse(send)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive, send) -> bytes | None:
        """The whole body, or None when it was refused (too large) or the client went away."""
        chunks, size_bytes, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size_bytes += len(chunk)
            if size_bytes > self.body_bytes_max:
                await self._refuse(send)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _refuse(self, send) -> None:
        await _send(
            send,
            error_response(
                413,
                "body_too_large",
                f"the request body exceeds {self.body_bytes_max} bytes",
                [
                    FieldError(
                        field="body", reason="too_large", message=f"at most {self.body_bytes_max} bytes are accepted"
                    )
                ],
            ),
        )


async def _send(send, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
