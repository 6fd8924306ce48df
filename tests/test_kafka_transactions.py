"""The broker does what the pipeline needs, and the project's Kafka tooling behaves.

The pipeline's exactly-once rests on Kafka transactions: a `read_committed` consumer must see
a committed batch and never an aborted one, and consumed offsets sent inside a transaction
must commit or vanish with it. These run against the real broker of the session.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import ConfigResource, ResourceType

from infra.admin import TopicMismatchError, admin_client, ensure_topics, topic_names
from infra.ports import free_loopback_ports
from infra.settings import Settings
from infra.supervision import read_proc_stat
from wallet import localkafka
from wallet.localkafka.broker import BrokerFiles, _wait_ready, nodes_of

TRANSACTION_TIMEOUT_S = 30
CONSUME_TIMEOUT_S = 30


def _transactional_producer(settings: Settings) -> Producer:
    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap,
            "transactional.id": f"{settings.topic_prefix}test-{uuid.uuid4().hex[:8]}",
        }
    )
    producer.init_transactions(TRANSACTION_TIMEOUT_S)
    return producer


def _produce_batch(producer: Producer, topic: str, label: str, count: int = 5) -> list[str]:
    values = [f"{label}-{index}" for index in range(count)]
    for index, value in enumerate(values):
        producer.produce(topic, key=f"account-{index}", value=value)
    return values


def _read_all(settings: Settings, topic: str, isolation_level: str) -> list[str]:
    """Every value in `topic` from offset 0 up to the end visible at this isolation level."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap,
            "group.id": f"{settings.topic_prefix}reader-{uuid.uuid4().hex[:8]}",
            "isolation.level": isolation_level,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partition_count = len(consumer.list_topics(topic, timeout=CONSUME_TIMEOUT_S).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, partition, 0) for partition in range(partition_count)])
        values: list[str] = []
        partitions_at_end: set[int] = set()
        deadline_s = time.monotonic() + CONSUME_TIMEOUT_S
        while len(partitions_at_end) < partition_count:
            assert time.monotonic() < deadline_s, (
                f"reached the end of only {len(partitions_at_end)}/{partition_count} partitions "
                f"of {topic} in {CONSUME_TIMEOUT_S} s"
            )
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error:
                assert error.code() == KafkaError._PARTITION_EOF, error
                eof_partition = message.partition()
                assert eof_partition is not None  # an EOF event names its partition
                partitions_at_end.add(eof_partition)
            else:
                value = message.value()
                assert value is not None  # the test writes no tombstones
                values.append(value.decode())
        return values
    finally:
        consumer.close()


def test_read_committed_consumer_sees_committed_batches_and_never_an_aborted_one(wallet_settings: Settings) -> None:
    topic = wallet_settings.events_topic
    producer = _transactional_producer(wallet_settings)

    producer.begin_transaction()
    committed_first = _produce_batch(producer, topic, "committed")
    producer.commit_transaction(TRANSACTION_TIMEOUT_S)

    producer.begin_transaction()
    aborted = _produce_batch(producer, topic, "aborted")
    producer.flush(TRANSACTION_TIMEOUT_S)  # the aborted records are in the log, not just in the client's buffer
    producer.abort_transaction(TRANSACTION_TIMEOUT_S)

    producer.begin_transaction()
    committed_after_abort = _produce_batch(producer, topic, "after-abort")
    producer.commit_transaction(TRANSACTION_TIMEOUT_S)

    committed_view = _read_all(wallet_settings, topic, "read_committed")
    assert sorted(committed_view) == sorted(committed_first + committed_after_abort)

    # The aborted records really reached the log: only the isolation level hides them.
    uncommitted_view = _read_all(wallet_settings, topic, "read_uncommitted")
    assert sorted(uncommitted_view) == sorted(committed_first + aborted + committed_after_abort)


def test_offsets_sent_in_a_transaction_commit_and_abort_with_it(wallet_settings: Settings) -> None:
    source_topic, target_topic = wallet_settings.commands_topic, wallet_settings.outcomes_topic
    group_id = f"{wallet_settings.topic_prefix}processor-{uuid.uuid4().hex[:8]}"
    seeder = Producer({"bootstrap.servers": wallet_settings.bootstrap})
    for index in range(4):
        seeder.produce(source_topic, key="account-a", value=f"command-{index}")
    assert seeder.flush(TRANSACTION_TIMEOUT_S) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": wallet_settings.bootstrap,
            "group.id": group_id,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = _transactional_producer(wallet_settings)
    try:
        consumer.subscribe([source_topic])
        consumed: list[Message] = []
        deadline_s = time.monotonic() + CONSUME_TIMEOUT_S
        while len(consumed) < 4:
            assert time.monotonic() < deadline_s, f"consumed {len(consumed)}/4 seeded commands in {CONSUME_TIMEOUT_S} s"
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                consumed.append(message)
        partition = consumed[0].partition()
        assert partition is not None  # a consumed record names its partition
        assert {message.partition() for message in consumed} == {partition}  # one key, one partition

        def process(messages: list, commit: bool) -> None:
            producer.begin_transaction()
            for message in messages:
                producer.produce(target_topic, key="account-a", value=b"outcome-of-" + message.value())
            last_offset = messages[-1].offset()
            assert last_offset is not None  # a consumed record has an offset
            next_offset = last_offset + 1
            producer.send_offsets_to_transaction(
                [TopicPartition(source_topic, partition, next_offset)],
                consumer.consumer_group_metadata(),
                TRANSACTION_TIMEOUT_S,
            )
            if commit:
                producer.commit_transaction(TRANSACTION_TIMEOUT_S)
            else:
                producer.abort_transaction(TRANSACTION_TIMEOUT_S)

        def group_offset() -> int:
            [committed] = consumer.committed([TopicPartition(source_topic, partition)], timeout=TRANSACTION_TIMEOUT_S)
            return committed.offset

        second_offset = consumed[1].offset()
        assert second_offset is not None
        process(consumed[:2], commit=True)
        assert group_offset() == second_offset + 1
        process(consumed[2:], commit=False)
        assert group_offset() == second_offset + 1  # the aborted transaction took its offsets with it
    finally:
        consumer.close()

    assert sorted(_read_all(wallet_settings, target_topic, "read_committed")) == [
        "outcome-of-command-0",
        "outcome-of-command-1",
    ]


