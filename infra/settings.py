"""Settings shared by every process of the project, read from the environment once.

Every name here can be overridden by an environment variable of the same name in upper
case with the `WALLET_` prefix (for example `WALLET_KAFKA_BOOTSTRAP`), and most commands
also take a flag of the same meaning.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

TOPIC_COMMANDS = "wallet.commands"
TOPIC_EVENTS = "wallet.events"
TOPIC_OUTCOMES = "wallet.outcomes"
TOPIC_DLQ = "wallet.dlq"

LOCAL_KAFKA_PORT_DEFAULT = 19092
LOCAL_CONTROLLER_PORT_DEFAULT = 19093
# A local cluster's node N listens on the client and controller ports plus (N - 1) * this step:
# 19092/19093, 19192/19193, 19292/19293 by default.
LOCAL_NODE_PORT_STEP = 100
# Written into `<run dir>/kafka/` when the local broker is first formatted: how many nodes it has.
BROKER_COUNT_FILE = "brokers"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"WALLET_{name}", default)


def _optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def recorded_broker_count(run_dir: Path) -> int | None:
    """The node count the local broker in `run_dir` was formatted with, None if it never was."""
    kafka_dir = run_dir / "kafka"
    try:
        return int((kafka_dir / BROKER_COUNT_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    # Formatted before the folder recorded its shape: the one-node layout.
    return 1 if (kafka_dir / "data" / "meta.properties").exists() else None


@dataclass(frozen=True)
class Settings:
    # Empty means "the project's own local broker on loopback" (started by `wallet kafka start`).
    kafka_bootstrap: str = field(default_factory=lambda: _env("KAFKA_BOOTSTRAP", ""))
    topic_prefix: str = field(default_factory=lambda: _env("TOPIC_PREFIX", ""))
    partitions: int = field(default_factory=lambda: int(_env("PARTITIONS", "8")))
    # None: 3 on a local cluster of 3 or more nodes, else the node count (1 on an existing cluster).
    replication_factor_setting: int | None = field(
        default_factory=lambda: _optional_int(_env("REPLICATION_FACTOR", ""))
    )
    run_dir: Path = field(default_factory=lambda: Path(_env("RUN_DIR", str(PROJECT_ROOT / ".run"))))
    cache_dir: Path = field(default_factory=lambda: Path(_env("CACHE_DIR", str(PROJECT_ROOT / ".cache"))))
    local_kafka_port: int = field(default_factory=lambda: int(_env("LOCAL_KAFKA_PORT", str(LOCAL_KAFKA_PORT_DEFAULT))))
    local_controller_port: int = field(
        default_factory=lambda: int(_env("LOCAL_CONTROLLER_PORT", str(LOCAL_CONTROLLER_PORT_DEFAULT)))
    )
    # Nodes of the local broker (`--brokers`); None: what the run folder was formatted with, else 1.
    local_kafka_brokers: int | None = field(default_factory=lambda: _optional_int(_env("LOCAL_KAFKA_BROKERS", "")))

    @property
    def uses_local_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def replication_factor(self) -> int:
        """Replicas per partition of the topics the project makes."""
        if self.replication_factor_setting is not None:
            return self.replication_factor_setting
        return min(3, self.local_broker_count) if self.uses_local_kafka else 1

    @property
    def local_broker_count(self) -> int:
        """Nodes of the local broker: the run folder's shape once formatted (a later start keeps
        it), else the requested count, else 1."""
        return recorded_broker_count(self.run_dir) or self.local_kafka_brokers or 1

    def local_node_ports(self, node_id: int) -> tuple[int, int]:
        """(client port, controller port) of local node `node_id` (1-based)."""
        step = LOCAL_NODE_PORT_STEP * (node_id - 1)
        return self.local_kafka_port + step, self.local_controller_port + step

    @property
    def bootstrap(self) -> str:
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        # Every node: a client must still find the cluster when node 1 is the one that is down.
        return ",".join(f"127.0.0.1:{self.local_node_ports(node)[0]}" for node in range(1, self.local_broker_count + 1))

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
        if "replication_factor" in overrides:
            overrides["replication_factor_setting"] = overrides.pop("replication_factor")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def wallet_argv(settings: Settings, *arguments: str) -> list[str]:
    """The command line of a `wallet` process on `settings`' broker and topics."""
    return [
        sys.executable,
        "-m",
        "wallet.cli",
        "--bootstrap",
        settings.bootstrap,
        "--topic-prefix",
        settings.topic_prefix,
        *arguments,
    ]


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the `wallet` command's global flags."""
    return Settings().with_overrides(
        kafka_bootstrap=getattr(args, "bootstrap", None),
        topic_prefix=getattr(args, "topic_prefix", None),
        local_kafka_brokers=getattr(args, "brokers", None),
    )
