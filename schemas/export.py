"""Writes the JSON Schema of every topic's messages into `schemas/json/`, from the msgspec classes.

The classes in this folder are the one definition of the message shapes; the JSON files are
derived from them for readers outside Python (other services, the OpenAPI document, a
schema registry) and are checked in. `tests/test_schema_export.py` fails when they are stale.

    python -m schemas.export           # rewrite the files
    python -m schemas.export --check   # exit 1 if a file differs from a fresh export
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

from schemas.commands import SCHEMA_VERSION, WireCommand
from schemas.events import Event
from schemas.outcomes import Outcome

JSON_DIR = Path(__file__).resolve().parent / "json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# file name -> (message type, title, description)
_EXPORTS = {
    "command.schema.json": (
        WireCommand,
        "Streamwallet command",
        "A value on the wallet.commands topic: a client command, a saga leg or a processor's tick.",
    ),
    "event.schema.json": (Event, "Streamwallet event", "A value on the wallet.events topic: one entry of the ledger."),
    "outcome.schema.json": (
        Outcome,
        "Streamwallet outcome",
        "A value on the wallet.outcomes topic: the final answer to a client request.",
    ),
}


def export_texts() -> dict[str, str]:
    """File name -> file text. Sorted keys and a trailing newline, so equal schemas give equal bytes."""
    texts = {}
    for file_name, (message_type, title, description) in _EXPORTS.items():
        schema = {
            "$schema": JSON_SCHEMA_DIALECT,
            "title": title,
            "description": description,
            "x-schema-version": SCHEMA_VERSION,
            **msgspec.json.schema(message_type),
        }
        texts[file_name] = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return texts


def stale_files(directory: Path = JSON_DIR) -> list[str]:
    """Names of the files in `directory` that a fresh export would write differently, add or remove."""
    texts = export_texts()
    present = {path.name for path in directory.glob("*.json")} if directory.is_dir() else set()
    stale = [
        name
        for name, text in texts.items()
        if name not in present or (directory / name).read_text(encoding="utf-8") != text
    ]
    return sorted(stale + [name for name in present if name not in texts])


def write(directory: Path = JSON_DIR) -> list[str]:
    """Rewrites the exported files, removes JSON files no longer exported; returns the names written."""
    texts = export_texts()
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.json"):
        if path.name not in texts:
            path.unlink()
    for name, text in texts.items():
        (directory / name).write_text(text, encoding="utf-8")
    return sorted(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if there are any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {JSON_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    for name in write():
        print(JSON_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
