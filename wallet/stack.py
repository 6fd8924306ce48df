"""`wallet up`, `wallet down`, `wallet ps`: the whole local stack in the background.

`up` starts, each detached in its own session so it outlives the command: the local broker
(unless a cluster is configured; `--brokers 3` makes it a cluster of three KRaft nodes, and the
run folder keeps that shape), the topics, N processors, the read model (into `--readmodel-db`, by
default SQLite in the run folder; `--readmodels N` on PostgreSQL: N shards, each its own process)
and the HTTP API;
it returns once the API answers and the processors own every partition. It records what it
started in `<run dir>/stack.json` and writes each process's output to
`<run dir>/logs/<name>.log`. `down` stops exactly what that file lists (SIGTERM by PID, SIGKILL
after a bound); a broker that was already running is left alone. Starting, liveness and
stopping are `infra.supervision`'s: by PID and the process's start time, so a reused PID is
never mistaken for, or signalled as, one of ours. `wallet demo` is in `wallet/demo.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from confluent_kafka import KafkaException

from infra.acls import AclProvisioningError, ensure_acls
from infra.admin import BrokerUnavailableError, TopicProvisioningError, admin_client, ensure_topics
from infra.ports import free_loopback_ports
from infra.settings import Settings, settings_from_args
from infra.supervision import Supervised, SupervisionError, is_running, log_tail, start_ticks_of, stop_together
from wallet import localkafka

STATE_FILE_NAME = "stack.json"
STACK_READY_TIMEOUT_S = 60.0
API_PROBE_TIMEOUT_S = 2.0
KAFKA_START_TIMEOUT_S = 240.0  # a bound, not a wait: three JVMs took 80-110 s on a loaded 2-core machine
STOP_TIMEOUT_S = 20.0
PROCESSORS_MAX = 64
READMODELS_MAX = 64
LOG_TAIL_LINES = 20
ROLES_IN_STOP_ORDER = ("api", "readmodel", "processor", "kafka")
API_PORT_DEFAULT = 8080


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class ManagedProcess:
    role: str  # kafka | processor | readmodel | api
    name: str  # unique within the stack, e.g. processor-2
    pid: int
    port: int | None
    log: str | None
    start_ticks: int | None  # from /proc/<pid>/stat: tells our process from a later one with its PID
    started_by_up: bool = True
    arguments: tuple[str, ...] = ()  # the `wallet` arguments it was started with, to restart it alike
    node_id: int | None = None  # a Kafka node's KRaft id
    metrics_port: int | None = None  # where it serves Prometheus metrics (loopback); None for Kafka

    def option(self, flag: str) -> str | None:
        """The value its command line gives `flag`, None if it gives none."""
        if flag not in self.arguments:
            return None
        return self.arguments[self.arguments.index(flag) + 1]

    @property
    def shard(self) -> str | None:
        """A read model's shard, `I/N`, as its command line names it (0/1: every partition)."""
        if self.role != "readmodel":
            return None
        return self.option("--shard") or "0/1"

    def supervised(self) -> Supervised:
        # Every process `up` spawns leads its own session; the broker is stopped through localkafka.
        return Supervised.attach(self.name, self.pid, self.start_ticks, leads_group=self.role != "kafka")


@dataclass(frozen=True)
class StackState:
    api_url: str
    bootstrap: str
    topic_prefix: str
    processes: list[ManagedProcess]

    def readmodel_db(self) -> str | None:
        """The database the stack's read model writes (and its API reads), None without a read model."""
        for process in self.processes:
            if process.role == "readmodel" and (db_url := process.option("--db")) is not None:
                return db_url
        return None

    @classmethod
    def load(cls, path: Path) -> StackState | None:
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(
            data["api_url"],
            data["bootstrap"],
            data["topic_prefix"],
            [
                ManagedProcess(**{**process, "arguments": tuple(process.get("arguments", ()))})
                for process in data["processes"]
            ],
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        temporary.replace(path)  # a reader never sees half a file


def state_path(settings: Settings) -> Path:
    return settings.run_dir / STATE_FILE_NAME


def logs_dir(settings: Settings) -> Path:
    return settings.run_dir / "logs"


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up", help="start the local stack in the background (broker, processors, read model, API)"
    )
    add_up_options(up)
    up.set_defaults(handler=reporting_errors(_up))

    down = subparsers.add_parser("down", help="stop what `wallet up` started")
    down.add_argument(
        "--timeout-s",
        type=float,
        default=STOP_TIMEOUT_S,
        help=f"how long to wait after SIGTERM before SIGKILL (default {STOP_TIMEOUT_S:.0f})",
    )
    down.set_defaults(handler=reporting_errors(_down))

    ps = subparsers.add_parser("ps", help="what the stack runs: role, PID, port")
    ps.add_argument(
        "--json",
        action="store_true",
        help='print a JSON list of {"role", "pid", "port", "metrics_port"} objects (Kafka nodes also '
        '"node_id", read models "shard": "I/N")',
    )
    ps.set_defaults(handler=reporting_errors(_ps))


