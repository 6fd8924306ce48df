"""The `wallet` command: one entry point whose subcommands live beside the code they run.

Each area registers its own subcommands through a `register(subparsers)` function, so
`wallet processor` is defined in `streams/`, `wallet readmodel` in `consumers/`, and so on.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add subcommands; each has `register(subparsers) -> None`.
_COMMAND_MODULES = (
    "wallet.commands_kafka",
    "wallet.stack",
    "wallet.health",
    "wallet.top",
    "wallet.demo",
    "wallet.commands_api",
    "streams.cli",
    "producers.cli",
    "consumers.readmodel.cli",
    "consumers.audit.cli",
    "benchmarks.cli",
    "infra.native",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wallet", description="Streamwallet: an event-sourced wallet ledger on Kafka")
    parser.add_argument(
        "--bootstrap",
        help="Kafka bootstrap servers of an existing cluster "
        "(env WALLET_KAFKA_BOOTSTRAP); when unset the project's local broker is used",
    )
    parser.add_argument("--topic-prefix", help="prefix of every topic name (env WALLET_TOPIC_PREFIX)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
