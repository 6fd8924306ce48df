"""The checked-in JSON Schema files are exactly what the message classes export today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas import export
from schemas.codec import encode
from schemas.commands import CreditLeg, Deposit
from schemas.outcomes import Outcome


def test_exported_schema_files_are_up_to_date() -> None:
    stale = export.stale_files()
    assert stale == [], f"stale JSON Schema files {stale}: run `python -m schemas.export` and commit schemas/json/"


def test_a_changed_or_missing_file_is_reported_stale(tmp_path: Path) -> None:
    export.write(tmp_path)
    assert export.stale_files(tmp_path) == []
    (tmp_path / "event.schema.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "outcome.schema.json").unlink()
    (tmp_path / "retired.schema.json").write_text("{}\n", encoding="utf-8")
    assert export.stale_files(tmp_path) == ["event.schema.json", "outcome.schema.json", "retired.schema.json"]


def test_export_is_deterministic_sorted_and_newline_terminated() -> None:
    first, second = export.export_texts(), export.export_texts()
    assert first == second
    for text in first.values():
        assert text.endswith("}\n")
        assert json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n" == text


def schema_of(file_name: str) -> dict:
    return json.loads((export.JSON_DIR / file_name).read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("file_name", "tags"),
    [
        (
            "command.schema.json",
            {
                "open_account",
                "deposit",
                "withdraw",
                "transfer",
                "pay_merchant",
                "freeze",
                "unfreeze",
                "close",
                "place_hold",
                "capture_hold",
                "void_hold",
                "credit_leg",
                "refund_leg",
                "open_shard",
                "tick",
            },
        ),
        (
            "event.schema.json",
            {
                "account_opened",
                "deposited",
                "withdrawn",
                "transfer_debited",
                "transfer_credited",
                "transfer_refunded",
                "account_frozen",
                "account_unfrozen",
                "account_closed",
                "hold_placed",
                "hold_captured",
                "hold_voided",
                "hold_expired",
                "command_rejected",
            },
        ),
    ],
)
def test_every_message_type_is_in_its_topic_schema_under_its_tag(file_name: str, tags: set[str]) -> None:
    assert set(schema_of(file_name)["discriminator"]["mapping"]) == tags


def test_the_schema_describes_the_bytes_the_codec_writes() -> None:
    # Not a full validator: the field names and required fields of real encoded messages match.
    definitions = {**schema_of("command.schema.json")["$defs"], **schema_of("outcome.schema.json")["$defs"]}
    messages = [
        Deposit(transaction_id="t1", actor="bank", role="bank", account_id="alice", amount="1.00", currency="USD"),
        CreditLeg(
            transaction_id="t1",
            actor="alice",
            issued_ms=1,
            kid="k1",
            mac="00" * 16,
            from_account="alice",
            to_account="bob",
            amount="1.00",
            currency="USD",
            digest="abc",
        ),
        Outcome(
            transaction_id="t1",
            account_id="alice",
            actor="alice",
            status="failure",
            reason="insufficient_funds",
            digest="abc",
        ),
    ]
    for message in messages:
        encoded = json.loads(encode(message))
        definition = definitions[type(message).__name__]
        assert set(encoded) <= set(definition["properties"])
        assert set(definition["required"]) <= set(encoded)
        assert definition["additionalProperties"] is False


def test_the_shard_fields_are_in_the_contract_with_their_bounds() -> None:
    commands = schema_of("command.schema.json")["$defs"]
    assert commands["OpenAccount"]["properties"]["shards"]["default"] == 1
    assert commands["PayMerchant"]["properties"]["to_shards"]["default"] == 1
    assert commands["OpenShard"]["properties"]["shard_index"] == {
        "type": "integer",
        "minimum": 1,
        "exclusiveMaximum": 64,
    }
    opened = schema_of("event.schema.json")["$defs"]["AccountOpened"]["properties"]
    assert {"shards", "shard_of"} <= set(opened)


def test_every_message_is_version_4_and_commands_carry_no_client_time() -> None:
    for file_name in ("command.schema.json", "event.schema.json", "outcome.schema.json"):
        assert schema_of(file_name)["x-schema-version"] == 4
    rejected = schema_of("event.schema.json")["$defs"]["CommandRejected"]["properties"]
    assert {"issued_ms", "from_account"} <= set(rejected)  # a refused credit leg names its sender
    commands = schema_of("command.schema.json")["$defs"]
    for name in ("OpenAccount", "Deposit", "Withdraw", "Transfer", "PayMerchant", "Freeze", "Unfreeze", "Close"):
        assert "ts_ms" not in commands[name]["properties"]
        assert {"actor", "role"} <= set(commands[name]["required"])
    for name in ("CreditLeg", "RefundLeg", "OpenShard"):
        assert {"actor", "issued_ms"} <= set(commands[name]["required"])
        assert {"kid", "mac"} <= set(commands[name]["properties"])