def add_up_options(parser: argparse.ArgumentParser) -> None:
    """The options of `wallet up`, which `wallet demo` shares."""
    parser.add_argument(
        "--port", type=int, default=API_PORT_DEFAULT, help=f"the API's port (default {API_PORT_DEFAULT})"
    )
    parser.add_argument("--processors", type=int, default=1, help="processor instances (default 1)")
    parser.add_argument(
        "--standby",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each processor keeps a warm copy of the partitions it does not own, so a takeover folds only "
        "the log since the copy (`wallet processor --standby`; default: on when --processors is over 1)",
    )
    parser.add_argument(
        "--brokers",
        type=int,
        help="nodes of the local Kafka (env WALLET_LOCAL_KAFKA_BROKERS; default 1): 3 gives a KRaft "
        "cluster with replication factor 3, chosen when its run folder is first formatted",
    )
    parser.add_argument(
        "--readmodel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the read model and its query routes (default: yes)",
    )
    parser.add_argument(
        "--readmodel-db",
        metavar="URL",
        help="the read model's database, which the API's query routes read too: postgresql://user@host:port/db "
        "or sqlite:///path.db (default: WALLET_READMODEL_DB, else SQLite readmodel.db in the run folder)",
    )
    parser.add_argument(
        "--readmodels",
        type=int,
        default=1,
        metavar="N",
        help="read-model shards, each a `wallet readmodel --shard I/N` process owning every Nth partition "
        "(default 1; N > 1 needs a PostgreSQL --readmodel-db)",
    )
    parser.add_argument(
        "--auth",
        choices=("on", "off"),
        default="on",
        help="bearer tokens on the API (default on; off is for local experiments only)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=STACK_READY_TIMEOUT_S,
        help="how long to wait until the API answers and the processors own every partition "
        f"(default {STACK_READY_TIMEOUT_S:.0f})",
    )


