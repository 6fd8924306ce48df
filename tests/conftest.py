"""Fixtures shared by every test module.

Tests that use a Kafka fixture (`kafka_bootstrap`, `make_settings`, `wallet_settings`) are
integration tests: they are marked `kafka` and run against a real broker, never a mock.
Every other test must pass without a broker, so no fixture here is autouse.

The broker is, in order of preference: the cluster named by WALLET_KAFKA_BOOTSTRAP; the
project's local broker if one already answers on its port (`wallet kafka start`); or one this
session starts on free ports in a temporary folder and stops at its end. With
WALLET_TEST_BROKERS=3 the session starts a local KRaft cluster of three nodes instead (never
reusing a running broker), and the topics the tests make have replication factor 3.

`./dev test` runs the suite on parallel pytest-xdist workers (`--dist loadfile`: a module's tests,
and its module-scoped broker topics and processors, stay on one worker). Each worker is its own
session: its own broker on free ports, its own temporary folders, its own PostgreSQL server, and
topics under unique prefixes. The cluster fault tests, which measure stalls, are scheduled first,
and the other workers (and all they start) run at a lower CPU priority than theirs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.admin import BrokerUnavailableError, delete_topics, ensure_topics, wait_for_broker
from infra.ports import free_cluster_ports, free_loopback_ports, port_accepts
from infra.settings import Settings
from wallet import localkafka

# One leg key for the whole session: the processes a test starts, the audits it runs in-process
# (whatever run folder their settings name) and the reference pipeline sign and verify alike.
os.environ.setdefault("WALLET_LEG_KEYS", "test:" + "3c" * 32)

KAFKA_FIXTURES = frozenset({"kafka_bootstrap", "make_settings", "wallet_settings"})
CONFIGURED_CLUSTER_TIMEOUT_S = 30
REUSE_PROBE_TIMEOUT_S = 10
BROKER_START_TIMEOUT_S = 90  # CI machines are slower than a warm laptop; a local start takes ~3 s
TOPIC_TIMEOUT_S = 30
TEST_BROKERS_VARIABLE = "WALLET_TEST_BROKERS"
CLUSTER_START_TIMEOUT_S = 240  # three JVMs on a loaded 2-core machine: measured 80-90 s at a load of 20
START_LOCK_WAIT_S = 60  # a broker's start takes 3-10 s on an idle machine


def session_broker_count() -> int:
    return int(os.environ.get(TEST_BROKERS_VARIABLE, "").strip() or "1")


# A pytest-xdist worker's niceness: the worker running the cluster fault tests takes it back
# (`take_cpu_priority`), so their stall figures are not those of a machine busy with the rest.
PARALLEL_WORKER_NICENESS = 5
FIGURE_PROPERTY = "figure"


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        os.nice(PARALLEL_WORKER_NICENESS)


def take_cpu_priority() -> None:
    """Back to niceness 0 if this worker yielded it (needs root, as CI runs; elsewhere it stays)."""
    niceness = os.nice(0)
    if niceness > 0:
        try:
            os.nice(-niceness)
        except PermissionError:
            pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)
    # The longest module first, so that the parallel run does not end waiting for it (a stable
    # sort: within each part, the collection's order).
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)


CLUSTER_TESTS_FILE = "tests/test_cluster_faults.py"


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile`, except that the worker given the cluster fault tests gets no other module
    queued behind them: they are the longest, and a module waiting for them would end the run late."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling  # only under pytest-xdist

    class ClusterAloneScheduling(LoadFileScheduling):
        def _reschedule(self, node) -> None:
            # `assigned_work`: node -> module -> {node id: done} (pytest-xdist 3.x, pinned below 4).
            if not all(self.assigned_work.get(node, {}).get(CLUSTER_TESTS_FILE, {}).values()):
                return
            super()._reschedule(node)

    return ClusterAloneScheduling(config, log)


@pytest.fixture
def report_figure(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """`report_figure(text)`: a figure the test measured, printed at the end of the run (a worker's
    own output is not shown under pytest-xdist)."""

    def report(text: str) -> None:
        record_property(FIGURE_PROPERTY, text)

    return report


def pytest_terminal_summary(terminalreporter) -> None:
    figures = [
        (report.start, report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == FIGURE_PROPERTY
    ]
    if figures:
        terminalreporter.section("figures the tests measured")
        # In the order the tests ran (a stable sort keeps a test's own figures in order).
        for _, nodeid, text in sorted(figures, key=lambda figure: figure[0]):
            terminalreporter.write_line(f"{nodeid.split('::')[-1]}: {text}")


@contextlib.contextmanager
def _starting_alone(run_dir: Path) -> Iterator[None]:
    """Under pytest-xdist, workers start their session brokers one after another: JVMs starting
    together on a 2-core machine each took longer than a start may (seen: Kafka's storage format
    past its 60 s). The lock is in the run's folder that all its workers share (each worker's
    temporary folders are `popen-gwN` in it). It only spreads the starts: after
    `START_LOCK_WAIT_S` a worker starts anyway, so that the wait never eats its test's timeout."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    with open(Path(run_dir).parent.parent / "kafka-start.lock", "w") as lock:
        deadline_s = time.monotonic() + START_LOCK_WAIT_S
        locked = False
        while not locked and time.monotonic() < deadline_s:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                time.sleep(0.2)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_UN)


