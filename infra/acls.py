"""Kafka ACLs of the project's service principals: least privilege per role, applied idempotently.

`service_grants` is the table (the README's "Kafka principals and ACLs" shows it): the api writes
client commands and reads outcomes; processors read commands and events and write events, legs
and ticks (both to the commands topic), outcomes and the DLQ, under their group and
transactional-id prefix; the read model and the audit only read. Groups are granted by prefix
because assign-only readers (the outcome waiter, the audit) still name a random group that
librdkafka looks up. Every topic name carries the
settings' topic prefix. A principal's name is `WALLET_KAFKA_PRINCIPAL_<ROLE>` (e.g.
`User:payments-api`) or `User:wallet-<role>`, the local SASL broker's user of that role.

The honest limit: the API must write `wallet.commands` (client commands), and saga legs travel
on the same topic, so ACLs alone cannot stop the API's principal from publishing a forged leg.
The processors' leg MAC (`schemas/leg_auth.py`, keys the API never holds) is what refuses it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
)

from infra.admin import admin_client
from infra.settings import Settings

SERVICE_ROLES = ("api", "processor", "readmodel", "audit")
PRINCIPAL_VARIABLE_PREFIX = "WALLET_KAFKA_PRINCIPAL_"
# Kafka's name of the cluster resource (the only one there is).
_CLUSTER = "kafka-cluster"
_ANY_HOST = "*"
ACL_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class AclGrant:
    """One permission in words; `binding()` makes the AdminClient's object of it."""

    role: str
    principal: str
    resource_type: ResourceType
    name: str
    pattern: ResourcePatternType
    operation: AclOperation

    def binding(self) -> AclBinding:
        return AclBinding(
            self.resource_type,
            self.name,
            self.pattern,
            self.principal,
            _ANY_HOST,
            self.operation,
            AclPermissionType.ALLOW,
        )

    def describe(self) -> str:
        pattern = "prefix " if self.pattern == ResourcePatternType.PREFIXED else ""
        kind = "cluster" if self.resource_type == ResourceType.BROKER else self.resource_type.name.lower()
        return f"{self.principal:24} {self.operation.name:16} {kind} {pattern}{self.name}"


def principal_of(role: str, environ: dict[str, str] | None = None) -> str:
    assert role in SERVICE_ROLES, f"unknown service role {role!r}"
    env = os.environ if environ is None else environ
    configured = env.get(f"{PRINCIPAL_VARIABLE_PREFIX}{role.upper()}", "").strip()
    return configured or f"User:wallet-{role}"


def service_grants(settings: Settings, environ: dict[str, str] | None = None) -> list[AclGrant]:
    """Every ACL the four service principals need, and nothing more."""
    topic, group, txn = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    read, write, describe = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
    commands, events = settings.commands_topic, settings.events_topic
    outcomes, dlq = settings.outcomes_topic, settings.dlq_topic
    processor_prefix = settings.processor_group_id  # group, restore readers' groups and transactional ids
    wanted = {
        "api": [
            (topic, commands, literal, write),
            (topic, outcomes, literal, read),
            (group, "wallet-outcome-waiter-", prefixed, read),
            (group, "wallet-status-", prefixed, read),
        ],
        "processor": [
            (topic, commands, literal, read),
            (topic, events, literal, read),
            (topic, events, literal, write),
            (topic, commands, literal, write),  # saga legs, and the ticks of quiet partitions
            (topic, outcomes, literal, write),
            (topic, dlq, literal, write),
            (group, processor_prefix, prefixed, read),
            (txn, processor_prefix, prefixed, write),
            (txn, processor_prefix, prefixed, describe),
            (ResourceType.BROKER, _CLUSTER, literal, AclOperation.IDEMPOTENT_WRITE),
        ],
        "readmodel": [
            (topic, events, literal, read),
            (topic, outcomes, literal, read),
            (group, f"{settings.topic_prefix}wallet-readmodel", prefixed, read),
        ],
        "audit": [
            *((topic, name, literal, read) for name in (commands, events, outcomes, dlq)),
            (group, "wallet-audit-", prefixed, read),
        ],
    }
    return [
        AclGrant(role, principal_of(role, environ), resource_type, name, pattern, operation)
        for role in SERVICE_ROLES
        for resource_type, name, pattern, operation in wanted[role]
    ]


def ensure_acls(settings: Settings, timeout_s: float = 30) -> list[AclGrant]:
    """Create every service ACL (creating an existing one changes nothing); return them.

    Needs a principal allowed to ALTER the cluster (a super user, `admin` on the local broker).
    """
    grants = service_grants(settings)
    admin = admin_client(settings.bootstrap)
    futures = admin.create_acls([grant.binding() for grant in grants], request_timeout=timeout_s)
    failures = []
    for binding, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as error:
            failures.append(f"{binding}: {error.args[0].str()}")
    if failures:
        raise AclProvisioningError(f"creating ACLs at {settings.bootstrap} failed:\n  " + "\n  ".join(failures))
    _wait_in_force(settings, grants, timeout_s)
    return grants


def _wait_in_force(settings: Settings, grants: list[AclGrant], timeout_s: float) -> None:
    """Until the broker lists every grant: the controller commits an ACL before the broker's
    authorizer applies it, and a client started in between would be refused."""
    wanted = {_key(grant.binding()) for grant in grants}
    deadline_s = time.monotonic() + timeout_s
    while True:
        missing = wanted - {_key(binding) for binding in present_acls(settings, timeout_s)}
        if not missing:
            return
        if time.monotonic() >= deadline_s:
            raise AclProvisioningError(
                f"{len(missing)} of {len(wanted)} ACLs created at {settings.bootstrap} were "
                f"not in force after {timeout_s:.0f} s, e.g. {sorted(missing)[0]}"
            )
        time.sleep(ACL_POLL_INTERVAL_S)


def _key(binding: AclBinding) -> tuple:
    return (
        str(binding.restype),
        binding.name,
        str(binding.resource_pattern_type),
        binding.principal,
        binding.host,
        str(binding.operation),
        str(binding.permission_type),
    )


def present_acls(settings: Settings, timeout_s: float = 30) -> list[AclBinding]:
    """Every ALLOW ACL the cluster holds (for checks and `--acls` reports)."""
    # None matches any name, principal and host (the stubs declare str, the client takes None).
    anything: Any = None
    any_filter = AclBindingFilter(
        ResourceType.ANY, anything, ResourcePatternType.ANY, anything, anything, AclOperation.ANY, AclPermissionType.ANY
    )
    admin = admin_client(settings.bootstrap)  # referenced until the future resolves: a dropped client cancels it
    return list(admin.describe_acls(any_filter, request_timeout=timeout_s).result(timeout=timeout_s))


class AclProvisioningError(RuntimeError):
    """The cluster refused an ACL (no authorizer configured, or the caller may not alter ACLs)."""
