"""Fixtures shared by every test module.

Tests that use a Kafka fixture (`kafka_bootstrap`, `make_settings`, `wallet_settings`) are
integration tests: they are marked `kafka` and run against a real broker, never a mock.
Every other test must pass without a broker, so no fixture here is autouse.

The broker is, in order of preference: the cluster named by WALLET_KAFKA_BOOTSTRAP; the
project's local broker if one already answers on its port (`wallet kafka start`); or one this
session starts on free ports in a temporary folder and stops at its end.
"""
from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest

from wallet import localkafka
from infra.settings import Settings
from infra.admin import BrokerUnavailableError, delete_topics, ensure_topics, wait_for_broker

# One leg key for the whole session: the processes a test starts, the audits it runs in-process
# (whatever run folder their settings name) and the reference pipeline sign and verify alike.
os.environ.setdefault("WALLET_LEG_KEYS", "test:" + "3c" * 32)

KAFKA_FIXTURES = frozenset({"kafka_bootstrap", "make_settings", "wallet_settings"})
CONFIGURED_CLUSTER_TIMEOUT_S = 30
REUSE_PROBE_TIMEOUT_S = 10
BROKER_START_TIMEOUT_S = 90  # CI machines are slower than a warm laptop; a local start takes ~3 s
TOPIC_TIMEOUT_S = 30


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


def free_loopback_ports(count: int) -> list[int]:
    """Ports nobody listens on right now (held open together so they are distinct)."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = Settings()
    if not configured.uses_local_kafka:
        wait_for_broker(configured.bootstrap, CONFIGURED_CLUSTER_TIMEOUT_S)
        yield configured.bootstrap
        return

    if _port_accepts(configured.local_kafka_port):
        try:
            wait_for_broker(configured.bootstrap, REUSE_PROBE_TIMEOUT_S)
        except BrokerUnavailableError as error:
            pytest.fail(f"something listens on {configured.bootstrap} but is not a working Kafka broker: {error}")
        yield configured.bootstrap  # started by `wallet kafka start`; whoever started it stops it
        return

    # Free ports and a private folder: parallel test sessions in one checkout never share a broker.
    kafka_port, controller_port = free_loopback_ports(2)
    settings = configured.with_overrides(run_dir=tmp_path_factory.mktemp("kafka-run"),
                                         local_kafka_port=kafka_port, local_controller_port=controller_port)
    localkafka.fetch_jars(settings)
    localkafka.start(settings, timeout_s=BROKER_START_TIMEOUT_S, stop_with_parent=True)
    try:
        yield settings.bootstrap
    finally:
        localkafka.stop(settings)


@pytest.fixture(scope="session")
def make_settings(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Settings]]:
    """`make_settings(partitions=4)`: Settings for a fresh set of topics under a unique prefix."""
    made: list[Settings] = []

    def make(partitions: int = 4) -> Settings:
        prefix = f"t{uuid.uuid4().hex[:8]}."
        settings = Settings().with_overrides(
            kafka_bootstrap=kafka_bootstrap,
            topic_prefix=prefix,
            partitions=partitions,
            run_dir=tmp_path_factory.mktemp(f"run-{prefix.rstrip('.')}"),
        )
        ensure_topics(settings, timeout_s=TOPIC_TIMEOUT_S)
        made.append(settings)
        return settings

    yield make
    # A reused or external broker outlives the session; leave it as we found it.
    for settings in made:
        delete_topics(settings, timeout_s=TOPIC_TIMEOUT_S)


@pytest.fixture(scope="module")
def wallet_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(4)
