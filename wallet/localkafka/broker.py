"""The project's own Apache Kafka on loopback for development, tests and CI: one node, or a cluster.

By default one JVM is both KRaft controller and broker, listening on 127.0.0.1 only, with its
data, logs and PID file under `settings.run_dir / "kafka"`. With `--brokers N`
(`WALLET_LOCAL_KAFKA_BROKERS`, chosen when the run folder is first formatted and kept after) it is
a cluster of N such combined nodes, each its own JVM (512 MB heap) with its own ports (node K on
the client and controller ports plus (K - 1) * 100) and its own folder `kafka/node<K>/`, one
static controller quorum of all N, replication factor min(3, N) for the internal topics with a
minimum in-sync count one below it, and failure detection tuned so that the loss of a node stalls
commits for seconds, not the defaults' 10-18 s (`_CLUSTER_TUNING`). The jars come from Maven Central
once (`fetch_jars`) into the git-ignored cache folder; everything after that is offline.
The broker runs detached from the command that started it, and is stopped by the PID it
recorded, never by process name, so brokers of other checkouts on other ports are safe.

With SASL (`start(..., sasl=True)`, `wallet kafka start --sasl` or `WALLET_LOCAL_KAFKA_SASL=1`)
the client listener is SASL_PLAINTEXT with SCRAM-SHA-512 and the StandardAuthorizer denies
everything no ACL allows (`allow.everyone.if.no.acl.found=false`). `admin` is the only super
user (the broker itself, provisioning); one user per service principal (`wallet-api`,
`wallet-processor`, `wallet-readmodel`, `wallet-audit`) is created at format time with a
random password, written as a librdkafka properties file per role into `kafka/sasl/` of the
run folder (folder 0700, files 0600, never committed). Point a client at its file with
`WALLET_KAFKA_CONFIG_FILE_<ROLE>` (see `client_environment`). Users live in the KRaft metadata,
so the choice is made once per run folder, when it is formatted.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.admin import BrokerUnavailableError, wait_for_broker
from infra.kafka_clients import ROLES, read_properties_file
from infra.settings import BROKER_COUNT_FILE, Settings, recorded_broker_count
from infra.supervision import Supervised, SupervisionError, is_running, start_ticks_of, stop_together

KAFKA_VERSION = "4.1.1"  # keep equal to kafka.version in pom.xml
JAVA_VERSION_MIN = 17  # Kafka 4 brokers need Java 17

_PACKAGE_DIR = Path(__file__).resolve().parent
POM_PATH = _PACKAGE_DIR / "pom.xml"
LOG4J2_CONFIG_PATH = _PACKAGE_DIR / "log4j2.yaml"

JVM_HEAP_MAX = "1g"
CLUSTER_JVM_HEAP_MAX = "512m"  # per node of a cluster: three fit beside the pipeline on a small machine
CLUSTER_NODES_MAX = 9
TOOL_TIMEOUT_S = 60
FETCH_TIMEOUT_S = 600
FORMAT_TIMEOUT_S = 60
JAVA_PROBE_TIMEOUT_S = 20
STATUS_PROBE_TIMEOUT_S = 5
KILL_WAIT_S = 10
LOG_TAIL_LINES = 25
NODE_ID = 1

SASL_ENV = "WALLET_LOCAL_KAFKA_SASL"
SASL_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
ADMIN_USER = "admin"
_PASSWORD_BYTES = 24
# What the run folder was formatted for: users live in the metadata log, so it cannot change later.
_SECURITY_PLAINTEXT = "PLAINTEXT"
_SECURITY_SASL = "SASL_PLAINTEXT"


def sasl_username(role: str) -> str:
    """The local broker's user of a client role: `admin` is the super user, the rest are service principals."""
    assert role in ROLES, role
    return ADMIN_USER if role == "admin" else f"wallet-{role}"


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class BrokerFiles:
    """One node's files (`data_dir`) and those its cluster shares (`root`): the cluster id, the
    lock, the security choice and the SASL credentials. One node: both are `<run dir>/kafka`."""

    data_dir: Path
    root: Path | None = None

    @classmethod
    def of(cls, settings: Settings, node_id: int | None = None, broker_count: int = 1) -> BrokerFiles:
        root = settings.run_dir / "kafka"
        if broker_count == 1:
            return cls(root, root)
        assert node_id is not None and 1 <= node_id <= broker_count, (node_id, broker_count)
        return cls(root / f"node{node_id}", root)

    @property
    def shared_dir(self) -> Path:
        return self.root if self.root is not None else self.data_dir

    @property
    def broker_count_file(self) -> Path:
        return self.shared_dir / BROKER_COUNT_FILE

    @property
    def properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def partitions_dir(self) -> Path:
        return self.data_dir / "data"  # Kafka's `log.dirs`: the partition logs and KRaft metadata

    @property
    def cluster_id_file(self) -> Path:
        return self.shared_dir / "cluster.id"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "server.log"  # written by log4j2 (see log4j2.yaml)

    @property
    def console_log(self) -> Path:
        return self.data_dir / "console.log"  # the JVM's own stdout/stderr: crashes before log4j2 is up

    @property
    def lock_file(self) -> Path:
        return self.shared_dir / ".lock"

    @property
    def security_file(self) -> Path:
        return self.shared_dir / "listener-security"  # PLAINTEXT or SASL_PLAINTEXT, written when formatted

    @property
    def sasl_dir(self) -> Path:
        return self.shared_dir / "sasl"

    def client_properties(self, role: str) -> Path:
        return self.sasl_dir / f"{role}.properties"

    @property
    def controller_password_file(self) -> Path:
        return self.sasl_dir / "controller.password"


