"""Commands: what producers ask the wallet to do, on the `wallet.commands` topic.

Each command is keyed by the account that owns the step (`owner_account`). Commands carry no
time: the time that decides is the broker's record time (`wallet.commands` is created with
`message.timestamp.type=LogAppendTime`), which the processor hands to the core.

Client commands carry `actor` (the authenticated principal) and `role` (the scope under which
the edge authorised it); both are set by the trusted edge, never taken from a client's body,
and the core decides with them who may move whose money. Saga legs are written by processors
only: each carries the transfer's `actor`, `issued_ms` (the decision time of the step that
emitted it) and a MAC (`kid`, `mac`, see `schemas.leg_auth`) that the processor checks before
the core ever sees the leg.

Sharded merchants (a hot account split over partitions): `open_account` with `shards` N > 1
(merchants only) opens the merchant `<id>` as shard 0 and asks, by one `open_shard` leg each,
the partitions of the derived ids `<id>::s1` .. `<id>::s<N-1>` (`shard_account_id`) to open
shards 1..N-1 with the same owner and currency. `::` is reserved for derived ids: the core
refuses to open an id containing it (`reserved_account_id`), so only the merchant's own open
can create its shards. A `transfer` or `pay_merchant` with `to_shards` N > 1 is credited to
the shard `shard_index(transaction_id, N)` picks: the payer's side picks it, so replay
reproduces it; `to_shards` is the client's word, so it only chooses among `<to_account>`'s
own derived ids, and a shard that does not exist refuses the credit (the payer is refunded).

Holds (Try-Confirm/Cancel): `place_hold` reserves money of `account_id` for `to_account` (its
`transaction_id` is the hold id), `capture_hold` moves all or part of it to the destination as
a transfer does (a saga: credit leg, refund leg), `void_hold` releases it; a hold expires by
itself at a decision time of the log. `tick` is written by processors only, one per owned
partition when the partition was idle: it carries nothing that decides (its time is the
broker's), so that holds expire on a quiet partition too.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import msgspec

from schemas.partitioning import murmur2

# 3: sharded merchants (`open_account.shards`, `transfer`/`pay_merchant.to_shards`, the
# `open_shard` leg, `account_opened.shards`/`shard_of`); version 2 records decode unchanged.
# 4: `command_rejected.from_account` of a refused credit leg: a receiver remembers a leg under
# its sender's transaction id, not its own; version 3 records decode unchanged.
SCHEMA_VERSION = 4

# What an id may look like: one rule, one implementation (`is_valid_id`), used by the client
# library, the CLI and the HTTP API. The decoder of the Kafka path checks only the lengths,
# because a regular expression per id field tripled the cost of decoding a command, and the
# core treats ids as opaque text anyway. `ID_PATTERN` is anchored for JSON Schema / pydantic
# (search semantics); `is_valid_id` uses a full match, so "alice\n" is refused (`re.match`
# with `$` accepted it).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
ACCOUNT_ID_LENGTH_MAX = 64
TRANSACTION_ID_LENGTH_MAX = 128
ACTOR_LENGTH_MAX = 128
KEY_ID_LENGTH_MAX = 32
MAC_HEX_LENGTH_MAX = 64
# The longest a hold may stay open (`place_hold.expires_in_ms`); the core refuses more (`invalid_expiry`).
HOLD_EXPIRY_MS_MAX = 7 * 24 * 60 * 60 * 1000
# A merchant has 1..SHARDS_MAX shards; shard k > 0 is the account `<merchant>` + SHARD_MARK + k.
SHARDS_MAX = 64
RESERVED_ID_MARK = "::"  # in no id a client may open: it marks the derived ids of shards
SHARD_MARK = RESERVED_ID_MARK + "s"
ShardCount = Annotated[int, msgspec.Meta(ge=1, le=SHARDS_MAX)]
AccountId = Annotated[str, msgspec.Meta(min_length=1, max_length=ACCOUNT_ID_LENGTH_MAX)]
TransactionId = Annotated[str, msgspec.Meta(min_length=1, max_length=TRANSACTION_ID_LENGTH_MAX)]
Actor = Annotated[str, msgspec.Meta(min_length=1, max_length=ACTOR_LENGTH_MAX)]
TimestampMs = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Role = Literal["user", "bank", "operator"]
ROLES: tuple[str, ...] = ("user", "bank", "operator")
# Amounts stay strings here: whether one is acceptable is a decision of the state machine,
# recorded in the log, not a decode error.
AmountText = str
AccountKind = Literal["user", "merchant"]


def is_valid_id(text: object, length_max: int = TRANSACTION_ID_LENGTH_MAX) -> bool:
    """True if `text` is an id the contract allows: 1..length_max characters, a letter or digit
    first, then letters, digits and . _ : @ - (a full match: no trailing newline)."""
    return type(text) is str and 1 <= len(text) <= length_max and _ID.fullmatch(text) is not None


def is_reserved_id(account_id: str) -> bool:
    """True for an id only the core may open (a merchant's derived shard id)."""
    return RESERVED_ID_MARK in account_id


def shard_account_id(merchant_id: str, index: int) -> str:
    """The account of shard `index` of merchant `merchant_id` (shard 0 is the merchant itself).
    One-to-one: a merchant id never contains `::`, so the last `::` of a derived id ends its merchant."""
    assert 0 <= index < SHARDS_MAX and not is_reserved_id(merchant_id), (merchant_id, index)
    return merchant_id if index == 0 else f"{merchant_id}{SHARD_MARK}{index}"


def shard_index(transaction_id: str, shards: int) -> int:
    """The shard a payment to a merchant of `shards` shards goes to: a function of the request
    alone (its transaction id), so the payer's partition and any replay pick the same one."""
    return murmur2(transaction_id.encode()) % shards


def merchant_of_shard(account_id: str) -> str | None:
    """The merchant a derived shard id belongs to, or None for an id that is not one."""
    merchant_id, mark, index = account_id.rpartition(SHARD_MARK)
    if not mark or not index.isdigit() or not merchant_id or is_reserved_id(merchant_id):
        return None
    number = int(index)
    if not 0 < number < SHARDS_MAX or shard_account_id(merchant_id, number) != account_id:
        return None
    return merchant_id


class _Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", gc=False):
    # The field naming the account whose partition decides the command (the record key).
    owner_field: ClassVar[str] = "account_id"

    v: int = SCHEMA_VERSION
    transaction_id: TransactionId


class _ClientCommand(_Command, frozen=True):
    actor: Actor  # the authenticated principal, set by the trusted edge
    role: Role  # the scope under which the edge authorised the command


class OpenAccount(_ClientCommand, tag="open_account", frozen=True):
    """Any role; the account's owner is the actor. `shards` > 1 (merchants only): a sharded
    merchant, whose shards 1..shards-1 the core opens by `open_shard` legs."""

    account_id: AccountId
    currency: str
    kind: AccountKind = "user"
    shards: int = 1  # the core refuses a value outside 1..SHARDS_MAX (`invalid_shards`)


class Deposit(_ClientCommand, tag="deposit", frozen=True):
    """Money arrives from a bank account outside the ledger (role `bank` only)."""

    account_id: AccountId
    amount: AmountText
    currency: str


class Withdraw(_ClientCommand, tag="withdraw", frozen=True):
    """Money leaves to a bank account outside the ledger (role `bank`, or the owner)."""

    account_id: AccountId
    amount: AmountText
    currency: str


class Transfer(_ClientCommand, tag="transfer", frozen=True):
    """Only the owner of `from_account` may send."""

    owner_field: ClassVar[str] = "from_account"
    from_account: AccountId
    to_account: AccountId
    amount: AmountText
    currency: str
    # The receiver's shard count as the client knows it (see the module doc); 1: to_account itself.
    to_shards: int = 1


class PayMerchant(_ClientCommand, tag="pay_merchant", frozen=True):
    """A transfer whose receiving account must be of kind `merchant`."""

    owner_field: ClassVar[str] = "from_account"
    from_account: AccountId
    to_account: AccountId
    amount: AmountText
    currency: str
    to_shards: int = 1  # as for `transfer`


class Freeze(_ClientCommand, tag="freeze", frozen=True):
    account_id: AccountId


class Unfreeze(_ClientCommand, tag="unfreeze", frozen=True):
    account_id: AccountId


class Close(_ClientCommand, tag="close", frozen=True):
    account_id: AccountId


class PlaceHold(_ClientCommand, tag="place_hold", frozen=True):
    """Reserves `amount` of `account_id` for `to_account` (only the owner of `account_id`).

    The hold id is the `transaction_id`. It expires `expires_in_ms` (1 ..
    HOLD_EXPIRY_MS_MAX) after the place's decision time; whether the amount and the expiry
    are acceptable is the core's decision, recorded in the log."""

    account_id: AccountId
    to_account: AccountId
    amount: AmountText
    currency: str
    expires_in_ms: int


class CaptureHold(_ClientCommand, tag="capture_hold", frozen=True):
    """Moves `amount` (absent: all still held) of hold `hold_id` of `account_id` to the hold's
    destination; `final` releases whatever is left. The owner of `account_id` or role operator.
    The `transaction_id` is the capture's own id, one per capture."""

    account_id: AccountId  # the payer: its partition decides the capture
    hold_id: TransactionId
    amount: AmountText | None = None
    final: bool = True


class VoidHold(_ClientCommand, tag="void_hold", frozen=True):
    """Releases what hold `hold_id` of `account_id` still holds (the owner or role operator)."""

    account_id: AccountId
    hold_id: TransactionId


class Tick(_Command, tag="tick", frozen=True):
    """Time passing on a partition without traffic; produced by processors only, to the
    partition it names. The runtime dead-letters a tick whose `partition` is not its record's
    (unanswered). No actor and no MAC: a forged tick can only carry the broker's time,
    which any record carries."""

    owner_field: ClassVar[str] = ""  # no account owns a tick: it is routed by `partition`
    partition: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class _Leg(_Command, frozen=True):
    actor: Actor  # the actor of the transfer the leg belongs to
    issued_ms: TimestampMs  # decision time of the step that emitted the leg
    kid: Annotated[str, msgspec.Meta(max_length=KEY_ID_LENGTH_MAX)] = ""  # key id of the MAC
    mac: Annotated[str, msgspec.Meta(max_length=MAC_HEX_LENGTH_MAX)] = ""  # hex HMAC-SHA256/128, see leg_auth


class CreditLeg(_Leg, tag="credit_leg", frozen=True, kw_only=True):
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


class RefundLeg(_Leg, tag="refund_leg", frozen=True, kw_only=True):
    """Compensation of a transfer the receiving side refused, keyed by `from_account`."""

    owner_field: ClassVar[str] = "from_account"
    from_account: AccountId
    to_account: AccountId
    amount: AmountText
    currency: str
    digest: str
    reason: str
    # issued_ms of the credit leg refunded, which is the debit's decision time: the sender
    # refunds exactly that debit, never a later debit of the same request.
    debit_ms: TimestampMs


class OpenShard(_Leg, tag="open_shard", frozen=True, kw_only=True):
    """Opens shard `shard_index` of merchant `merchant_account`, keyed by the shard's own id
    `account_id`; produced only by the processor deciding the merchant's `open_account` (whose
    transaction id and digest it carries), with the owner and currency that open decided."""

    account_id: AccountId
    merchant_account: AccountId
    shard_index: Annotated[int, msgspec.Meta(ge=1, lt=SHARDS_MAX)]
    shards: ShardCount
    owner: Actor
    currency: str
    digest: str


ClientCommand = (
    OpenAccount
    | Deposit
    | Withdraw
    | Transfer
    | PayMerchant
    | Freeze
    | Unfreeze
    | Close
    | PlaceHold
    | CaptureHold
    | VoidHold
)
# A command with an actor: what clients ask and the saga legs of what they asked.
Command = ClientCommand | CreditLeg | RefundLeg | OpenShard
# Every value of wallet.commands: the commands above and the processors' ticks.
WireCommand = Command | Tick
Leg = CreditLeg | RefundLeg | OpenShard
CLIENT_COMMANDS = (
    OpenAccount,
    Deposit,
    Withdraw,
    Transfer,
    PayMerchant,
    Freeze,
    Unfreeze,
    Close,
    PlaceHold,
    CaptureHold,
    VoidHold,
)
LEG_COMMANDS = (CreditLeg, RefundLeg, OpenShard)
# The transaction id of every tick a processor writes: a tick is never remembered, so one id serves.
TICK_TRANSACTION_ID = "tick"


# The principals a trusted edge without authentication (`wallet up --auth off`, the CLI, the load
# generator, tests) uses: the bank rail, the operator, and each account's own id as its owner.
LOCAL_BANK_ACTOR = "bank"
LOCAL_OPERATOR_ACTOR = "operator"


# The actor of an account's own commands from a local edge: `local:` and the account id. No token
# can carry it (the API refuses a sub with this prefix), so no principal of an identity provider
# owns an account a local edge opened; with the bare account id as the actor, a token whose sub
# was that id moved its money.
LOCAL_ACCOUNT_ACTOR_PREFIX = "local:"


def local_credentials(command_class: type, owner: str) -> tuple[str, str]:
    """(actor, role) of a command built by a trusted local edge without authentication: money in
    and out by the bank rail, status changes by the operator, everything else (transfers, holds:
    place, capture, void) by the account itself (an account opened this way is owned by
    `local:<its id>`)."""
    if command_class in (Deposit, Withdraw):
        return LOCAL_BANK_ACTOR, "bank"
    if command_class in (Freeze, Unfreeze, Close):
        return LOCAL_OPERATOR_ACTOR, "operator"
    return LOCAL_ACCOUNT_ACTOR_PREFIX + owner, "user"


def owner_account(command: Command) -> str:
    """The account whose partition decides this command: the record key on `wallet.commands`.
    Not for a tick, which no account owns (its `partition` says where it goes)."""
    return getattr(command, command.owner_field)


def command_type(command: WireCommand) -> str:
    tag = command.__struct_config__.tag
    if TYPE_CHECKING:  # every command class is declared with a string tag
        assert isinstance(tag, str)
    return tag
