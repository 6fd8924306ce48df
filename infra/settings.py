"""Settings shared by every process of the project, read from the environment once.

Every name here can be overridden by an environment variable of the same name in upper
case with the `WALLET_` prefix (for example `WALLET_KAFKA_BOOTSTRAP`), and most commands
also take a flag of the same meaning.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

TOPIC_COMMANDS = "wallet.commands"
TOPIC_EVENTS = "wallet.events"
TOPIC_OUTCOMES = "wallet.outcomes"
TOPIC_DLQ = "wallet.dlq"

LOCAL_KAFKA_PORT_DEFAULT = 19092
LOCAL_CONTROLLER_PORT_DEFAULT = 19093


def _env(name: str, default: str) -> str:
    return os.environ.get(f"WALLET_{name}", default)


@dataclass(frozen=True)
class Settings:
    # Empty means "the project's own local broker on loopback" (started by `wallet kafka start`).
    kafka_bootstrap: str = field(default_factory=lambda: _env("KAFKA_BOOTSTRAP", ""))
    topic_prefix: str = field(default_factory=lambda: _env("TOPIC_PREFIX", ""))
    partitions: int = field(default_factory=lambda: int(_env("PARTITIONS", "8")))
    replication_factor: int = field(default_factory=lambda: int(_env("REPLICATION_FACTOR", "1")))
    run_dir: Path = field(default_factory=lambda: Path(_env("RUN_DIR", str(PROJECT_ROOT / ".run"))))
    cache_dir: Path = field(default_factory=lambda: Path(_env("CACHE_DIR", str(PROJECT_ROOT / ".cache"))))
    local_kafka_port: int = field(default_factory=lambda: int(_env("LOCAL_KAFKA_PORT", str(LOCAL_KAFKA_PORT_DEFAULT))))
    local_controller_port: int = field(
        default_factory=lambda: int(_env("LOCAL_CONTROLLER_PORT", str(LOCAL_CONTROLLER_PORT_DEFAULT)))
    )

    @property
    def uses_local_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.local_kafka_port}"

    def topic(self, base_name: str) -> str:
        return f"{self.topic_prefix}{base_name}"

    @property
    def commands_topic(self) -> str:
        return self.topic(TOPIC_COMMANDS)

    @property
    def events_topic(self) -> str:
        return self.topic(TOPIC_EVENTS)

    @property
    def outcomes_topic(self) -> str:
        return self.topic(TOPIC_OUTCOMES)

    @property
    def dlq_topic(self) -> str:
        return self.topic(TOPIC_DLQ)

    @property
    def processor_group_id(self) -> str:
        """The consumer group every processor instance of these topics joins."""
        return f"{self.topic_prefix}wallet-processor"

    def processor_transactional_id(self, instance_id: str) -> str:
        return f"{self.processor_group_id}-{instance_id}"

    def with_overrides(self, **overrides) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the `wallet` command's global flags."""
    return Settings().with_overrides(kafka_bootstrap=getattr(args, "bootstrap", None),
                                     topic_prefix=getattr(args, "topic_prefix", None))