@dataclass(frozen=True)
class Node:
    """One node of the local broker: KRaft node id, ports and files."""

    node_id: int
    port: int
    controller_port: int
    files: BrokerFiles


@dataclass(frozen=True)
class NodeProcess:
    node_id: int
    pid: int
    port: int
    log_file: str
    started_now: bool  # False: it was already running


@dataclass(frozen=True)
class StartResult:
    pid: int  # the first node's
    already_running: bool  # every node was
    ready_after_s: float
    nodes: tuple[NodeProcess, ...] = ()


def nodes_of(settings: Settings, broker_count: int | None = None) -> list[Node]:
    """The nodes of this run folder's broker (its recorded shape unless `broker_count` is given)."""
    count = settings.local_broker_count if broker_count is None else broker_count
    nodes = []
    for node_id in range(1, count + 1):
        port, controller_port = settings.local_node_ports(node_id)
        nodes.append(Node(node_id, port, controller_port, BrokerFiles.of(settings, node_id, count)))
    return nodes


def _resolve_broker_count(settings: Settings) -> int:
    """The node count to start: what the folder was formatted with (a request for another is refused)."""
    requested = settings.local_kafka_brokers
    if requested is not None and not 1 <= requested <= CLUSTER_NODES_MAX:
        raise LocalKafkaError(f"--brokers must be within 1..{CLUSTER_NODES_MAX}, got {requested}")
    recorded = recorded_broker_count(settings.run_dir)
    if recorded is None:
        return requested or 1
    if requested is not None and requested != recorded:
        raise LocalKafkaError(
            f"the local broker in {settings.run_dir / 'kafka'} was formatted with {recorded} node(s); its "
            f"metadata and replicas are laid out for them, so it cannot become {requested}. Use another run "
            f"folder (WALLET_RUN_DIR) or stop it and delete {settings.run_dir / 'kafka'}"
        )
    return recorded


def jars_dir(settings: Settings) -> Path:
    return settings.cache_dir / f"kafka-{KAFKA_VERSION}" / "jars"


def _fetch_marker(settings: Settings) -> Path:
    # Written only after Maven finished, so an interrupted fetch is never mistaken for a cache.
    return jars_dir(settings).parent / "fetch-complete"


