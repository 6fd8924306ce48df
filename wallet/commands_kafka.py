"""`wallet kafka start|stop|status|fetch` and `wallet topics create`."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable

from confluent_kafka import KafkaException

from infra.acls import AclProvisioningError, ensure_acls
from infra.admin import BrokerUnavailableError, TopicProvisioningError, ensure_topics
from infra.kafka_clients import KafkaSecurityConfigError
from infra.settings import Settings, settings_from_args
from wallet import localkafka

_OPERATING_ERRORS = (
    localkafka.LocalKafkaError,
    BrokerUnavailableError,
    TopicProvisioningError,
    KafkaException,
    AclProvisioningError,
    KafkaSecurityConfigError,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    kafka = subparsers.add_parser(
        "kafka", help="the project's local Kafka (KRaft on 127.0.0.1: one node, or --brokers N)"
    )
    kafka_commands = kafka.add_subparsers(dest="kafka_command", metavar="ACTION", required=True)

    fetch = kafka_commands.add_parser("fetch", help=f"download Kafka {localkafka.KAFKA_VERSION}'s jars once with Maven")
    fetch.set_defaults(handler=_reporting_errors(_fetch))

    start = kafka_commands.add_parser(
        "start", help="start the local broker in the background and wait until it answers"
    )
    start.add_argument("--timeout-s", type=float, default=60, help="how long to wait for readiness (default 60)")
    start.add_argument(
        "--sasl",
        action="store_true",
        help="SASL/SCRAM-SHA-512 users per service and ACLs enforced (env WALLET_LOCAL_KAFKA_SASL=1); "
        "chosen when the run folder is first formatted",
    )
    start.add_argument(
        "--brokers",
        type=int,
        help="KRaft nodes, each its own JVM, ports and folder (env WALLET_LOCAL_KAFKA_BROKERS; "
        "default 1); chosen when the run folder is first formatted and kept after",
    )
    start.set_defaults(handler=_reporting_errors(_start))

    stop = kafka_commands.add_parser("stop", help="stop the local broker by the PID it recorded")
    stop.add_argument(
        "--timeout-s", type=float, default=30, help="how long to wait after SIGTERM before SIGKILL (default 30)"
    )
    stop.set_defaults(handler=_reporting_errors(_stop))

    status = kafka_commands.add_parser("status", help="is the broker running and answering? (exit 0 when ready)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "--no-quorum",
        dest="quorum",
        action="store_false",
        help="do not ask a cluster's KRaft quorum for its active controller (a JVM tool, ~1 s)",
    )
    status.set_defaults(handler=_reporting_errors(_status))

    topics = subparsers.add_parser("topics", help="the project's Kafka topics")
    topics_commands = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create = topics_commands.add_parser(
        "create", help="create the commands, events, outcomes and dlq topics where missing (idempotent)"
    )
    create.add_argument("--partitions", type=int, help="partition count (env WALLET_PARTITIONS, default 8)")
    create.add_argument(
        "--replication-factor", type=int, help="replicas per partition (env WALLET_REPLICATION_FACTOR, default 1)"
    )
    create.add_argument("--timeout-s", type=float, default=30, help="how long to wait for the cluster (default 30)")
    create.add_argument(
        "--acls",
        action="store_true",
        help="also create the service principals' ACLs (api, processor, readmodel, audit; "
        "needs a principal that may alter ACLs)",
    )
    create.set_defaults(handler=_reporting_errors(_create_topics))


def _reporting_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    # Operating errors (no broker, port taken, topic mismatch) are the user's to fix: one clear
    # message and exit 1, not a traceback.
    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except _OPERATING_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return wrapper


def _external_cluster_note(settings: Settings) -> str:
    return (
        f"an existing cluster is configured ({settings.kafka_bootstrap}, from --bootstrap or "
        "WALLET_KAFKA_BOOTSTRAP); the local broker is not managed"
    )


def _fetch(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    started_s = time.monotonic()
    fetched = localkafka.fetch_jars(settings)
    where = localkafka.jars_dir(settings)
    if fetched:
        print(f"fetched Kafka {localkafka.KAFKA_VERSION} jars into {where} in {time.monotonic() - started_s:.1f} s")
    else:
        print(f"Kafka {localkafka.KAFKA_VERSION} jars already cached in {where}")
    return 0


def _start(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.uses_local_kafka:
        print(f"nothing started: {_external_cluster_note(settings)}")
        return 0
    result = localkafka.start(settings, timeout_s=args.timeout_s, sasl=True if args.sasl else None)
    state = "already running" if result.already_running else "started"
    pids = ", ".join(str(node.pid) for node in result.nodes)
    print(
        f"Kafka {localkafka.KAFKA_VERSION} {state} at {settings.bootstrap} (pid {pids}), "
        f"ready after {result.ready_after_s:.1f} s; data and logs in {settings.run_dir / 'kafka'}"
    )
    if len(result.nodes) > 1:
        for node in result.nodes:
            print(
                f"  node {node.node_id}: pid {node.pid}, port {node.port}"
                f"{'' if node.started_now else ' (was running)'}, log {node.log_file}"
            )
    if localkafka.sasl_enabled(settings):
        print("SASL/SCRAM-SHA-512 with ACLs: each role's credentials are a 0600 file; give each service its own:")
        for name, path in localkafka.client_environment(settings).items():
            print(f"  export {name}={path}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.uses_local_kafka:
        print(f"nothing stopped: {_external_cluster_note(settings)}")
        return 0
    if localkafka.stop(settings, timeout_s=args.timeout_s):
        print(f"stopped the local Kafka at {settings.bootstrap}")
    else:
        print("the local Kafka broker was not running")
    return 0


def _status(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    clustered = settings.uses_local_kafka and settings.local_broker_count > 1
    report = localkafka.status(settings, quorum=args.quorum and clustered)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0 if report["ready"] else 1
    if report["ready"]:
        where = f"local broker pid {report['pid']}" if report["managed_locally"] else "existing cluster"
        if clustered:
            running = sum(1 for node in report["nodes"] if node["running"])
            where = f"local cluster, {running} of {len(report['nodes'])} nodes running"
        print(
            f"ready: {report['bootstrap']} ({where}), {report['brokers']} broker(s), "
            f"cluster id {report['cluster_id']}, {report['topics']} topic(s)"
        )
        if report["managed_locally"]:
            print(f"data: {report['data_dir']}  log: {report['log_file']}")
            if report["sasl"]:
                print(f"SASL/SCRAM-SHA-512 with ACLs; credentials per role in {report['data_dir']}/sasl/")
    else:
        print(f"not ready: {report['error']}")
    if clustered:
        leader = report.get("quorum", {}).get("leader_id")
        for node in report["nodes"]:
            state = "running" if node["running"] else "NOT RUNNING"
            if node["running"] and node.get("registered") is False:
                state += ", not in the cluster's metadata (fenced or still starting)"
            role = ", active controller" if node["node_id"] == leader else ""
            print(
                f"  node {node['node_id']}: {state}{role}, pid {node['pid'] or '-'}, port {node['port']}, "
                f"log {node['log_file']}"
            )
        if "error" in report.get("quorum", {}):
            print(f"  quorum: {report['quorum']['error']}")
    return 0 if report["ready"] else 1


def _create_topics(args: argparse.Namespace) -> int:
    settings = settings_from_args(args).with_overrides(replication_factor=args.replication_factor)
    localkafka.use_local_credentials(settings)
    result = ensure_topics(settings, partitions=args.partitions, timeout_s=args.timeout_s)
    partitions = args.partitions if args.partitions is not None else settings.partitions
    for name, state in result.items():
        print(f"{state:8} {name}")
    print(
        f"{len(result)} topics at {settings.bootstrap} with {partitions} partitions, "
        f"replication factor {settings.replication_factor}"
    )
    if args.acls:
        grants = ensure_acls(settings, timeout_s=args.timeout_s)
        for grant in grants:
            print(f"allow    {grant.describe()}")
        print(f"{len(grants)} ACLs present for the service principals")
    return 0