def start_private_cluster(run_dir, nodes: int) -> Settings:
    """A local KRaft cluster of `nodes` nodes in `run_dir` on free ports, dying with this process."""
    kafka_port, controller_port = free_cluster_ports(nodes)
    settings = Settings().with_overrides(
        kafka_bootstrap="",
        run_dir=run_dir,
        local_kafka_port=kafka_port,
        local_controller_port=controller_port,
        local_kafka_brokers=nodes,
    )
    localkafka.fetch_jars(settings)
    localkafka.start(settings, timeout_s=CLUSTER_START_TIMEOUT_S, stop_with_parent=True)
    return settings


@pytest.fixture(scope="session")
def session_local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings | None]:
    """The Settings of the local broker or cluster this session started (None: it uses one it did not)."""
    configured = Settings()
    if not configured.uses_local_kafka:
        wait_for_broker(configured.bootstrap, CONFIGURED_CLUSTER_TIMEOUT_S)
        yield None
        return

    nodes = session_broker_count()
    if nodes > 1:
        cluster = start_private_cluster(tmp_path_factory.mktemp("kafka-cluster-run"), nodes)
        try:
            yield cluster
        finally:
            localkafka.stop(cluster)
        return

    if port_accepts(configured.local_kafka_port):
        try:
            wait_for_broker(configured.bootstrap, REUSE_PROBE_TIMEOUT_S)
        except BrokerUnavailableError as error:
            pytest.fail(f"something listens on {configured.bootstrap} but is not a working Kafka broker: {error}")
        yield None  # started by `wallet kafka start`; whoever started it stops it
        return

    # Free ports and a private folder: parallel test sessions in one checkout never share a broker.
    kafka_port, controller_port = free_loopback_ports(2)
    settings = configured.with_overrides(
        run_dir=tmp_path_factory.mktemp("kafka-run"), local_kafka_port=kafka_port, local_controller_port=controller_port
    )
    localkafka.fetch_jars(settings)
    with _starting_alone(settings.run_dir):
        localkafka.start(settings, timeout_s=BROKER_START_TIMEOUT_S, stop_with_parent=True)
    try:
        yield settings
    finally:
        localkafka.stop(settings)


@pytest.fixture(scope="session")
def kafka_bootstrap(session_local_kafka: Settings | None) -> str:
    # Settings() rather than session_local_kafka.bootstrap when none was started here: the
    # configured cluster, or the broker `wallet kafka start` runs on its default port.
    return session_local_kafka.bootstrap if session_local_kafka is not None else Settings().bootstrap


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
            # On the session's own cluster, replicated as the cluster allows (3 on 3 nodes).
            replication_factor=min(3, session_broker_count()) if session_broker_count() > 1 else None,
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
