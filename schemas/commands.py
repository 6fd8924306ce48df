"""Commands: what producers ask the wallet to do, on the `wallet.commands` topic.

Each command is keyed by the account that owns the step (`owner_account`). `ts_ms` is set by
whoever produced the command and is the only clock the state machine reads.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Union

import msgspec

SCHEMA_VERSION = 1

# What an id may look like. The edges (HTTP API, CLI) enforce it; the decoder of the Kafka
# path checks only the lengths, because a regular expression per id field tripled the cost
# of decoding a command, and the core treats ids as opaque text anyway.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
ACCOUNT_ID_LENGTH_MAX = 64
TRANSACTION_ID_LENGTH_MAX = 128
AccountId = Annotated[str, msgspec.Meta(min_length=1, max_length=ACCOUNT_ID_LENGTH_MAX)]
TransactionId = Annotated[str, msgspec.Meta(min_length=1, max_length=TRANSACTION_ID_LENGTH_MAX)]
TimestampMs = Annotated[int, msgspec.Meta(ge=0)]
# Amounts stay strings here: whether one is acceptable is a decision of the state machine,
# recorded in the log, not a decode error.
AmountText = str
AccountKind = Literal["user", "merchant"]
# The scope under which the HTTP API authorised a client command (CONTRACT.md, message contract v2).
Role = Literal["user", "bank", "operator"]
ACTOR_LENGTH_MAX = 128
Actor = Annotated[str, msgspec.Meta(max_length=ACTOR_LENGTH_MAX)]


class _Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", gc=False):
    # The field naming the account whose partition decides the command (the record key).
    owner_field: ClassVar[str] = "account_id"

    v: int = SCHEMA_VERSION
    transaction_id: TransactionId
    ts_ms: TimestampMs


class _ClientCommand(_Command, kw_only=True):
    # Who asked (the authenticated principal) and under which role: set by the trusted edge
    # (the HTTP API), never taken from a client's body. Defaults keep v1 producers decodable
    # until the core's contract v2 makes them required.
    actor: Actor = ""
    role: Optional[Role] = None


class OpenAccount(_ClientCommand, tag="open_account"):
    account_id: AccountId
    currency: str
    kind: AccountKind = "user"


class Deposit(_ClientCommand, tag="deposit"):
    """Money arrives from a bank account outside the ledger."""
    account_id: AccountId
    amount: AmountText
    currency: str


class Withdraw(_ClientCommand, tag="withdraw"):
    """Money leaves to a bank account outside the ledger."""
    account_id: AccountId
    amount: AmountText
    currency: str


class Transfer(_ClientCommand, tag="transfer"):
    owner_field: ClassVar[str] = "from_account"
    from_account: AccountId
    to_account: AccountId
    amount: AmountText
    currency: str


class PayMerchant(_ClientCommand, tag="pay_merchant"):
    """A transfer whose receiving account must be of kind `merchant`."""
    owner_field: ClassVar[str] = "from_account"
    from_account: AccountId
    to_account: AccountId
    amount: AmountText
    currency: str


class Freeze(_ClientCommand, tag="freeze"):
    account_id: AccountId


class Unfreeze(_ClientCommand, tag="unfreeze"):
    account_id: AccountId


class Close(_ClientCommand, tag="close"):
    account_id: AccountId


class CreditLeg(_Command, tag="credit_leg"):
    """Second step of a transfer, keyed by `to_account`; produced only by the processor.

    `digest` is the digest of the client's transfer command, so that the final outcome names
    the request it answers. `resend` marks a leg re-sent because the client retried a
    transfer that was still in flight: it may only repeat an answer, never move money.
    """
    owner_field: ClassVar[str] = "to_account"
    from_account: AccountId
    to_account: AccountId
    amount: AmountText
    currency: str
    digest: str
    merchant_only: bool = False
    resend: bool = False
    actor: Actor = ""  # the transfer's actor, so that its outcome names who asked


class RefundLeg(_Command, tag="refund_leg"):
    """Compensation of a transfer the receiving side refused, keyed by `from_account`."""
    owner_field: ClassVar[str] = "from_account"
    from_account: AccountId
    to_account: AccountId
    amount: AmountText
    currency: str
    digest: str
    reason: str
    actor: Actor = ""


Command = Union[OpenAccount, Deposit, Withdraw, Transfer, PayMerchant, Freeze, Unfreeze, Close, CreditLeg, RefundLeg]
CLIENT_COMMANDS = (OpenAccount, Deposit, Withdraw, Transfer, PayMerchant, Freeze, Unfreeze, Close)
LEG_COMMANDS = (CreditLeg, RefundLeg)


def owner_account(command: Command) -> str:
    """The account whose partition decides this command: the record key on `wallet.commands`."""
    return getattr(command, command.owner_field)


def command_type(command: Command) -> str:
    return command.__struct_config__.tag