def fetch_jars(settings: Settings) -> bool:
    """Fill the jar cache from Maven Central unless it is complete; return True if it fetched now."""
    target_dir = jars_dir(settings)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target_dir.parent / ".lock"):
        if _fetch_marker(settings).exists():
            return False
        mvn = shutil.which("mvn")
        if mvn is None:
            raise LocalKafkaError(
                f"Maven (mvn) is not on PATH; it is needed once to fetch Kafka {KAFKA_VERSION}'s jars "
                "(Debian: apt-get install -y maven)"
            )
        staging_dir = target_dir.parent / "jars.partial"
        shutil.rmtree(staging_dir, ignore_errors=True)
        shutil.rmtree(target_dir, ignore_errors=True)
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM_PATH),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging_dir}",
        ]
        try:
            completed = subprocess.run(
                command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as error:
            raise LocalKafkaError(f"mvn did not finish fetching Kafka's jars within {FETCH_TIMEOUT_S} s") from error
        if completed.returncode != 0:
            raise LocalKafkaError(
                f"mvn failed (exit {completed.returncode}) fetching Kafka's jars with: {' '.join(command)}\n"
                + _last_lines(completed.stdout + completed.stderr)
            )
        staging_dir.rename(target_dir)
        jar_count = len(list(target_dir.glob("*.jar")))
        if jar_count == 0:
            raise LocalKafkaError(f"mvn succeeded but left no jars in {target_dir}")
        _fetch_marker(settings).write_text(f"kafka {KAFKA_VERSION}, {jar_count} jars\n")
        return True


def start(
    settings: Settings,
    timeout_s: float = 60,
    *,
    stop_with_parent: bool = False,
    sasl: bool | None = None,
    only: set[int] | None = None,
) -> StartResult:
    """Start the local broker (every node of it) in the background and return once it answers a
    metadata request that lists every node.

    Nodes already running from this run folder are reused; one that has exited is started again
    (same data, no re-format). `stop_with_parent` makes the nodes started now die with the calling
    process (for test sessions that may be killed before their teardown runs: the kernel signals
    them when the calling *thread* ends, so call it from the main thread); without it they
    outlive the command that started them. `sasl` None means: what the run folder was formatted
    with, else `WALLET_LOCAL_KAFKA_SASL=1`. `only` (node ids) starts just those of the missing
    nodes and waits for the nodes then running (a fault test bringing back one of two lost nodes).
    """
    if not settings.uses_local_kafka:
        raise LocalKafkaError(
            f"an existing cluster is configured ({settings.kafka_bootstrap}); the local broker is not started"
        )
    shared = BrokerFiles.of(settings)
    shared.data_dir.mkdir(parents=True, exist_ok=True)
    started_s = time.monotonic()
    with _exclusive(shared.lock_file):
        broker_count = _resolve_broker_count(settings)
        nodes = nodes_of(settings, broker_count)
        use_sasl = _resolve_sasl(nodes[0].files, sasl)
        if use_sasl and broker_count > 1:
            # Not tried yet: SCRAM users at format time and the controllers' PLAIN listener on 3 nodes.
            raise LocalKafkaError(
                "a local cluster (--brokers > 1) runs PLAINTEXT only for now; SASL needs a one-node run folder"
            )
        running = {node.node_id: _running_pid(node.files) for node in nodes}
        missing = [node for node in nodes if running[node.node_id] is None and (only is None or node.node_id in only)]
        expected = sum(1 for node in nodes if running[node.node_id] is not None) + len(missing)
        if not missing:
            _wait_ready(settings, nodes, timeout_s, processes={}, brokers_min=expected)
            return StartResult(
                _pid(running[nodes[0].node_id]),
                already_running=True,
                ready_after_s=time.monotonic() - started_s,
                nodes=tuple(_node_process(node, _pid(running[node.node_id]), False) for node in nodes),
            )

        for node in missing:
            for port in (node.port, node.controller_port):
                _require_free_port(port)
        java = _require_java()
        classpath = _require_classpath(settings)
        if not shared.broker_count_file.exists():
            shared.broker_count_file.write_text(f"{broker_count}\n")
        passwords = _ensure_sasl_credentials(settings, nodes[0].files) if use_sasl else None
        for node in missing:
            node.files.data_dir.mkdir(parents=True, exist_ok=True)
            _write_private(
                node.files.properties, _server_properties(settings, node.files, passwords, node=node, nodes=nodes)
            )
        _format_storage_once(java, classpath, [node.files for node in missing], passwords)

        processes: dict[int, subprocess.Popen] = {}
        try:
            for node in missing:
                processes[node.node_id] = _launch(
                    java,
                    classpath,
                    node.files,
                    stop_with_parent,
                    heap_max=JVM_HEAP_MAX if broker_count == 1 else CLUSTER_JVM_HEAP_MAX,
                )
                node.files.pid_file.write_text(f"{processes[node.node_id].pid}\n")
            _wait_ready(settings, nodes, timeout_s, processes, brokers_min=expected)
        except BaseException:
            for node in missing:
                if node.node_id in processes:
                    _terminate(processes[node.node_id].pid, KILL_WAIT_S)
                    node.files.pid_file.unlink(missing_ok=True)
            raise
        pids = {
            **{k: v for k, v in running.items() if v is not None},
            **{node_id: process.pid for node_id, process in processes.items()},
        }
        return StartResult(
            pids.get(nodes[0].node_id) or next(iter(pids.values())),
            already_running=False,
            ready_after_s=time.monotonic() - started_s,
            nodes=tuple(
                _node_process(node, pids[node.node_id], node.node_id in processes)
                for node in nodes
                if node.node_id in pids
            ),
        )


def _pid(pid: int | None) -> int:
    assert pid is not None
    return pid


def _node_process(node: Node, pid: int, started_now: bool) -> NodeProcess:
    return NodeProcess(node.node_id, pid, node.port, str(node.files.server_log), started_now)


def stop(settings: Settings, timeout_s: float = 30) -> bool:
    """Stop every node recorded in the PID files (SIGTERM to all at once: a node stopping alone
    while the others wait would lose its quorum mid-shutdown); return False if none was running."""
    shared = BrokerFiles.of(settings)
    if not shared.data_dir.exists():
        return False
    with _exclusive(shared.lock_file):
        nodes = nodes_of(settings)
        running = [(node, pid) for node in nodes if (pid := _running_pid(node.files)) is not None]
        if not running:
            return False
        try:
            stop_together(
                [
                    Supervised.attach(f"Kafka node {node.node_id}", pid, start_ticks_of(pid), leads_group=False)
                    for node, pid in running
                ],
                timeout_s,
            )
        except SupervisionError as error:
            raise LocalKafkaError(str(error)) from None
        for node, _ in running:
            node.files.pid_file.unlink(missing_ok=True)
        return True


def node_pids(settings: Settings) -> dict[int, int | None]:
    """{node id: PID of its running JVM, or None}."""
    return {node.node_id: _running_pid(node.files) for node in nodes_of(settings)}


def sasl_enabled(settings: Settings) -> bool:
    """True when this run folder's broker was formatted with SASL/SCRAM and ACLs."""
    files = BrokerFiles.of(settings)
    return files.security_file.exists() and files.security_file.read_text().strip() == _SECURITY_SASL


def local_client_security(settings: Settings, role: str) -> dict[str, str]:
    """librdkafka security settings of `role` on this run folder's broker ({} without SASL)."""
    if not sasl_enabled(settings):
        return {}
    path = BrokerFiles.of(settings).client_properties(role)
    return read_properties_file(path, f"the local broker's credentials of {role}")


def client_environment(settings: Settings) -> dict[str, str]:
    """`WALLET_KAFKA_CONFIG_FILE_<ROLE>` for every role of a SASL local broker: paths, no secrets,
    so a launcher can hand each service its own principal ({} without SASL)."""
    if not sasl_enabled(settings):
        return {}
    files = BrokerFiles.of(settings)
    return {f"WALLET_KAFKA_CONFIG_FILE_{role.upper()}": str(files.client_properties(role)) for role in ROLES}


def use_local_credentials(settings: Settings) -> bool:
    """On this run folder's SASL broker, with no Kafka credentials in the environment, put each
    role's credentials file into it (`WALLET_KAFKA_CONFIG_FILE_<ROLE>`: paths, no secrets), so
    this process and the services it starts run as their own principals. True if it did."""
    configured = any(
        name.startswith(("WALLET_KAFKA_CONFIG_FILE", "WALLET_KAFKA_SASL_", "WALLET_KAFKA_SECURITY_"))
        for name in os.environ
    )
    if not settings.uses_local_kafka or configured or not sasl_enabled(settings):
        return False
    os.environ.update(client_environment(settings))
    return True


def status(settings: Settings, *, quorum: bool = False) -> dict:
    """What runs and whether it answers; for an existing cluster only the latter. `nodes` lists
    each local node (id, PID or None, ports, folder, log); `quorum` also asks the KRaft quorum
    which node is the active controller (a JVM tool: about a second)."""
    files = BrokerFiles.of(settings)
    report: dict = {
        "bootstrap": settings.bootstrap,
        "managed_locally": settings.uses_local_kafka,
        "kafka_version": KAFKA_VERSION if settings.uses_local_kafka else None,
        "pid": None,
        "running": None,
        "ready": False,
        "brokers": 0,
        "cluster_id": None,
        "controller_id": None,
        "topics": 0,
        "data_dir": str(files.data_dir) if settings.uses_local_kafka else None,
        "sasl": sasl_enabled(settings) if settings.uses_local_kafka else None,
        "log_file": None,
        "nodes": [],
        "error": None,
    }
    if settings.uses_local_kafka:
        nodes = nodes_of(settings)
        report["log_file"] = str(nodes[0].files.server_log)
        for node in nodes:
            pid = _running_pid(node.files) if node.files.data_dir.exists() else None
            report["nodes"].append(
                {
                    "node_id": node.node_id,
                    "pid": pid,
                    "running": pid is not None,
                    "port": node.port,
                    "controller_port": node.controller_port,
                    "data_dir": str(node.files.data_dir),
                    "log_file": str(node.files.server_log),
                }
            )
        running = [node for node in report["nodes"] if node["running"]]
        report["pid"] = running[0]["pid"] if running else None
        report["running"] = bool(running)
        if not running:
            report["error"] = "the local broker is not running (start it with `wallet kafka start`)"
            return report
    # The local broker is probed with its own admin credentials; an existing cluster with the configured ones.
    security = local_client_security(settings, "admin") if settings.uses_local_kafka else None
    try:
        metadata = wait_for_broker(settings.bootstrap, STATUS_PROBE_TIMEOUT_S, security=security)
    except BrokerUnavailableError as error:
        report["error"] = str(error)
        return report
    listed = set(metadata.brokers)
    for node in report["nodes"]:
        node["registered"] = node["node_id"] in listed  # in the cluster's metadata (fenced nodes are not)
    report.update(
        ready=True,
        brokers=len(metadata.brokers),
        cluster_id=metadata.cluster_id,
        # On KRaft this is a random live broker, not the active controller: see `quorum`.
        controller_id=metadata.controller_id,
        topics=sum(1 for name in metadata.topics if not name.startswith("__")),
    )
    if quorum and settings.uses_local_kafka:
        try:
            report["quorum"] = describe_quorum(settings)
        except LocalKafkaError as error:
            report["quorum"] = {"error": str(error)}
    return report


def _run_tool(settings: Settings, tool_class: str, arguments: list[str]) -> str:
    """Run one of Kafka's command-line tools from the jars against this run folder's broker; its stdout."""
    java = _require_java()
    classpath = _require_classpath(settings)
    shared = BrokerFiles.of(settings)
    command = [
        java,
        "-Xmx256m",
        f"-Dlog4j2.configurationFile={LOG4J2_CONFIG_PATH}",
        f"-Dkafka.logs.dir={shared.data_dir / 'tools'}",
        "-cp",
        classpath,
        tool_class,
    ]
    admin = local_client_security(settings, "admin") if settings.uses_local_kafka else {}
    if admin:
        config_path = shared.sasl_dir / "admin.tool.properties"
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{admin["sasl.username"]}" password="{admin["sasl.password"]}";'
        )
        _write_private(
            config_path,
            f"security.protocol={admin['security.protocol']}\n"
            f"sasl.mechanism={admin['sasl.mechanism']}\nsasl.jaas.config={jaas}\n",
        )
        command += ["--command-config", str(config_path)]
    command += ["--bootstrap-server", settings.bootstrap, *arguments]
    try:
        completed = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        raise LocalKafkaError(f"{tool_class} did not answer within {TOOL_TIMEOUT_S} s") from error
    if completed.returncode != 0:
        raise LocalKafkaError(
            f"{tool_class} {' '.join(arguments)} failed (exit {completed.returncode}):\n"
            + _last_lines(completed.stdout + completed.stderr)
        )
    return completed.stdout


