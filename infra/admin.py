"""The project's four topics, provisioned with the Kafka AdminClient, and a broker readiness probe.

Provisioning is idempotent and strict: a topic that exists with the wanted shape is left
alone, and one whose shape differs (partition count, replication factor, retention) is an
error. Repartitioning a keyed topic moves accounts to other partitions and breaks the
co-partitioning of commands and events, so it must be a deliberate migration, never a
side effect of `wallet topics create`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, ConfigResource, NewTopic, ResourceType

from infra.kafka_clients import kafka_security
from infra.settings import Settings

# librdkafka reports every refused connection as an error; while we wait for a broker that
# is still starting those are expected, so they go to logging (silent unless the app
# configures it) instead of librdkafka's default stderr printer.
_ADMIN_LOG = logging.getLogger("wallet.kafka.admin")
_ADMIN_LOG.addHandler(logging.NullHandler())

# The ledger is the source of truth and the audit replays every topic from offset 0, so no
# record of the project may ever age out.
_RETAIN_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}

# The time that decides (idempotency window, leg age) is the broker's record time, never a
# producer's: the command topic stamps every record with the time the broker appended it, so
# a replay of the topic reads the same time the processor decided with.
_COMMANDS_CONFIG = {"message.timestamp.type": "LogAppendTime"}

METADATA_ATTEMPT_TIMEOUT_S = 2.0


class BrokerUnavailableError(RuntimeError):
    """No broker answered a metadata request within the allowed time."""


class TopicProvisioningError(RuntimeError):
    """The cluster refused to create a topic (for example a replication factor above its broker count)."""


class TopicMismatchError(TopicProvisioningError):
    """A topic exists with a different shape than the settings ask for."""


def admin_client(bootstrap: str, *, role: str = "admin", security: dict[str, str] | None = None) -> AdminClient:
    """An AdminClient as the Kafka principal of `role`, or with explicit `security` settings
    (the local broker's own probe, which knows its admin credentials)."""
    settings = kafka_security(role) if security is None else security
    # confluent-kafka's stubs type config values as str/int/float, but it takes a Logger as "logger".
    return AdminClient({**settings, "bootstrap.servers": bootstrap, "logger": _ADMIN_LOG})  # type: ignore[dict-item]


def wait_for_broker(
    bootstrap: str,
    timeout_s: float,
    *,
    abort_reason: Callable[[], str | None] | None = None,
    security: dict[str, str] | None = None,
    brokers_min: int = 1,
) -> ClusterMetadata:
    """Return the cluster's metadata once a broker answers a real metadata request that lists
    at least `brokers_min` brokers.

    `abort_reason` is asked between attempts; when it returns a text (for example "the broker
    process exited"), waiting is pointless and that text is raised at once.
    """
    return _wait_for_metadata(
        admin_client(bootstrap, security=security), bootstrap, timeout_s, abort_reason, brokers_min
    )


def _wait_for_metadata(
    admin: AdminClient,
    bootstrap: str,
    timeout_s: float,
    abort_reason: Callable[[], str | None] | None = None,
    brokers_min: int = 1,
) -> ClusterMetadata:
    deadline_s = time.monotonic() + timeout_s
    last_error = "no attempt made"
    while True:
        remaining_s = deadline_s - time.monotonic()
        if remaining_s <= 0:
            raise BrokerUnavailableError(
                f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s (last error: {last_error})"
            )
        try:
            metadata = admin.list_topics(timeout=min(METADATA_ATTEMPT_TIMEOUT_S, remaining_s))
        except KafkaException as error:
            last_error = str(error.args[0]) if error.args else repr(error)
        else:
            if len(metadata.brokers) >= max(1, brokers_min):
                return metadata
            last_error = (
                f"metadata listed {len(metadata.brokers)} of {brokers_min} brokers"
                if metadata.brokers
                else "metadata listed no brokers yet"
            )
        if abort_reason is not None:
            reason = abort_reason()
            if reason is not None:
                raise BrokerUnavailableError(reason)
        time.sleep(min(0.2, max(0.0, deadline_s - time.monotonic())))


def topic_names(settings: Settings) -> list[str]:
    return [settings.commands_topic, settings.events_topic, settings.outcomes_topic, settings.dlq_topic]


def _topic_config(replication_factor: int) -> dict[str, str]:
    # With 3 replicas an acknowledged write survives one broker loss only if 2 had it;
    # on 1 or 2 replicas requiring more than 1 would stop writes whenever one broker is down.
    min_insync_replicas = max(1, replication_factor - 1)
    return {**_RETAIN_FOREVER, "min.insync.replicas": str(min_insync_replicas)}


def ensure_topics(settings: Settings, partitions: int | None = None, timeout_s: float = 30) -> dict[str, str]:
    """Create the project's topics where missing; return {topic: "created" | "exists"}.

    Raises TopicMismatchError, before creating anything, if an existing topic differs in
    partition count, replication factor or retention.
    """
    partition_count = partitions if partitions is not None else settings.partitions
    replication_factor = settings.replication_factor
    if partition_count < 1 or replication_factor < 1:
        raise TopicProvisioningError(
            f"partitions ({partition_count}) and replication factor ({replication_factor}) must be at least 1"
        )
    wanted_config = _topic_config(replication_factor)
    admin = admin_client(settings.bootstrap)
    metadata = _wait_for_metadata(admin, settings.bootstrap, timeout_s)

    existing = [name for name in topic_names(settings) if name in metadata.topics]
    mismatches = _shape_mismatches(
        admin, metadata, existing, partition_count, replication_factor, timeout_s, settings.commands_topic
    )
    if mismatches:
        raise TopicMismatchError(
            "existing topics differ from the requested shape (not changed; migrate or delete them deliberately):\n  "
            + "\n  ".join(mismatches)
        )

    result = {name: "exists" for name in existing}
    missing = [name for name in topic_names(settings) if name not in metadata.topics]
    if missing:
        new_topics = [
            NewTopic(
                name,
                partition_count,
                replication_factor,
                config={**wanted_config, **(_COMMANDS_CONFIG if name == settings.commands_topic else {})},
            )
            for name in missing
        ]
        futures = admin.create_topics(new_topics, operation_timeout=timeout_s, request_timeout=timeout_s)
        raced = []
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
                result[name] = "created"
            except KafkaException as error:
                if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise TopicProvisioningError(
                        f"creating {name} at {settings.bootstrap} failed: {error.args[0].str()}"
                    ) from None
                raced.append(name)  # another process created it between our look and our create
        if raced:
            metadata = admin.list_topics(timeout=timeout_s)
            mismatches = _shape_mismatches(
                admin, metadata, raced, partition_count, replication_factor, timeout_s, settings.commands_topic
            )
            if mismatches:
                raise TopicMismatchError(
                    "topics created concurrently with another shape:\n  " + "\n  ".join(mismatches)
                )
            result.update({name: "exists" for name in raced})
    return {name: result[name] for name in topic_names(settings)}


def _shape_mismatches(
    admin: AdminClient,
    metadata: ClusterMetadata,
    names: list[str],
    partition_count: int,
    replication_factor: int,
    timeout_s: float,
    commands_topic: str,
) -> list[str]:
    mismatches = []
    for name in names:
        partitions = metadata.topics[name].partitions
        if len(partitions) != partition_count:
            mismatches.append(f"{name}: has {len(partitions)} partitions, requested {partition_count}")
        actual_replicas = len(partitions[0].replicas) if partitions else 0
        if actual_replicas != replication_factor:
            mismatches.append(f"{name}: has replication factor {actual_replicas}, requested {replication_factor}")
    if names:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
        for resource, future in admin.describe_configs(resources, request_timeout=timeout_s).items():
            configs = future.result(timeout=timeout_s)
            for key, wanted in _RETAIN_FOREVER.items():
                actual = configs[key].value
                if actual != wanted:
                    mismatches.append(f"{resource.name}: has {key}={actual}, requested {wanted} (kept forever)")
            if resource.name == commands_topic:
                for key, wanted in _COMMANDS_CONFIG.items():
                    actual = configs[key].value
                    if actual != wanted:
                        mismatches.append(
                            f"{resource.name}: has {key}={actual}, requested {wanted} (the broker's "
                            f"record time decides, never a producer's)"
                        )
    return mismatches


def delete_topics(settings: Settings, timeout_s: float = 30) -> list[str]:
    """Delete the project's topics under settings.topic_prefix; return the names deleted."""
    admin = admin_client(settings.bootstrap)
    metadata = _wait_for_metadata(admin, settings.bootstrap, timeout_s)
    present = [name for name in topic_names(settings) if name in metadata.topics]
    if not present:
        return []
    futures = admin.delete_topics(present, operation_timeout=timeout_s, request_timeout=timeout_s)
    for future in futures.values():
        future.result(timeout=timeout_s)
    return present
