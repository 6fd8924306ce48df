"""Bytes <-> messages. The one serialisation path of the project (msgspec JSON).

msgspec rather than pydantic on this path: a transfer's round trip through the processor
decodes two commands and encodes five messages, and msgspec does each in about a quarter
of pydantic's time, which is the difference between meeting the processor's per-command
budget and not. The message classes in this folder are the only definition of the shapes.
"""

from __future__ import annotations

import hashlib

import msgspec

from schemas.commands import Command, WireCommand
from schemas.events import Event
from schemas.outcomes import Outcome

_encoder = msgspec.json.Encoder()
_command_decoder = msgspec.json.Decoder(WireCommand)
_event_decoder = msgspec.json.Decoder(Event)
_outcome_decoder = msgspec.json.Decoder(Outcome)

encode = _encoder.encode


class SchemaError(ValueError):
    """A record that is not valid JSON or not a valid message of its topic."""


# What msgspec raises on hostile bytes besides its own errors: invalid UTF-8 inside a JSON
# string or key (UnicodeDecodeError) and nesting past its depth limit (RecursionError). Each one
# out of a decoder would stop a processor on the same record at every restart.
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def decode_command(data: bytes) -> WireCommand:
    try:
        return _command_decoder.decode(data)
    except _UNDECODABLE as error:
        raise SchemaError(f"not a valid command: {error}") from None


def decode_event(data: bytes) -> Event:
    try:
        return _event_decoder.decode(data)
    except _UNDECODABLE as error:
        raise SchemaError(f"not a valid event: {error}") from None


def decode_outcome(data: bytes) -> Outcome:
    try:
        return _outcome_decoder.decode(data)
    except _UNDECODABLE as error:
        raise SchemaError(f"not a valid outcome: {error}") from None


def command_digest(command: Command) -> str:
    """A fingerprint of what a client asked for: every field, actor and role included.

    Two requests with one transaction id are the same request exactly when their digests
    are equal (a retry under another actor or role is a conflict, not the same request); the
    digest travels with the saga legs and the outcome.
    """
    return hashlib.blake2b(_encoder.encode(command), digest_size=12).hexdigest()
