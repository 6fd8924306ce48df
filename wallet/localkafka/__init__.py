"""The project's own Apache Kafka on loopback (KRaft: one node, or `--brokers N` nodes), for development,
tests and CI.

`pom.xml` pins the Kafka version Maven fetches; `log4j2.yaml` is the broker's logging;
`broker.py` fetches, starts, stops and reports on it.
"""

from wallet.localkafka.broker import (
    KAFKA_VERSION,
    LocalKafkaError,
    Node,
    NodeProcess,
    StartResult,
    active_controller,
    client_environment,
    describe_quorum,
    fetch_jars,
    jars_dir,
    local_client_security,
    node_pids,
    nodes_of,
    sasl_enabled,
    start,
    status,
    stop,
    transaction_coordinator,
    use_local_credentials,
)

__all__ = [
    "KAFKA_VERSION",
    "LocalKafkaError",
    "Node",
    "NodeProcess",
    "StartResult",
    "active_controller",
    "client_environment",
    "describe_quorum",
    "fetch_jars",
    "jars_dir",
    "local_client_security",
    "node_pids",
    "nodes_of",
    "sasl_enabled",
    "start",
    "status",
    "stop",
    "transaction_coordinator",
    "use_local_credentials",
]
