"""librdkafka settings of the project's clients, in one place with the reason for each.

`kafka_security(role)` is THE source of every client's security settings (TLS, SASL, client
certificates). They come from the environment or a librdkafka properties file it names,
never from a command line (which `ps` shows to every user of the machine):

| variable | librdkafka setting |
|---|---|
| `WALLET_KAFKA_CONFIG_FILE` | a file of `key=value` lines (`security.*`, `sasl.*`, `ssl.*` keys only) |
| `WALLET_KAFKA_SECURITY_PROTOCOL` | `security.protocol` (`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT`, `SASL_SSL`) |
| `WALLET_KAFKA_SASL_MECHANISM` | `sasl.mechanism` (`SCRAM-SHA-512`, `SCRAM-SHA-256`, `PLAIN`, ...) |
| `WALLET_KAFKA_SASL_USERNAME`, `WALLET_KAFKA_SASL_PASSWORD` | `sasl.username`, `sasl.password` |
| `WALLET_KAFKA_SSL_CA_LOCATION` | `ssl.ca.location` |
| `WALLET_KAFKA_SSL_CERTIFICATE_LOCATION`, `..._SSL_KEY_LOCATION`, `..._SSL_KEY_PASSWORD` | the client certificate |

Each variable also exists per service role with the role as a suffix
(`WALLET_KAFKA_SASL_USERNAME_PROCESSOR`, `WALLET_KAFKA_CONFIG_FILE_API`, ...), so the API,
processors, read model and audit can run as different Kafka principals. Layers, later wins:
the shared file, the shared variables, the role's file, the role's variables. Nothing set
means PLAINTEXT without authentication, the local broker's default.
"""

from __future__ import annotations

import os
from pathlib import Path

from schemas.partitioning import KAFKA_PARTITIONER

# The service roles of the project, each a Kafka principal of its own when so configured:
# api = whoever publishes client commands and waits for outcomes (HTTP API, CLI, load generator);
# admin = topic and ACL provisioning, the stack's readiness probes, tests and benchmarks.
ROLES = ("api", "processor", "readmodel", "audit", "admin")

ENV_PREFIX = "WALLET_KAFKA_"
CONFIG_FILE_VARIABLE = "CONFIG_FILE"
# Environment variable (after WALLET_KAFKA_) -> librdkafka property.
SECURITY_VARIABLES = {
    "SECURITY_PROTOCOL": "security.protocol",
    "SASL_MECHANISM": "sasl.mechanism",
    "SASL_USERNAME": "sasl.username",
    "SASL_PASSWORD": "sasl.password",
    "SSL_CA_LOCATION": "ssl.ca.location",
    "SSL_CERTIFICATE_LOCATION": "ssl.certificate.location",
    "SSL_KEY_LOCATION": "ssl.key.location",
    "SSL_KEY_PASSWORD": "ssl.key.password",
    "SSL_ENDPOINT_IDENTIFICATION_ALGORITHM": "ssl.endpoint.identification.algorithm",
}
# What a config file may set: security only, so it can never silently change delivery semantics.
_FILE_KEY_PREFIXES = ("security.", "sasl.", "ssl.", "enable.ssl.")
_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


# Every client's failover tuning: librdkafka backs off reconnecting to a broker it lost up to
# `reconnect.backoff.max.ms` (10 s by default), and a transactional producer looks its
# coordinator up again only when it reconnects, so with the default one broker's loss stalled
# commits for 11-18 s; with 1 s, 5-8 s (measured on a local 3-node cluster, tests/test_cluster_faults.py).
FAILOVER_TUNING = {"reconnect.backoff.max.ms": 1000}


class KafkaSecurityConfigError(ValueError):
    """The Kafka security settings in the environment are incomplete or malformed."""


