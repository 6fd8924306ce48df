"""The HTTP routes of holds: place, capture and void, each one command on `wallet.commands`.

Same answer shape, status codes, scopes, rate limits and waits as the other command routes
(`producers/api.py`). Who may: place = the owner of the held (payer's) account, scope
`wallet:user`; capture and void = the payer's owner (`wallet:user`) or an operator
(`wallet:operator`). The destination's owner cannot capture: the payer's partition, where a
capture is decided, does not know who owns the destination. The deterministic core decides
all of it again from the command's actor and role; the edge only picks who asks.

Capture and void name the hold alone (`/v1/holds/{hold id}/...`), but a command is keyed by
the payer's account: this side of the boundary finds that account in the read model, among
the holds the caller may act on (`HoldFinder`, given by the app's composition, since this
module knows nothing of the read model). No match: 404 `hold_not_found`; matches on two
accounts: 409 `ambiguous_transaction_id` (name one with `?account_id=`). Without a read
model, `?account_id=` is required. A hold id, a capture id and a void id are ids of the
contract; the hold's account and currency come from the read model, never from the body.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from infra.http import ApiError, FieldError, error_responses
from producers.api import (
    _AMOUNT_BY_CURRENCY,
    _COMMAND_RESPONSES,
    AccountIdText,
    AccountPath,
    AmountText,
    ApiOptions,
    CommandReply,
    CurrencyCode,
    TransactionIdText,
    WaitMs,
    WholeNumber,
    _amount_is_text,
    _amount_pattern,
    _Body,
    _Executor,
    _id_constraints,
    _valid_id,
    _who,
)
from producers.auth import SCOPE_OPERATOR, SCOPE_USER, Gate, Principal
from producers.client import CAPTURE_ID_SUFFIX, VOID_ID_SUFFIX, canonical_amount
from schemas.commands import (
    ACCOUNT_ID_LENGTH_MAX,
    HOLD_EXPIRY_MS_MAX,
    TRANSACTION_ID_LENGTH_MAX,
    CaptureHold,
    PlaceHold,
    Role,
    VoidHold,
)
from streams.core.currencies import MINOR_UNITS
from streams.core.money import AmountError

HOLD_EXPIRY_S_MAX = HOLD_EXPIRY_MS_MAX // 1000
# How long a capture or void waits for the read model to show a hold it does not show yet (a
# hold placed a moment ago); at most the request's own wait.
HOLD_LOOKUP_WAIT_MS_MAX = 2_000
HOLD_LOOKUP_POLL_INTERVAL_S = 0.05

SCOPES_PLACE = (SCOPE_USER,)
SCOPES_SETTLE = (SCOPE_USER, SCOPE_OPERATOR)


class FoundHold(Protocol):
    """What the command side needs to know of a hold the read model holds."""

    @property
    def account_id(self) -> str: ...  # the payer: its partition decides captures and voids

    @property
    def currency(self) -> str: ...

    @property
    def owner(self) -> str: ...  # owner of the payer's account

    @property
    def to_owner(self) -> str: ...  # owner of the destination ("" when the read model does not know it)


# (hold id, principal or None for every hold) -> every hold with that id on an account the
# principal owns or that is destined to one it owns; raises ApiError (503) when it cannot read.
HoldFinder = Callable[[str, str | None], Awaitable[Sequence[FoundHold]]]


def _amount_text_or_none(value: Any) -> Any:
    return None if value is None else _amount_is_text(value)


HoldIdPath = Annotated[
    str,
    Path(
        description="the hold id: the transaction id of the place_hold request",
        **_id_constraints(TRANSACTION_ID_LENGTH_MAX),
    ),
    _valid_id(TRANSACTION_ID_LENGTH_MAX),
]
HoldAccountQuery = Annotated[
    str | None,
    Query(
        description="the hold's (payer's) account: needed when the hold id names holds of several accounts, "
        "or when the API has no read model",
        **_id_constraints(ACCOUNT_ID_LENGTH_MAX),
    ),
    _valid_id(ACCOUNT_ID_LENGTH_MAX),
]
OptionalIdText = Annotated[
    str | None,
    Field(
        description=f"1 to {TRANSACTION_ID_LENGTH_MAX} characters: letters, digits and . _ : @ -",
        **_id_constraints(TRANSACTION_ID_LENGTH_MAX),
    ),
    _valid_id(TRANSACTION_ID_LENGTH_MAX),
]


class PlaceHoldRequest(_Body):
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_AMOUNT_BY_CURRENCY)

    to_account: AccountIdText
    currency: CurrencyCode
    amount: AmountText
    transaction_id: TransactionIdText
    expires_in_s: WholeNumber = Field(
        ge=1,
        le=HOLD_EXPIRY_S_MAX,
        description=f"seconds after the hold's own decision time at which it expires (1 to {HOLD_EXPIRY_S_MAX})",
    )


class CaptureHoldRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    amount: Annotated[
        str | None,
        BeforeValidator(_amount_text_or_none),
        Field(
            description="what to capture now, a positive decimal string in the hold's currency (default: all "
            "that is still held)",
            examples=["12.34"],
            json_schema_extra={"pattern": _amount_pattern(max(MINOR_UNITS.values()))},
        ),
    ] = None
    final: bool = Field(default=True, description="release whatever the hold still holds after this capture")
    capture_id: OptionalIdText = Field(
        default=None,
        description=f"this capture's own transaction id (default: the hold id + `{CAPTURE_ID_SUFFIX}`, or "
        f"`h-<BLAKE2b hex of the hold id>{CAPTURE_ID_SUFFIX}` where that is too long); give each capture of a "
        "hold its own id, and reuse it to retry",
    )


class VoidHoldRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    void_id: OptionalIdText = Field(
        default=None,
        description=f"this void's own transaction id (default: the hold id + `{VOID_ID_SUFFIX}`, or "
        f"`h-<BLAKE2b hex of the hold id>{VOID_ID_SUFFIX}` where that is too long)",
    )


def hold_router(gate: Gate, options: ApiOptions, find_holds: HoldFinder | None) -> APIRouter:
    """The hold routes; `find_holds` reads the read model (None: the API has none)."""
    options.check()
    router = APIRouter(tags=["holds"], responses=_COMMAND_RESPONSES)
    execute = _Executor(gate, options)
    placer, settler = Depends(gate.requires(*SCOPES_PLACE)), Depends(gate.requires(*SCOPES_SETTLE))

    @router.post(
        "/v1/accounts/{account_id}/holds",
        response_model=CommandReply,
        summary="reserve money of one of your accounts for a destination account; scope wallet:user",
        description="The hold id is the `transaction_id`. The money stays in the balance but is no longer "
        "available (available = balance - held) until the hold is captured, voided or expires.",
    )
    async def place_hold(
        account_id: AccountPath,
        body: PlaceHoldRequest,
        request: Request,
        wait_ms: WaitMs = None,
        caller: Principal = placer,
    ) -> JSONResponse:
        command = PlaceHold(
            transaction_id=body.transaction_id,
            account_id=account_id,
            to_account=body.to_account,
            amount=body.amount,
            currency=body.currency,
            expires_in_ms=body.expires_in_s * 1000,
            **_who(caller, SCOPES_PLACE),
        )
        return await execute(request, command, wait_ms)

    @router.post(
        "/v1/holds/{transaction_id}/capture",
        response_model=CommandReply,
        responses=_LOOKUP_RESPONSES,
        summary="move all or part of a hold to its destination; scope wallet:user (the payer's owner) or "
        "wallet:operator",
        description="Several captures of one hold are allowed, each with its own `capture_id`; `final` (default) "
        "releases the rest. Like a transfer, the answer is `success` once the destination is credited, or "
        "`failure` after a refund. The destination's owner cannot capture.",
    )
    async def capture_hold(
        transaction_id: HoldIdPath,
        request: Request,
        body: Annotated[CaptureHoldRequest | None, Body()] = None,
        account_id: HoldAccountQuery = None,
        wait_ms: WaitMs = None,
        caller: Principal = settler,
    ) -> JSONResponse:
        body = body if body is not None else CaptureHoldRequest()
        capture_id = own_id(body.capture_id, transaction_id, CAPTURE_ID_SUFFIX)
        account, currency, role = await _hold_account(
            find_holds, caller, transaction_id, account_id, _lookup_wait_ms(options, wait_ms)
        )
        amount = None
        if body.amount is not None:
            try:
                amount = canonical_amount(body.amount, currency) if currency else body.amount
            except AmountError as error:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"amount: {error.detail}",
                    [FieldError(field="amount", reason=error.reason, message=error.detail)],
                ) from None
        command = CaptureHold(
            transaction_id=capture_id,
            account_id=account,
            hold_id=transaction_id,
            amount=amount,
            final=body.final,
            actor=caller.sub,
            role=role,
        )
        return await execute(request, command, wait_ms)

    @router.post(
        "/v1/holds/{transaction_id}/void",
        response_model=CommandReply,
        responses=_LOOKUP_RESPONSES,
        summary="release a hold; scope wallet:user (the payer's owner) or wallet:operator",
    )
    async def void_hold(
        transaction_id: HoldIdPath,
        request: Request,
        body: Annotated[VoidHoldRequest | None, Body()] = None,
        account_id: HoldAccountQuery = None,
        wait_ms: WaitMs = None,
        caller: Principal = settler,
    ) -> JSONResponse:
        body = body if body is not None else VoidHoldRequest()
        void_id = own_id(body.void_id, transaction_id, VOID_ID_SUFFIX)
        account, _, role = await _hold_account(
            find_holds, caller, transaction_id, account_id, _lookup_wait_ms(options, wait_ms)
        )
        command = VoidHold(
            transaction_id=void_id, account_id=account, hold_id=transaction_id, actor=caller.sub, role=role
        )
        return await execute(request, command, wait_ms)

    async def _hold_account(
        find: HoldFinder | None, caller: Principal, hold_id: str, account_id: str | None, lookup_wait_ms: int
    ) -> tuple[str, str, Role]:
        """(payer's account, currency or "" when unknown, role) of the hold the caller acts on."""
        operator = SCOPE_OPERATOR in caller.scopes
        if find is None:
            if account_id is None:
                raise _field_error(
                    422,
                    "account_id_required",
                    "this API has no read model to find the hold in: name its account with ?account_id=",
                    "account_id",
                )
            # The core refuses a caller who neither owns the account nor is an operator.
            return account_id, "", "user" if SCOPE_USER in caller.scopes else "operator"
        deadline_s = time.monotonic() + lookup_wait_ms / 1000
        while True:
            found = [
                hold
                for hold in await find(hold_id, None if operator else caller.sub)
                if account_id is None or hold.account_id == account_id
            ]
            mine = [hold for hold in found if operator or _same(hold.owner, caller.sub)]
            if mine or found or time.monotonic() >= deadline_s:
                break
            await asyncio.sleep(HOLD_LOOKUP_POLL_INTERVAL_S)
        if len(mine) > 1:
            accounts = ", ".join(sorted(hold.account_id for hold in mine))
            raise _field_error(
                409,
                "ambiguous_transaction_id",
                f"hold id {hold_id!r} names holds of accounts {accounts}: ask with ?account_id=",
                "account_id",
            )
        if not mine:
            if found:  # visible to the caller as the destination's owner, who may not capture or void
                raise ApiError(
                    403,
                    "forbidden",
                    f"hold {hold_id!r} is destined to your account; only the owner of the held account "
                    f"{found[0].account_id!r} or an operator may capture or void it",
                )
            raise _field_error(404, "hold_not_found", f"hold {hold_id!r} not found", "transaction_id")
        (hold,) = mine
        owner_acts = SCOPE_USER in caller.scopes and _same(hold.owner, caller.sub)
        return hold.account_id, hold.currency, "user" if owner_acts else "operator"

    return router


_LOOKUP_RESPONSES = error_responses(404, 409)


def _lookup_wait_ms(options: ApiOptions, wait_ms: int | None) -> int:
    wait = options.request_wait_ms if wait_ms is None else wait_ms
    return min(wait, HOLD_LOOKUP_WAIT_MS_MAX)


def own_id(given: str | None, hold_id: str, suffix: str) -> str:
    """The capture's or void's transaction id: the one given, else the hold id with `suffix`; for
    a hold id too long for that, `h-`, the hex of its 16-byte BLAKE2b and `suffix`. Derived from
    the hold id alone, so every retry of a request without one gets the same id."""
    if given is not None:
        return given
    default = hold_id + suffix
    if len(default) <= TRANSACTION_ID_LENGTH_MAX:
        return default
    return f"h-{hashlib.blake2b(hold_id.encode(), digest_size=16).hexdigest()}{suffix}"


def _same(owner: str, sub: str) -> bool:
    return bool(owner) and hmac.compare_digest(owner.encode(), sub.encode())


def _field_error(status_code: int, error: str, message: str, field: str) -> ApiError:
    return ApiError(status_code, error, message, [FieldError(field=field, reason=error, message=message)])
