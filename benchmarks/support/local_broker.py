"""A broker for `wallet bench` when it was given none: the one configured, the project's local
broker if it runs, else one started here on free loopback ports in a temporary folder (as
tests/conftest.py does) and stopped when the bench ends."""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.ports import free_loopback_ports, port_accepts
from infra.settings import Settings

BROKER_START_TIMEOUT_S = 90.0


@contextmanager
def broker_for(settings: Settings, say=print) -> Iterator[Settings]:
    """`settings` naming a broker that answers; a broker started here is stopped on exit."""
    if not settings.uses_local_kafka or port_accepts(settings.local_kafka_port):
        yield settings
        return
    from wallet import localkafka  # only a bench that starts a broker needs the broker's launcher

    kafka_port, controller_port = free_loopback_ports(2)
    run_dir = Path(tempfile.mkdtemp(prefix="wallet-bench-kafka-"))
    broker = settings.with_overrides(
        run_dir=run_dir, local_kafka_port=kafka_port, local_controller_port=controller_port
    )
    say(
        f"no broker configured and none on port {settings.local_kafka_port}: starting one on 127.0.0.1:{kafka_port} "
        f"in {run_dir}, stopped when the bench ends"
    )
    localkafka.fetch_jars(broker)
    try:
        localkafka.start(broker, timeout_s=BROKER_START_TIMEOUT_S, stop_with_parent=True)
        yield settings.with_overrides(kafka_bootstrap=broker.bootstrap)
    finally:
        gc.collect()  # clients the bench dropped close now, not noisily after their broker is gone
        localkafka.stop(broker)
        shutil.rmtree(run_dir, ignore_errors=True)
