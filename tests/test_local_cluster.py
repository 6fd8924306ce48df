"""The local cluster's shape (`--brokers 3`) without starting a JVM: ports, quorum, replication, the
run folder keeping its shape, and what `wallet ps` records of each node."""

from __future__ import annotations

import pytest

from infra.settings import Settings
from wallet import localkafka
from wallet.localkafka import broker
from wallet.stack import ManagedProcess, StackState


def _cluster(tmp_path, brokers: int | None = 3) -> Settings:
    return Settings().with_overrides(
        kafka_bootstrap="",
        run_dir=tmp_path,
        local_kafka_port=24092,
        local_controller_port=24093,
        local_kafka_brokers=brokers,
        replication_factor=None,
    )


def test_three_nodes_each_have_their_ports_folder_and_the_one_quorum(tmp_path):
    settings = _cluster(tmp_path)
    nodes = localkafka.nodes_of(settings)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [
        (1, 24092, 24093),
        (2, 24192, 24193),
        (3, 24292, 24293),
    ]
    assert settings.bootstrap == "127.0.0.1:24092,127.0.0.1:24192,127.0.0.1:24292"
    assert len({n.files.data_dir for n in nodes}) == 3 and len({n.files.shared_dir for n in nodes}) == 1
    properties = broker._server_properties(settings, nodes[1].files, node=nodes[1], nodes=nodes)
    lines = set(properties.splitlines())
    assert {
        "node.id=2",
        "controller.quorum.voters=1@127.0.0.1:24093,2@127.0.0.1:24193,3@127.0.0.1:24293",
        "listeners=PLAINTEXT://127.0.0.1:24192,CONTROLLER://127.0.0.1:24193",
        f"log.dirs={nodes[1].files.partitions_dir}",
        "default.replication.factor=3",
        "min.insync.replicas=2",
        "offsets.topic.replication.factor=3",
        "transaction.state.log.replication.factor=3",
        "transaction.state.log.min.isr=2",
        "broker.session.timeout.ms=5000",
        "broker.heartbeat.interval.ms=1000",
        "unclean.leader.election.enable=false",
    } <= lines
    assert settings.replication_factor == 3


def test_one_node_is_unchanged(tmp_path):
    settings = _cluster(tmp_path, brokers=None)
    (node,) = localkafka.nodes_of(settings)
    assert node.files.data_dir == tmp_path / "kafka" and settings.bootstrap == "127.0.0.1:24092"
    lines = set(broker._server_properties(settings, node.files).splitlines())
    assert {
        "node.id=1",
        "controller.quorum.voters=1@127.0.0.1:24093",
        "transaction.state.log.min.isr=1",
        "min.insync.replicas=1",
    } <= lines
    assert not any(line.startswith("broker.session.timeout.ms") for line in lines)
    assert settings.replication_factor == 1


def test_the_run_folder_keeps_its_shape(tmp_path):
    settings = _cluster(tmp_path)
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "brokers").write_text("3\n")
    assert _cluster(tmp_path, brokers=None).local_broker_count == 3  # a later start without --brokers
    assert broker._resolve_broker_count(settings) == 3
    with pytest.raises(localkafka.LocalKafkaError, match="formatted with 3 node"):
        broker._resolve_broker_count(_cluster(tmp_path, brokers=1))


def test_a_stack_file_of_one_node_still_loads_and_nodes_carry_their_id(tmp_path):
    path = tmp_path / "stack.json"
    StackState("http://127.0.0.1:1", "b", "", [ManagedProcess("kafka", "kafka-2", 10, 24192, None, 1, node_id=2)]).save(
        path
    )
    loaded = StackState.load(path)
    assert loaded is not None and loaded.processes[0].node_id == 2
    path.write_text(
        '{"api_url": "u", "bootstrap": "b", "topic_prefix": "", "processes": [{"role": "kafka", '
        '"name": "kafka", "pid": 1, "port": 19092, "log": null, "start_ticks": 1}]}'
    )
    loaded = StackState.load(path)
    assert loaded is not None and loaded.processes[0].node_id is None
