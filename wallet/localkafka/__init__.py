"""The project's own Apache Kafka broker on loopback (KRaft, one node), for development, tests and CI.

`pom.xml` pins the Kafka version Maven fetches; `log4j2.yaml` is the broker's logging;
`broker.py` fetches, starts, stops and reports on it.
"""
from wallet.localkafka.broker import (
    KAFKA_VERSION,
    LocalKafkaError,
    StartResult,
    client_environment,
    fetch_jars,
    jars_dir,
    local_client_security,
    sasl_enabled,
    start,
    status,
    stop,
    use_local_credentials,
)

__all__ = ["KAFKA_VERSION", "LocalKafkaError", "StartResult", "client_environment", "fetch_jars", "jars_dir",
           "local_client_security", "sasl_enabled", "start", "status", "stop", "use_local_credentials"]