def _key_values(text: str) -> dict[str, str]:
    """`Key:  value` lines of Kafka's describe tools."""
    found = {}
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if separator and key.strip() and " " not in key.strip():
            found[key.strip()] = value.strip()
    return found


def describe_quorum(settings: Settings) -> dict:
    """The KRaft quorum as the quorum itself says (`kafka-metadata-quorum describe --status`):
    `leader_id` is the active controller. The metadata response's controller id is NOT that on
    KRaft (brokers answer with a random live node)."""
    fields = _key_values(_run_tool(settings, "org.apache.kafka.tools.MetadataQuorumCommand", ["describe", "--status"]))
    try:
        return {
            "leader_id": int(fields["LeaderId"]),
            "leader_epoch": int(fields["LeaderEpoch"]),
            "high_watermark": int(fields["HighWatermark"]),
            "voters": fields.get("CurrentVoters", ""),
            "observers": fields.get("CurrentObservers", ""),
        }
    except (KeyError, ValueError):
        raise LocalKafkaError(f"unexpected answer of the metadata quorum tool: {fields}") from None


def active_controller(settings: Settings) -> int:
    """The node id of the active KRaft controller (the quorum's leader)."""
    return int(describe_quorum(settings)["leader_id"])


def transaction_coordinator(settings: Settings, transactional_id: str) -> dict:
    """`kafka-transactions describe`: the coordinator node id and state of a transactional id
    (the Python AdminClient has no DescribeTransactions)."""
    output = _run_tool(
        settings, "org.apache.kafka.tools.TransactionsCommand", ["describe", "--transactional-id", transactional_id]
    )
    lines = [line for line in output.splitlines() if line.strip()]
    if len(lines) < 2:
        raise LocalKafkaError(f"unexpected answer of the transactions tool: {output!r}")
    # A table: a header line and one row, the cells separated by tabs (padded with spaces).
    header, row = ([cell.strip() for cell in re.split(r"\t|\s{2,}", line.strip())] for line in lines[:2])
    described = dict(zip(header, row, strict=False))
    try:
        return {
            "coordinator_id": int(described["CoordinatorId"]),
            "state": described.get("TransactionState"),
            "producer_id": described.get("ProducerId"),
            "epoch": described.get("ProducerEpoch"),
        }
    except (KeyError, ValueError):
        raise LocalKafkaError(f"unexpected answer of the transactions tool: {output!r}") from None


