"""Bytes <-> messages. The one serialisation path of the project (msgspec JSON).

msgspec rather than pydantic on this path: a transfer's round trip through the processor
decodes two commands and encodes five messages, and msgspec does each in about a quarter
of pydantic's time, which is the difference between meeting the processor's per-command
budget and not. The message classes in this folder are the only definition of the shapes.
"""

from __future__ import annotations

import hashlib

import msgspec

from schemas.commands import (
    ACCOUNT_ID_LENGTH_MAX,
    ACTOR_LENGTH_MAX,
    CLIENT_COMMANDS,
    TRANSACTION_ID_LENGTH_MAX,
    Command,
    WireCommand,
)
from schemas.events import Event
from schemas.outcomes import Outcome

_encoder = msgspec.json.Encoder()
_command_decoder = msgspec.json.Decoder(WireCommand)
_event_decoder = msgspec.json.Decoder(Event)
_outcome_decoder = msgspec.json.Decoder(Outcome)

encode = _encoder.encode


class SchemaError(ValueError):
    """A record that is not valid JSON or not a valid message of its topic."""


def decode_command(data: bytes) -> WireCommand:
    try:
        return _command_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise SchemaError(f"not a valid command: {error}") from None


def decode_event(data: bytes) -> Event:
    try:
        return _event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise SchemaError(f"not a valid event: {error}") from None


def decode_outcome(data: bytes) -> Outcome:
    try:
        return _outcome_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise SchemaError(f"not a valid outcome: {error}") from None


def command_digest(command: Command) -> str:
    """A fingerprint of what a client asked for: every field, actor and role included.

    Two requests with one transaction id are the same request exactly when their digests
    are equal (a retry under another actor or role is a conflict, not the same request); the
    digest travels with the saga legs and the outcome.
    """
    return hashlib.blake2b(_encoder.encode(command), digest_size=12).hexdigest()


_CLIENT_OWNER_FIELDS = {cls.__struct_config__.tag: cls.owner_field for cls in CLIENT_COMMANDS}
_loose_decoder = msgspec.json.Decoder()


def readable_request(data: bytes) -> tuple[str, str, str] | None:
    """(transaction id, owning account, actor) of a record that is not a valid command but reads
    as a client command's JSON object with those fields, else None. The actor is "" when it
    cannot be read."""
    try:
        value = _loose_decoder.decode(data)
    except (msgspec.DecodeError, TypeError):
        return None
    if type(value) is not dict:
        return None
    tag = value.get("type")
    # Any JSON value can stand here, a dict or list among them, which no dict lookup takes.
    owner_field = _CLIENT_OWNER_FIELDS.get(tag) if type(tag) is str else None
    transaction_id, owner, actor = value.get("transaction_id"), value.get(owner_field), value.get("actor")
    if (
        owner_field is None
        or type(transaction_id) is not str
        or not 1 <= len(transaction_id) <= TRANSACTION_ID_LENGTH_MAX
        or type(owner) is not str
        or not 1 <= len(owner) <= ACCOUNT_ID_LENGTH_MAX
    ):
        return None
    if type(actor) is not str or len(actor) > ACTOR_LENGTH_MAX:
        actor = ""
    return transaction_id, owner, actor
