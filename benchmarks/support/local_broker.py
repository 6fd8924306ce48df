"""A broker for `wallet bench` when it was given none: the one configured, the project's local
broker if it runs (and has the node count asked for), else one started here on free loopback ports
in a temporary folder (as tests/conftest.py does: one node, or a cluster of `brokers` nodes) and
stopped when the bench ends."""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.ports import free_cluster_ports, port_accepts
from infra.settings import Settings

BROKER_START_TIMEOUT_S = 90.0


@contextmanager
def broker_for(settings: Settings, say=print, brokers: int | None = None) -> Iterator[Settings]:
    """`settings` naming a broker that answers; a broker started here is stopped on exit.

    `brokers` None takes the project's local broker as it is; a count takes it only if it has
    that many nodes, else starts a local broker of that many (a cluster: replication factor 3 and
    two in-sync replicas on 3 nodes, as `wallet kafka start --brokers 3` makes)."""
    local_runs = port_accepts(settings.local_kafka_port)
    if not settings.uses_local_kafka or (local_runs and brokers in (None, settings.local_broker_count)):
        yield settings
        return
    from wallet import localkafka  # only a bench that starts a broker needs the broker's launcher

    nodes = brokers or 1
    kafka_port, controller_port = free_cluster_ports(nodes)
    run_dir = Path(tempfile.mkdtemp(prefix="wallet-bench-kafka-"))
    broker = settings.with_overrides(
        run_dir=run_dir, local_kafka_port=kafka_port, local_controller_port=controller_port, local_kafka_brokers=nodes
    )
    found = (
        f"the local broker on port {settings.local_kafka_port} has {settings.local_broker_count} node(s)"
        if local_runs
        else f"none on port {settings.local_kafka_port}"
    )
    say(
        f"no broker configured and {found}: starting {nodes} node(s) from 127.0.0.1:{kafka_port} "
        f"in {run_dir}, stopped when the bench ends"
    )
    localkafka.fetch_jars(broker)
    try:
        localkafka.start(broker, timeout_s=BROKER_START_TIMEOUT_S, stop_with_parent=True)
        yield settings.with_overrides(kafka_bootstrap=broker.bootstrap, replication_factor=broker.replication_factor)
    finally:
        gc.collect()  # clients the bench dropped close now, not noisily after their broker is gone
        localkafka.stop(broker)
        shutil.rmtree(run_dir, ignore_errors=True)