def _wait_ready(
    settings: Settings,
    nodes: list[Node],
    timeout_s: float,
    processes: dict[int, subprocess.Popen],
    brokers_min: int | None = None,
) -> None:
    def exit_reason() -> str | None:
        for node in nodes:
            process = processes.get(node.node_id)
            if process is not None and process.poll() is not None:
                return (
                    f"Kafka node {node.node_id} exited with code {process.returncode} while starting.\n"
                    + _log_tails(node.files)
                )
        return None

    # Its own admin credentials ({} = PLAINTEXT), never the environment's, which may name another cluster's.
    security = local_client_security(settings, "admin")
    try:
        metadata = wait_for_broker(
            settings.bootstrap,
            timeout_s,
            abort_reason=exit_reason,
            security=security,
            brokers_min=len(nodes) if brokers_min is None else brokers_min,
        )
    except BrokerUnavailableError as error:
        if exit_reason() is not None:
            raise LocalKafkaError(str(error)) from None
        raise LocalKafkaError(
            f"{error}; the broker process is still running but not ready.\n"
            + "\n".join(_log_tails(node.files) for node in nodes)
        ) from None
    cluster_id_file = BrokerFiles.of(settings).cluster_id_file
    ours = cluster_id_file.read_text().strip() if cluster_id_file.exists() else None
    if ours is not None and metadata.cluster_id != ours:
        # Two run folders started at once on the same ports: the other one's broker bound them
        # first and answered for ours, which then exits; topics must not go to the wrong cluster.
        raise LocalKafkaError(
            f"the broker answering at {settings.bootstrap} is cluster {metadata.cluster_id}, not this run "
            f"folder's ({ours}): another run folder's broker holds its ports. Choose other ports with "
            "WALLET_LOCAL_KAFKA_PORT / WALLET_LOCAL_CONTROLLER_PORT"
        )