def kafka_security(role: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """librdkafka security settings of a client of `role` (one of ROLES); merge into its config."""
    assert role in ROLES, f"unknown Kafka client role {role!r} (one of {ROLES})"
    env = os.environ if environ is None else environ
    suffix = f"_{role.upper()}"
    merged: dict[str, str] = {}
    origin: dict[str, str] = {}
    for layer_suffix in ("", suffix):
        file_variable = f"{ENV_PREFIX}{CONFIG_FILE_VARIABLE}{layer_suffix}"
        if env.get(file_variable, "").strip():
            for key, value in read_properties_file(Path(env[file_variable].strip()), file_variable).items():
                merged[key], origin[key] = value, file_variable
        for name, key in SECURITY_VARIABLES.items():
            variable = f"{ENV_PREFIX}{name}{layer_suffix}"
            if env.get(variable, "") != "":
                merged[key], origin[key] = env[variable], variable
    _check_complete(merged, origin, role)
    return merged


def read_properties_file(path: Path, named_by: str) -> dict[str, str]:
    """`key=value` lines of librdkafka security properties; `#` and `!` start comments."""
    try:
        text = path.read_text()
    except OSError as error:
        raise KafkaSecurityConfigError(f"{named_by}={path}: cannot read it ({error.strerror})") from None
    properties: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, separator, value = line.partition("=")
        key = key.strip()
        if not separator or not key:
            raise KafkaSecurityConfigError(f"{path}:{number}: expected key=value")
        if not key.startswith(_FILE_KEY_PREFIXES):
            raise KafkaSecurityConfigError(
                f"{path}:{number}: {key} is not a security setting (allowed: {', '.join(_FILE_KEY_PREFIXES)}*)"
            )
        properties[key] = value.strip()
    return properties


def _check_complete(merged: dict[str, str], origin: dict[str, str], role: str) -> None:
    protocol = merged.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in _SASL_PROTOCOLS:
        return
    mechanism = merged.get("sasl.mechanism", "GSSAPI").upper()
    if mechanism not in _PASSWORD_MECHANISMS:
        return
    missing = [key for key in ("sasl.username", "sasl.password") if not merged.get(key)]
    if missing:
        raise KafkaSecurityConfigError(
            f"Kafka role {role}: {protocol} with {mechanism} needs {' and '.join(missing)} "
            f"(set {ENV_PREFIX}SASL_USERNAME/_PASSWORD, optionally with the suffix _{role.upper()}, "
            f"or name a properties file in {ENV_PREFIX}{CONFIG_FILE_VARIABLE})"
        )
    user_from, password_from = origin["sasl.username"], origin["sasl.password"]
    if user_from.endswith(f"_{role.upper()}") != password_from.endswith(f"_{role.upper()}"):
        # A role's own user with the shared password (or the reverse) is a half-done override.
        raise KafkaSecurityConfigError(
            f"Kafka role {role}: sasl.username comes from {user_from} but sasl.password from {password_from}; "
            "set both for the role or neither"
        )


def processor_consumer_config(bootstrap: str, group_id: str, instance_id: str) -> dict:
    return {
        **kafka_security("processor"),
        **FAILOVER_TUNING,
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "client.id": f"{group_id}-{instance_id}",
        # Only records of committed transactions: a leg from an aborted batch must never move money.
        "isolation.level": "read_committed",
        # Offsets are committed inside the producer's transaction, never by the consumer.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Static membership: a restarted instance (same id) takes its partitions straight back
        # instead of waiting for the group to notice the old member is gone.
        "group.instance.id": f"{group_id}-{instance_id}",
        "partition.assignment.strategy": "range",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 60000,
        "fetch.wait.max.ms": 10,
        "queued.max.messages.kbytes": 262144,
    }


def processor_producer_config(bootstrap: str, transactional_id: str, transaction_timeout_ms: int) -> dict:
    return {
        **kafka_security("processor"),
        **FAILOVER_TUNING,
        "bootstrap.servers": bootstrap,
        "transactional.id": transactional_id,
        "client.id": transactional_id,
        "partitioner": KAFKA_PARTITIONER,
        # A transactional producer is idempotent and acknowledged by every in-sync replica; said
        # explicitly so no later edit can weaken it (librdkafka refuses a weaker acks here).
        "enable.idempotence": True,
        "acks": "all",
        # A dead instance's open transaction blocks readers of its partitions until the
        # coordinator aborts it: keep that stall short.
        "transaction.timeout.ms": transaction_timeout_ms,
        # Compressed on librdkafka's threads, outside the GIL: the events a transfer writes take 3.6 x
        # fewer bytes on the broker's disk and wire, at no measured cost to the processor's rate.
        "compression.type": "lz4",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    }


def restore_consumer_config(bootstrap: str, group_id: str, instance_id: str) -> dict:
    return {
        **kafka_security("processor"),
        **FAILOVER_TUNING,
        "bootstrap.servers": bootstrap,
        # Never subscribes or commits; librdkafka wants a group id all the same.
        "group.id": f"{group_id}-restore-{instance_id}",
        "client.id": f"{group_id}-restore-{instance_id}",
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,
    }