def reporting_errors(handler):
    """A handler that prints the stack's expected errors as one line and exits 1."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (
            StackError,
            SupervisionError,
            localkafka.LocalKafkaError,
            BrokerUnavailableError,
            TopicProvisioningError,
            AclProvisioningError,
        ) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    wrapper.__name__ = handler.__name__
    return wrapper


# -- up --------------------------------------------------------------------------------------


def _readmodel_arguments(db_url: str, readmodels: int) -> list[tuple[str, list[str]]]:
    """(name, `wallet` arguments) of each read-model process: one, or N shards into PostgreSQL."""
    from consumers.readmodel.store import POSTGRES_PREFIXES

    if not 1 <= readmodels <= READMODELS_MAX:
        raise StackError(f"--readmodels must be within 1..{READMODELS_MAX}, got {readmodels}")
    if readmodels == 1:
        return [("readmodel", ["readmodel", "--db", db_url])]
    if not db_url.startswith(POSTGRES_PREFIXES):
        raise StackError(
            f"--readmodels {readmodels}: the read model's database {db_url} is not PostgreSQL, and SQLite has "
            "one writer at a time; give a postgresql:// --readmodel-db, or run one read model"
        )
    return [
        (f"readmodel-{index}", ["readmodel", "--db", db_url, "--shard", f"{index}/{readmodels}"])
        for index in range(readmodels)
    ]


def up(
    settings: Settings,
    *,
    port: int,
    processors: int,
    readmodel: bool,
    timeout_s: float,
    out: TextIO = sys.stdout,
    auth: bool = True,
    standby: bool | None = None,
    readmodel_db: str | None = None,
    readmodels: int = 1,
) -> StackState:
    """Start the stack and return its state once it serves; if anything fails, stop what was started."""
    if not 1 <= processors <= PROCESSORS_MAX:
        raise StackError(f"--processors must be within 1..{PROCESSORS_MAX}, got {processors}")
    if standby is None:
        # A takeover then folds only the tail, for 0-13 % of the throughput measured (README,
        # `wallet up`); a single processor owns every partition and has nothing to follow.
        standby = processors > 1
    from consumers.readmodel.store import db_url_of

    db_url = db_url_of(readmodel_db, settings) if readmodel else None
    # Refused before anything starts.
    readmodel_processes = _readmodel_arguments(db_url, readmodels) if db_url is not None else []
    with _stack_lock(settings):
        existing = StackState.load(state_path(settings))
        if existing is not None:
            alive = [process for process in existing.processes if process.started_by_up and is_alive(process)]
            if alive:
                localkafka.use_local_credentials(settings)  # what is restarted runs as its own principal again
                return _restart_exited(settings, existing, timeout_s, out)
            state_path(settings).unlink()  # every process of an old stack has exited
        _require_free_port(port)
        logs_dir(settings).mkdir(parents=True, exist_ok=True)
        started: list[ManagedProcess] = []
        try:
            started += _start_kafka(settings, out)
            # A SASL local broker: this process provisions as admin and every service it starts runs as
            # its own principal (the credentials files' paths go into the environment they inherit).
            own_principals = localkafka.use_local_credentials(settings)
            print(f"topics: {', '.join(f'{name} {how}' for name, how in ensure_topics(settings).items())}", file=out)
            if own_principals:
                print(f"acls: {len(ensure_acls(settings))} grants for the service principals", file=out)
            # One metrics port per service, each named on its command line, so a restart serves on it again.
            metrics_ports = iter(free_loopback_ports(processors + len(readmodel_processes) + 1))
            for index in range(1, processors + 1):
                name = f"processor-{index}"
                started.append(
                    _spawn(
                        settings,
                        "processor",
                        name,
                        None,
                        [
                            "processor",
                            "--instance-id",
                            name,
                            "--store",
                            str(settings.run_dir / name),
                            *(["--standby"] if standby else []),
                        ],
                        next(metrics_ports),
                    )
                )
            for name, arguments in readmodel_processes:
                started.append(_spawn(settings, "readmodel", name, None, arguments, next(metrics_ports)))
            api_arguments = ["api", "--host", "127.0.0.1", "--port", str(port)]
            if db_url is not None:
                api_arguments += ["--readmodel-db", db_url]
            api_arguments += ["--auth", "on" if auth else "off"]
            started.append(_spawn(settings, "api", "api", port, api_arguments, next(metrics_ports)))
            state = StackState(f"http://127.0.0.1:{port}", settings.bootstrap, settings.topic_prefix, started)
            state.save(state_path(settings))
            _wait_until_serving(settings, state, timeout_s)
            return state
        except BaseException:
            _stop(started, STOP_TIMEOUT_S, settings)
            state_path(settings).unlink(missing_ok=True)
            raise


def _restart_exited(settings: Settings, state: StackState, timeout_s: float, out: TextIO) -> StackState:
    """`wallet up` on a running stack: start again, alike, whatever of it has exited (a killed
    processor resumes from its snapshot and the log under the same instance id)."""
    processes = []
    restarted_nodes: dict[int, ManagedProcess] | None = None
    for process in state.processes:
        if not process.started_by_up or is_alive(process):
            processes.append(process)
        elif process.role == "kafka":
            if restarted_nodes is None:  # one start brings back every node that has exited
                restarted_nodes = {node.node_id or 1: node for node in _start_kafka(settings, out)}
            assert restarted_nodes, "a recorded broker is the local one"
            processes.append(restarted_nodes[process.node_id or 1])
        elif not process.arguments:
            raise StackError(
                f"{process.name} has exited and its command line was not recorded; run `wallet down`, then `wallet up`"
            )
        else:
            restarted = _spawn(
                settings, process.role, process.name, process.port, list(process.arguments), process.metrics_port
            )
            print(f"restarted {process.name} (pid {restarted.pid}, was {process.pid})", file=out)
            processes.append(restarted)
    if processes == state.processes:
        print(f"the stack is already up at {state.api_url}; every process runs", file=out)
        return state
    state = StackState(state.api_url, state.bootstrap, state.topic_prefix, processes)
    state.save(state_path(settings))
    _wait_until_serving(settings, state, timeout_s)
    return state


def _start_kafka(settings: Settings, out: TextIO) -> list[ManagedProcess]:
    """The local broker's nodes (each node that has exited is started again), [] for a configured cluster."""
    if not settings.uses_local_kafka:
        print(f"kafka: using the configured cluster {settings.bootstrap}", file=out)
        return []
    localkafka.fetch_jars(settings)
    result = localkafka.start(settings, timeout_s=KAFKA_START_TIMEOUT_S)
    print(
        f"kafka: {'already running' if result.already_running else 'started'} at {settings.bootstrap} "
        f"(pid {', '.join(str(node.pid) for node in result.nodes)})",
        file=out,
    )
    one_node = len(result.nodes) == 1
    # A node that was running before this `up` is not ours to stop, unless an earlier `up` started it
    # (the caller keeps that entry).
    return [
        ManagedProcess(
            "kafka",
            "kafka" if one_node else f"kafka-{node.node_id}",
            node.pid,
            node.port,
            node.log_file,
            start_ticks_of(node.pid),
            started_by_up=node.started_now,
            node_id=node.node_id,
        )
        for node in result.nodes
    ]