def _resolve_sasl(files: BrokerFiles, requested: bool | None) -> bool:
    recorded = files.security_file.read_text().strip() if files.security_file.exists() else None
    if recorded is None and (files.partitions_dir / "meta.properties").exists():
        recorded = _SECURITY_PLAINTEXT  # formatted before the folder recorded its security
    if requested is None:
        if recorded is not None:
            return recorded == _SECURITY_SASL
        return os.environ.get(SASL_ENV, "").strip().lower() in ("1", "true", "yes")
    if recorded is not None and (recorded == _SECURITY_SASL) != requested:
        raise LocalKafkaError(
            f"the broker in {files.data_dir} was formatted with {recorded}; its users live in the metadata log, "
            f"so it cannot switch to {_SECURITY_SASL if requested else _SECURITY_PLAINTEXT}. Use another run folder "
            f"(WALLET_RUN_DIR) or stop the broker and delete {files.data_dir}"
        )
    return requested


def _write_private(path: Path, text: str) -> None:
    """Write `text` readable by the owner only (the file may hold passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file of wider mode is narrowed too
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _ensure_sasl_credentials(settings: Settings, files: BrokerFiles) -> dict[str, str]:
    """{role: password} (plus "controller"), generated once per run folder into 0600 files."""
    files.sasl_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(files.sasl_dir, 0o700)
    passwords: dict[str, str] = {}
    formatted = (files.partitions_dir / "meta.properties").exists()
    for role in ROLES:
        path = files.client_properties(role)
        if not path.exists():
            if formatted:
                # The users were made with the lost passwords; a new one would never authenticate.
                raise LocalKafkaError(
                    f"{path} is missing but the broker in {files.data_dir} was formatted with it; "
                    f"stop the broker and delete {files.data_dir} to start afresh"
                )
            _write_private(
                path,
                "\n".join(
                    [
                        f"# The local broker's {role} principal; generated by `wallet kafka start --sasl`, "
                        "never commit it.",
                        f"security.protocol={_SECURITY_SASL}",
                        f"sasl.mechanism={SASL_MECHANISM}",
                        f"sasl.username={sasl_username(role)}",
                        f"sasl.password={secrets.token_hex(_PASSWORD_BYTES)}",
                    ]
                )
                + "\n",
            )
        properties = read_properties_file(path, f"the local broker's credentials of {role}")
        assert properties["sasl.username"] == sasl_username(role), path
        passwords[role] = properties["sasl.password"]
    if not files.controller_password_file.exists():
        _write_private(files.controller_password_file, secrets.token_hex(_PASSWORD_BYTES) + "\n")
    passwords["controller"] = files.controller_password_file.read_text().strip()
    return passwords


def _sasl_lines(passwords: dict[str, str]) -> list[str]:
    admin_password, controller_password = passwords["admin"], passwords["controller"]
    return [
        # Clients and the broker itself: SCRAM-SHA-512, users in the KRaft metadata log (created at format time).
        f"sasl.enabled.mechanisms={SASL_MECHANISM}",
        f"sasl.mechanism.inter.broker.protocol={SASL_MECHANISM}",
        f"listener.name.sasl_plaintext.sasl.enabled.mechanisms={SASL_MECHANISM}",
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config="
        f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{ADMIN_USER}" '
        f'password="{admin_password}";',
        # The broker reaches its controller as admin over SASL/PLAIN with a static user list: it cannot
        # depend on SCRAM users of the metadata log the controller serves, and a PLAINTEXT controller
        # listener would have to make User:ANONYMOUS a super user.
        "sasl.mechanism.controller.protocol=PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
        "listener.name.controller.plain.sasl.jaas.config="
        f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{ADMIN_USER}" '
        f'password="{controller_password}" user_{ADMIN_USER}="{controller_password}";',
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        f"super.users=User:{ADMIN_USER}",
        # Least privilege: a principal may do only what an ACL allows (`wallet topics create --acls`).
        "allow.everyone.if.no.acl.found=false",
    ]


# A cluster's failure detection (measured with tests/test_cluster_faults.py):
# the controller fences a silent broker after the session timeout (default 9 s) and only then moves
# its leaderships and coordinators; with 3 s (heartbeat every 1 s) one node's loss stalled commits
# for about 5-8 s instead of 11-18 s on an idle machine. But at load averages of 40-50 the
# controller's event queue stalled for 2-3 s at a time and 3 s fenced live brokers, the active
# controller's own among them, twice in one run: a second failover in the middle of the first.
# 5 s (five heartbeats) rides through such stalls and still fences a dead broker well within 10 s.
_CLUSTER_TUNING = [
    "broker.session.timeout.ms=5000",
    "broker.heartbeat.interval.ms=1000",
]


def _server_properties(
    settings: Settings,
    files: BrokerFiles,
    passwords: dict[str, str] | None = None,
    *,
    node: Node | None = None,
    nodes: list[Node] | None = None,
) -> str:
    if node is None or nodes is None:  # the one-node layout
        node = Node(NODE_ID, settings.local_kafka_port, settings.local_controller_port, files)
        nodes = [node]
    broker_address = f"127.0.0.1:{node.port}"
    controller_address = f"127.0.0.1:{node.controller_port}"
    voters = ",".join(f"{other.node_id}@127.0.0.1:{other.controller_port}" for other in nodes)
    # Replicas of the internal topics: every node up to 3; a write needs all but one of them in sync.
    replicas = min(3, len(nodes))
    insync_min = max(1, replicas - 1)
    if passwords is None:
        listener_lines = [
            f"listeners=PLAINTEXT://{broker_address},CONTROLLER://{controller_address}",
            f"advertised.listeners=PLAINTEXT://{broker_address}",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        ]
    else:
        listener_lines = [
            f"listeners=SASL_PLAINTEXT://{broker_address},CONTROLLER://{controller_address}",
            f"advertised.listeners=SASL_PLAINTEXT://{broker_address}",
            "inter.broker.listener.name=SASL_PLAINTEXT",
            "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
            *_sasl_lines(passwords),
        ]
    lines = [
        "# Written by `wallet kafka start` on every start; edits here are overwritten.",
        "process.roles=broker,controller",
        f"node.id={node.node_id}",
        f"controller.quorum.voters={voters}",
        "controller.listener.names=CONTROLLER",
        *listener_lines,
        f"log.dirs={files.partitions_dir}",
        # A mistyped topic name must fail loudly, not create a stray topic with default settings.
        "auto.create.topics.enable=false",
        f"num.partitions={settings.partitions}",
        # One node: every replicated internal topic has exactly one replica; a cluster: up to three,
        # and an acknowledged write is on two of them before its producer hears so.
        f"default.replication.factor={replicas}",
        f"min.insync.replicas={insync_min}",
        f"offsets.topic.replication.factor={replicas}",
        f"transaction.state.log.replication.factor={replicas}",
        f"transaction.state.log.min.isr={insync_min}",
        f"share.coordinator.state.topic.replication.factor={replicas}",
        f"share.coordinator.state.topic.min.isr={insync_min}",
        # A replica that is not in sync never becomes leader: that would drop acknowledged writes.
        "unclean.leader.election.enable=false",
        *(_CLUSTER_TUNING if len(nodes) > 1 else []),
        # Fewer coordinator partitions than the default 50 make the first group and the first
        # transaction ready sooner on a 2-core machine; a small cluster gains nothing from more.
        "offsets.topic.num.partitions=8",
        "transaction.state.log.num.partitions=8",
        # Tests and the demo start consumers one after another; waiting for more members only delays them.
        "group.initial.rebalance.delay.ms=0",
    ]
    return "\n".join(lines) + "\n"


def _format_storage_once(java: str, classpath: str, nodes: list[BrokerFiles], passwords: dict[str, str] | None) -> None:
    """Format every node that is not yet, with the folder's one cluster id; the nodes in parallel
    (each a JVM of seconds: on a loaded 2-core machine, a serial format of 3 took 40 s)."""
    unformatted = [files for files in nodes if not (files.partitions_dir / "meta.properties").exists()]
    if not unformatted:
        return
    shared = unformatted[0]
    if shared.cluster_id_file.exists():
        cluster_id = shared.cluster_id_file.read_text().strip()
    else:
        # Kafka's Uuid text form: URL-safe base64 of 16 random bytes, without padding; like Kafka's
        # Uuid.randomUuid, never one that starts with "-", which StorageTool would read as an option.
        cluster_id = "-"
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        shared.cluster_id_file.write_text(cluster_id + "\n")
    running: list[tuple[BrokerFiles, subprocess.Popen]] = []
    try:
        for files in unformatted:
            command = [
                java,
                *_jvm_logging_options(files),
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(files.properties),
            ]
            if passwords is not None:
                # StorageTool takes SCRAM users only as arguments, so during this one-off format (seconds) the
                # passwords are on its command line; every later use reads them from the 0600 files.
                for role in ROLES:
                    command += [
                        "--add-scram",
                        f"{SASL_MECHANISM}=[name={sasl_username(role)},"
                        f"password={passwords[role]},iterations={SCRAM_ITERATIONS}]",
                    ]
            running.append(
                (
                    files,
                    subprocess.Popen(
                        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                    ),
                )
            )
        for files, process in running:
            try:
                output, _ = process.communicate(timeout=FORMAT_TIMEOUT_S)
            except subprocess.TimeoutExpired as error:
                raise LocalKafkaError(
                    f"formatting Kafka's storage did not finish within {FORMAT_TIMEOUT_S} s"
                ) from error
            if process.returncode != 0:
                raise LocalKafkaError(
                    f"formatting Kafka's storage in {files.partitions_dir} failed "
                    f"(exit {process.returncode}):\n" + _last_lines(output)
                )
    finally:
        for _, process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    shared.security_file.write_text((_SECURITY_PLAINTEXT if passwords is None else _SECURITY_SASL) + "\n")


def _jvm_logging_options(files: BrokerFiles) -> list[str]:
    return [f"-Dlog4j2.configurationFile={LOG4J2_CONFIG_PATH}", f"-Dkafka.logs.dir={files.data_dir}"]


def _launch(
    java: str, classpath: str, files: BrokerFiles, stop_with_parent: bool, heap_max: str = JVM_HEAP_MAX
) -> subprocess.Popen:
    command = [
        java,
        f"-Xmx{heap_max}",
        "-Xms256m" if heap_max == JVM_HEAP_MAX else "-Xms128m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        # A broker that ran out of heap is broken; dying makes the failure visible at once.
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        *_jvm_logging_options(files),
        "-cp",
        classpath,
        "kafka.Kafka",
        str(files.properties),
    ]
    setpriv = shutil.which("setpriv")
    if stop_with_parent and setpriv is not None:
        # The kernel sends SIGTERM when the parent dies, even by SIGKILL; `setpriv` sets that up and execs java.
        command = [setpriv, "--pdeathsig", "TERM", *command]
    with files.console_log.open("wb") as console:
        return subprocess.Popen(
            command,
            cwd=files.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError(
            f"Java is not on PATH; the local Kafka broker needs Java {JAVA_VERSION_MIN}+ "
            "(Debian: apt-get install -y openjdk-17-jre-headless)"
        )
    try:
        completed = subprocess.run(
            [java, "-version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=JAVA_PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        raise LocalKafkaError(f"`{java} -version` did not answer within {JAVA_PROBE_TIMEOUT_S} s") from error
    match = re.search(r'version "(\d+)', completed.stderr + completed.stdout)
    if match is None or int(match.group(1)) < JAVA_VERSION_MIN:
        found = match.group(1) if match else "unknown"
        raise LocalKafkaError(f"{java} is Java {found}; Kafka {KAFKA_VERSION} needs Java {JAVA_VERSION_MIN}+")
    return java


def _require_classpath(settings: Settings) -> str:
    if not _fetch_marker(settings).exists():
        raise LocalKafkaError(
            f"Kafka {KAFKA_VERSION}'s jars are missing from {jars_dir(settings)}; "
            "fetch them once with `wallet kafka fetch`"
        )
    return str(jars_dir(settings) / "*")  # the JVM expands the wildcard itself


def _require_free_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # The JVM binds with SO_REUSEADDR, so only a live listener (not TIME_WAIT leftovers) blocks it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise LocalKafkaError(
                f"port {port} on 127.0.0.1 is taken ({error.strerror}) by a process this run folder did not start; "
                f"find it with `ss -ltnp 'sport = :{port}'`, or choose other ports with "
                "WALLET_LOCAL_KAFKA_PORT / WALLET_LOCAL_CONTROLLER_PORT"
            ) from None


def _running_pid(files: BrokerFiles) -> int | None:
    """The PID in the PID file if that process is alive and is this folder's broker; a stale file is removed."""
    try:
        pid = int(files.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        files.pid_file.unlink(missing_ok=True)
        return None
    if _is_alive(pid) and _is_our_broker(pid, files):
        return pid
    files.pid_file.unlink(missing_ok=True)  # the broker died, or the PID now belongs to another process
    return None


def _is_alive(pid: int) -> bool:
    return is_running(pid)  # an unreaped zombie is dead for our purposes


def _is_our_broker(pid: int, files: BrokerFiles) -> bool:
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"kafka.Kafka" in arguments and str(files.properties).encode() in arguments


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM (Kafka then flushes and closes its logs cleanly), and SIGKILL if that takes longer than timeout_s."""
    try:
        Supervised.attach("the Kafka broker", pid, start_ticks_of(pid), leads_group=False).stop(timeout_s)
    except SupervisionError as error:
        raise LocalKafkaError(str(error)) from None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise start/stop/fetch between processes sharing a folder (several shells, parallel test runs)."""
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _last_lines(text: str, line_count: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-line_count:])


def _log_tails(files: BrokerFiles) -> str:
    parts = []
    for path in (files.console_log, files.server_log):
        if path.exists() and path.stat().st_size > 0:
            parts.append(f"--- last lines of {path} ---\n" + _last_lines(path.read_text(errors="replace")))
    return "\n".join(parts) if parts else f"(no log output in {files.data_dir})"