def test_ensure_topics_is_idempotent_and_refuses_a_different_partition_count(wallet_settings: Settings) -> None:
    assert ensure_topics(wallet_settings, partitions=4) == {name: "exists" for name in topic_names(wallet_settings)}

    with pytest.raises(TopicMismatchError, match=r"has 4 partitions, requested 6"):
        ensure_topics(wallet_settings, partitions=6)

    admin = admin_client(wallet_settings.bootstrap)
    metadata = admin.list_topics(timeout=TRANSACTION_TIMEOUT_S)
    assert {name: len(metadata.topics[name].partitions) for name in topic_names(wallet_settings)} == {
        name: 4 for name in topic_names(wallet_settings)
    }  # nothing was "fixed"
    events_config = ConfigResource(ResourceType.TOPIC, wallet_settings.events_topic)
    configs = admin.describe_configs([events_config])[events_config].result(timeout=TRANSACTION_TIMEOUT_S)
    assert configs["retention.ms"].value == "-1"
    assert configs["retention.bytes"].value == "-1"


def test_ensure_topics_creates_only_what_is_missing(make_settings) -> None:
    settings = make_settings(partitions=2)
    admin = admin_client(settings.bootstrap)
    admin.delete_topics([settings.dlq_topic])[settings.dlq_topic].result(timeout=TRANSACTION_TIMEOUT_S)
    deadline_s = time.monotonic() + TRANSACTION_TIMEOUT_S
    while settings.dlq_topic in admin.list_topics(timeout=TRANSACTION_TIMEOUT_S).topics:
        assert time.monotonic() < deadline_s, (
            f"{settings.dlq_topic} still listed {TRANSACTION_TIMEOUT_S} s after delete"
        )
        time.sleep(0.2)

    result = ensure_topics(settings)
    assert result == {
        settings.commands_topic: "exists",
        settings.events_topic: "exists",
        settings.outcomes_topic: "exists",
        settings.dlq_topic: "created",
    }


@pytest.mark.kafka
def test_local_broker_starts_reports_ready_and_stops_without_leaving_a_process(tmp_path) -> None:
    kafka_port, controller_port = free_loopback_ports(2)
    settings = Settings(
        kafka_bootstrap="", run_dir=tmp_path, local_kafka_port=kafka_port, local_controller_port=controller_port
    )
    localkafka.fetch_jars(settings)
    result = localkafka.start(settings, timeout_s=90, stop_with_parent=True)
    try:
        assert not result.already_running
        report = localkafka.status(settings)
        assert report["ready"] and report["running"] and report["pid"] == result.pid
        assert report["brokers"] == 1 and report["bootstrap"] == f"127.0.0.1:{kafka_port}"
        assert localkafka.start(settings, timeout_s=30).already_running
        # Another run folder on the same ports, started at the same moment, once took this broker
        # for its own (its JVM had not failed to bind yet) and created its topics here.
        other = Settings(
            kafka_bootstrap="",
            run_dir=tmp_path / "other",
            local_kafka_port=kafka_port,
            local_controller_port=controller_port,
        )
        other_files = BrokerFiles.of(other)
        other_files.cluster_id_file.parent.mkdir(parents=True)
        other_files.cluster_id_file.write_text("AnotherClusterIdAAAAAA\n")
        with pytest.raises(localkafka.LocalKafkaError, match="another run folder's broker holds its ports"):
            _wait_ready(other, nodes_of(other, 1), 30, processes={})
    finally:
        assert localkafka.stop(settings, timeout_s=30)

    assert not (tmp_path / "kafka" / "broker.pid").exists()
    assert not _process_exists(result.pid)
    report = localkafka.status(settings)
    assert not report["running"] and not report["ready"]
    assert localkafka.stop(settings) is False


def _process_exists(pid: int) -> bool:
    stat = read_proc_stat(pid)
    return stat is not None and stat.state != "Z"


def test_start_reports_a_taken_port_clearly(tmp_path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken_port = squatter.getsockname()[1]
        [controller_port] = free_loopback_ports(1)
        settings = Settings(
            kafka_bootstrap="", run_dir=tmp_path, local_kafka_port=taken_port, local_controller_port=controller_port
        )
        with pytest.raises(localkafka.LocalKafkaError, match=rf"port {taken_port} on 127.0.0.1 is taken"):
            localkafka.start(settings, timeout_s=5)


def test_start_without_fetched_jars_says_how_to_fetch_them(tmp_path) -> None:
    kafka_port, controller_port = free_loopback_ports(2)
    settings = Settings(
        kafka_bootstrap="",
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "empty-cache",
        local_kafka_port=kafka_port,
        local_controller_port=controller_port,
    )
    with pytest.raises(localkafka.LocalKafkaError, match=r"jars are missing .*`wallet kafka fetch`"):
        localkafka.start(settings, timeout_s=5)


def test_start_refuses_when_an_existing_cluster_is_configured(tmp_path) -> None:
    settings = Settings(kafka_bootstrap="broker-1:9092,broker-2:9092", run_dir=tmp_path)
    with pytest.raises(localkafka.LocalKafkaError, match="existing cluster"):
        localkafka.start(settings)
    assert not (tmp_path / "kafka").exists()