def _spawn(
    settings: Settings, role: str, name: str, port: int | None, arguments: list[str], metrics_port: int | None
) -> ManagedProcess:
    """Starts `wallet ARGUMENTS`; with `metrics_port`, serving metrics there unless the recorded arguments
    (of a process started again) already say so."""
    if metrics_port is not None and "--metrics-port" not in arguments:
        arguments = [*arguments, "--metrics-port", str(metrics_port)]
    global_arguments = ["--bootstrap", settings.bootstrap]
    if settings.topic_prefix:
        global_arguments += ["--topic-prefix", settings.topic_prefix]
    log_path = logs_dir(settings) / f"{name}.log"
    process = Supervised.start(
        name,
        [sys.executable, "-m", "wallet.cli", *global_arguments, *arguments],
        log_path=log_path,
        env={**os.environ, "WALLET_RUN_DIR": str(settings.run_dir), "PYTHONUNBUFFERED": "1"},
        # Its own session: it outlives `wallet up`, and a Ctrl-C in this terminal does not reach it.
        own_session=True,
    )
    return ManagedProcess(
        role,
        name,
        process.pid,
        port,
        str(log_path),
        process.start_ticks,
        arguments=tuple(arguments),
        metrics_port=metrics_port,
    )


def _wait_until_serving(settings: Settings, state: StackState, timeout_s: float) -> None:
    """Until the API answers and the processors' group owns every partition, or a started process exits."""
    admin = admin_client(settings.bootstrap)
    deadline_s = time.monotonic() + timeout_s
    waiting_for: str | None = "the first check"
    while time.monotonic() < deadline_s:
        for process in state.processes:
            if process.started_by_up and not is_alive(process):
                raise StackError(
                    f"{process.name} (pid {process.pid}) exited while the stack was starting; "
                    f"the end of {process.log}:\n{log_tail(process.log, LOG_TAIL_LINES)}"
                )
        waiting_for = _api_not_ready(state) or processors_not_ready(admin, settings)
        if waiting_for is None:
            return
        time.sleep(0.2)
    raise StackError(f"the stack was not serving within {timeout_s:.0f} s: still waiting for {waiting_for}")


def _api_not_ready(state: StackState) -> str | None:
    try:
        status, body = get_json(f"{state.api_url}/healthz", API_PROBE_TIMEOUT_S)
    except OSError as error:
        return f"the API ({error or type(error).__name__})"
    if status != 200 or not body.get("outcomes_consumer_ready"):
        return f"the API (HTTP {status}: {str(body)[:200]})"
    return None


def processors_not_ready(admin, settings: Settings, members: int | None = None) -> str | None:
    """None once the processors' group is stable and owns every partition of the commands topic
    (with `members` members, if given), else what it waits for. A freshly started broker answers
    NOT_COORDINATOR for a while: not ready yet, not an error.

    Asked with DescribeGroups sent to every broker (`list_groups`), not `describe_consumer_groups`:
    librdkafka 2.16's coordinator lookup of the latter aborts the whole process (assertion
    `eonce->refcnt > 0`, librdkafka issue #4605) when its request times out while a FindCoordinator
    is in flight, which a cluster that is still electing coordinators makes common."""
    group = settings.processor_group_id
    try:
        found = admin.list_groups(group, timeout=API_PROBE_TIMEOUT_S * 5)
    except KafkaException as error:
        return f"the processors' group {group} ({error})"
    description = next((g for g in found if g.id == group), None)
    if description is None or description.error is not None:
        return f"the processors' group {group} ({description.error if description else 'not found'})"
    owned: set[int] = set()
    for member in description.members:
        owned.update(_assigned_partitions(member.assignment, settings.commands_topic))
    if (
        description.state == "Stable"
        and len(owned) == settings.partitions
        and members in (None, len(description.members))
    ):
        return None
    of_members = "" if members is None else f", {len(description.members)} of {members} members joined"
    return f"the processors (they own {len(owned)} of {settings.partitions} partitions{of_members})"


def _assigned_partitions(assignment: bytes | None, topic: str) -> list[int]:
    """The partitions of `topic` in a classic consumer group member's assignment (Kafka's
    ConsumerProtocolAssignment: int16 version, [topic: string, partitions: [int32]], user data)."""
    if not assignment:
        return []
    view = memoryview(assignment)
    offset = 2  # the version
    (topic_count,) = struct.unpack_from(">i", view, offset)
    offset += 4
    partitions: list[int] = []
    for _ in range(topic_count):
        (name_length,) = struct.unpack_from(">h", view, offset)
        offset += 2
        name = bytes(view[offset : offset + name_length]).decode()
        offset += name_length
        (count,) = struct.unpack_from(">i", view, offset)
        offset += 4
        numbers = struct.unpack_from(f">{count}i", view, offset)
        offset += 4 * count
        if name == topic:
            partitions.extend(numbers)
    return partitions


def get_json(url: str, timeout_s: float, token: str | None = None) -> tuple[int, dict]:
    """GET a JSON document: (HTTP status, body). Raises OSError when nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _require_free_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: connections of a stack stopped a moment ago, lingering in
        # TIME_WAIT, do not make the port taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(f"port {port} on 127.0.0.1 is taken; choose another with --port") from None


@contextlib.contextmanager
def _stack_lock(settings: Settings) -> Iterator[None]:
    # Two `wallet up` at once would both find no stack and start two.
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.run_dir / ".stack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- liveness and stopping -------------------------------------------------------------------


def is_alive(process: ManagedProcess) -> bool:
    """Runs, is not a zombie, and is the process we started (not a later one with its PID)."""
    return is_running(process.pid, process.start_ticks)


def _stop(processes: list[ManagedProcess], timeout_s: float, settings: Settings) -> list[ManagedProcess]:
    """SIGTERM every process we started (API first, broker last), SIGKILL what outlives `timeout_s`."""
    ordered = sorted((p for p in processes if p.started_by_up), key=lambda p: ROLES_IN_STOP_ORDER.index(p.role))
    services = [p for p in ordered if p.role != "kafka" and is_alive(p)]
    stop_together([p.supervised() for p in services], timeout_s)
    brokers = [p for p in ordered if p.role == "kafka" and is_alive(p)]
    if brokers:  # the local broker (every node of it), stopped through its own PID files and lock
        localkafka.stop(settings, timeout_s=timeout_s)
    stop_together([p.supervised() for p in brokers], timeout_s)  # in case its PID file named another
    return services + brokers


def down(settings: Settings, timeout_s: float = STOP_TIMEOUT_S) -> list[ManagedProcess]:
    """Stop what `up` recorded; returns the processes that were running and are now stopped."""
    with _stack_lock(settings):
        state = StackState.load(state_path(settings))
        if state is None:
            return []
        stopped = _stop(state.processes, timeout_s, settings)
        state_path(settings).unlink()
        return stopped


def running_processes(settings: Settings) -> list[ManagedProcess]:
    """What runs: the stack's live processes, and the local broker even if `up` did not start it."""
    state = StackState.load(state_path(settings))
    processes = [p for p in (state.processes if state else []) if is_alive(p)]
    if settings.uses_local_kafka and not any(p.role == "kafka" for p in processes):
        nodes = localkafka.status(settings)["nodes"]
        running = [node for node in nodes if node["running"]]
        processes[:0] = [
            ManagedProcess(
                "kafka",
                "kafka" if len(nodes) == 1 else f"kafka-{node['node_id']}",
                node["pid"],
                node["port"],
                node["log_file"],
                start_ticks_of(node["pid"]),
                started_by_up=False,
                node_id=node["node_id"],
            )
            for node in running
        ]
    return processes


# -- handlers --------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    state = up(
        settings,
        port=args.port,
        processors=args.processors,
        readmodel=args.readmodel,
        timeout_s=args.timeout_s,
        auth=args.auth == "on",
        standby=args.standby,
        readmodel_db=args.readmodel_db,
        readmodels=args.readmodels,
    )
    roles = ", ".join(f"{p.name} (pid {p.pid})" for p in state.processes if p.started_by_up and p.role != "kafka")
    print(f"running {roles}; logs in {logs_dir(settings)}")
    served = [p for p in state.processes if p.metrics_port is not None]
    print(
        "Prometheus metrics: "
        + ", ".join(f"{p.name} http://127.0.0.1:{p.metrics_port}/metrics" for p in served)
        + "; watch them with `wallet top`"
    )
    print(f"the wallet API answers at {state.api_url} (OpenAPI: {state.api_url}/docs); stop with `wallet down`")
    print_auth(args.auth == "on")
    return 0


def print_auth(auth: bool) -> None:
    """Says whether the API wants tokens and how to get one; loudly when it does not."""
    if not auth:
        print(
            "!" * 78 + "\nAUTHENTICATION IS OFF: anyone who reaches the API may move any money "
            "(--auth off, local experiments only)\n" + "!" * 78
        )
        return
    print(
        "authentication is on: get a token with `export WALLET_TOKEN=$(wallet auth token --sub alice "
        '--scope "wallet:user")` and send `Authorization: Bearer $WALLET_TOKEN`; scopes: wallet:user, '
        "wallet:bank, wallet:operator, wallet:audit"
    )


def _down(args: argparse.Namespace) -> int:
    stopped = down(settings_from_args(args), args.timeout_s)
    if not stopped:
        print("nothing to stop: no stack started by `wallet up` is running")
    for process in stopped:
        print(f"stopped {process.name} (pid {process.pid})")
    return 0


def _ps(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    processes = running_processes(settings)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "role": p.role,
                        "pid": p.pid,
                        "port": p.port,
                        "metrics_port": p.metrics_port,
                        **({"node_id": p.node_id or 1} if p.role == "kafka" else {}),
                        **({"shard": p.shard} if p.role == "readmodel" else {}),
                    }
                    for p in processes
                ]
            )
        )
        return 0
    if not processes:
        print("nothing runs (start the stack with `wallet up`)")
        return 0
    print(f"{'ROLE':10} {'NAME':13} {'PID':>8} {'PORT':>6} {'METRICS':>7}  LOG")
    for p in processes:
        note = "" if p.started_by_up else "  (not started by `wallet up`; `wallet down` leaves it running)"
        port = p.port if p.port is not None else "-"
        metrics_port = p.metrics_port if p.metrics_port is not None else "-"
        print(f"{p.role:10} {p.name:13} {p.pid:>8} {port:>6} {metrics_port:>7}  {p.log or '-'}{note}")
    return 0
