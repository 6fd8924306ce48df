"""Least-privilege Kafka principals on a SASL/SCRAM broker with the StandardAuthorizer.

The first tests check the settings and the ACL table without a broker. The `kafka` ones start
their own broker (`wallet kafka start --sasl` in a temporary folder, free
ports), applies `wallet topics create --acls`, and runs every client as the principal of its
role, the way a deployment would: the API cannot write the processors' topics or take their
transactional id, the read model writes nothing, and a processor running as its own principal
still processes a transfer exactly once.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid

import msgspec
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AclOperation, ResourcePatternType, ResourceType

from consumers.audit.runner import run_audit
from consumers.readmodel.consumer import ReadModelConsumer, read_lag
from consumers.readmodel.store import ReadModelStore
from infra.acls import ensure_acls, present_acls, principal_of, service_grants
from infra.admin import admin_client
from infra.kafka_clients import (
    ROLES,
    KafkaSecurityConfigError,
    kafka_security,
    processor_consumer_config,
    processor_producer_config,
    restore_consumer_config,
)
from infra.ports import free_loopback_ports
from infra.settings import Settings
from producers.client import WalletClient
from schemas.codec import decode_event
from schemas.commands import Deposit, OpenAccount, PlaceHold, Transfer
from schemas.events import Event, HoldExpired
from streams.core.state import State, fold
from tests.conftest import BROKER_START_TIMEOUT_S, TOPIC_TIMEOUT_S
from tests.support.kafka_io import read_topic
from tests.support.processes import ProcessorProcess
from wallet import localkafka
from wallet.localkafka import broker

kafka = pytest.mark.kafka  # the tests below on a broker; the fixtures here are not the conftest's

PARTITIONS = 2
DELIVERY_TIMEOUT_S = 30
REQUEST_WAIT_S = 30
CATCH_UP_TIMEOUT_S = 60
CLI_TIMEOUT_S = 120
_ids = itertools.count()


def _config_file_variable(role: str) -> str:
    return f"WALLET_KAFKA_CONFIG_FILE_{role.upper()}"


SCRAM = {"WALLET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "WALLET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"}


def test_nothing_configured_means_plaintext_without_credentials():
    assert all(kafka_security(role, {}) == {} for role in ROLES)


def test_a_roles_own_settings_win_over_the_shared_file_and_variables(tmp_path):
    shared = tmp_path / "shared.properties"
    shared.write_text(
        "# shared\nsecurity.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
        "sasl.username=shared\nsasl.password=shared-secret\nssl.ca.location=/etc/ca.pem\n"
    )
    environ = {
        "WALLET_KAFKA_CONFIG_FILE": str(shared),
        "WALLET_KAFKA_SASL_USERNAME_PROCESSOR": "wallet-processor",
        "WALLET_KAFKA_SASL_PASSWORD_PROCESSOR": "processor-secret",
    }
    assert kafka_security("processor", environ) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "wallet-processor",
        "sasl.password": "processor-secret",
        "ssl.ca.location": "/etc/ca.pem",
    }
    assert kafka_security("api", environ)["sasl.username"] == "shared"


def test_a_config_file_holds_security_settings_only(tmp_path):
    config = tmp_path / "client.properties"
    config.write_text("security.protocol=SSL\nenable.idempotence=false\n")
    with pytest.raises(KafkaSecurityConfigError, match="enable.idempotence is not a security setting"):
        kafka_security("api", {"WALLET_KAFKA_CONFIG_FILE_API": str(config)})
    with pytest.raises(KafkaSecurityConfigError, match="cannot read"):
        kafka_security("api", {"WALLET_KAFKA_CONFIG_FILE": str(tmp_path / "missing")})


def test_sasl_without_a_password_or_with_half_a_role_override_is_refused():
    with pytest.raises(KafkaSecurityConfigError, match="needs sasl.password"):
        kafka_security("audit", {**SCRAM, "WALLET_KAFKA_SASL_USERNAME": "wallet-audit"})
    with pytest.raises(KafkaSecurityConfigError, match="set both for the role or neither"):
        kafka_security(
            "audit",
            {
                **SCRAM,
                "WALLET_KAFKA_SASL_USERNAME": "shared",
                "WALLET_KAFKA_SASL_PASSWORD": "pw",
                "WALLET_KAFKA_SASL_USERNAME_AUDIT": "wallet-audit",
            },
        )


def test_the_processors_clients_run_as_the_processor_principal(monkeypatch):
    for name, value in {
        **SCRAM,
        "WALLET_KAFKA_SASL_USERNAME": "shared",
        "WALLET_KAFKA_SASL_PASSWORD": "pw",
        "WALLET_KAFKA_SASL_USERNAME_PROCESSOR": "wallet-processor",
        "WALLET_KAFKA_SASL_PASSWORD_PROCESSOR": "processor-secret",
    }.items():
        monkeypatch.setenv(name, value)
    configs = [
        processor_consumer_config("b:9092", "wallet-processor", "p1"),
        processor_producer_config("b:9092", "wallet-processor-p1", 10_000),
        restore_consumer_config("b:9092", "wallet-processor", "p1"),
    ]
    assert {(config["sasl.username"], config["bootstrap.servers"]) for config in configs} == {
        ("wallet-processor", "b:9092")
    }


def test_the_acl_table_gives_each_service_only_what_it_needs():
    settings = Settings().with_overrides(topic_prefix="staging.")
    grants = service_grants(settings, environ={"WALLET_KAFKA_PRINCIPAL_API": "User:payments-api"})
    by_role = {
        role: {(g.resource_type, g.name, g.pattern, g.operation) for g in grants if g.role == role}
        for role in ("api", "processor", "readmodel", "audit")
    }
    assert {g.principal for g in grants if g.role == "api"} == {"User:payments-api"}
    topic_writes = {
        role: {
            name
            for kind, name, _, operation in entries
            if kind == ResourceType.TOPIC and operation == AclOperation.WRITE
        }
        for role, entries in by_role.items()
    }
    every_topic = {f"staging.wallet.{name}" for name in ("commands", "events", "outcomes", "dlq")}
    assert topic_writes == {
        "api": {"staging.wallet.commands"},
        "processor": every_topic,
        "readmodel": set(),
        "audit": set(),
    }
    assert (
        ResourceType.TRANSACTIONAL_ID,
        "staging.wallet-processor",
        ResourcePatternType.PREFIXED,
        AclOperation.WRITE,
    ) in by_role["processor"]
    assert not any(
        kind == ResourceType.TRANSACTIONAL_ID for role in ("api", "readmodel", "audit") for kind, *_ in by_role[role]
    )
    assert {operation for role in ("readmodel", "audit") for *_, operation in by_role[role]} == {AclOperation.READ}


def test_local_sasl_credentials_are_private_files_made_once(tmp_path):
    settings = Settings().with_overrides(kafka_bootstrap="", run_dir=tmp_path)
    files = broker.BrokerFiles.of(settings)
    passwords = broker._ensure_sasl_credentials(settings, files)
    assert broker._ensure_sasl_credentials(settings, files) == passwords  # generated once per run folder
    assert files.sasl_dir.stat().st_mode & 0o777 == 0o700
    assert {path.name: path.stat().st_mode & 0o777 for path in files.sasl_dir.iterdir()} == {
        **{f"{role}.properties": 0o600 for role in ROLES},
        "controller.password": 0o600,
    }
    properties = broker._server_properties(settings, files, passwords)
    assert "allow.everyone.if.no.acl.found=false" in properties and "super.users=User:admin" in properties
    assert "PLAINTEXT://" not in properties.replace("SASL_PLAINTEXT://", "")
    files.security_file.parent.mkdir(parents=True, exist_ok=True)
    files.security_file.write_text("PLAINTEXT\n")
    with pytest.raises(localkafka.LocalKafkaError, match="cannot switch to SASL_PLAINTEXT"):
        broker._resolve_sasl(files, True)


def test_a_sasl_run_folder_hands_each_role_its_credentials_file(tmp_path, monkeypatch):
    for name in [name for name in os.environ if name.startswith("WALLET_KAFKA_")]:
        monkeypatch.delenv(name)
    for role in ROLES:  # recorded as absent, so the teardown removes what use_local_credentials sets
        monkeypatch.setenv(_config_file_variable(role), "")
        monkeypatch.delenv(_config_file_variable(role))
    settings = Settings().with_overrides(kafka_bootstrap="", run_dir=tmp_path)
    files = broker.BrokerFiles.of(settings)
    broker._ensure_sasl_credentials(settings, files)
    assert not localkafka.use_local_credentials(settings)  # not formatted with SASL: nothing to hand out
    files.security_file.write_text("SASL_PLAINTEXT\n")
    assert localkafka.use_local_credentials(settings)
    for role in ROLES:
        assert os.environ[_config_file_variable(role)] == str(files.client_properties(role))
        assert kafka_security(role)["sasl.username"] == broker.sasl_username(role)


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory):
    kafka_port, controller_port = free_loopback_ports(2)
    local = Settings().with_overrides(
        kafka_bootstrap="",
        run_dir=tmp_path_factory.mktemp("sasl-kafka-run"),
        local_kafka_port=kafka_port,
        local_controller_port=controller_port,
    )
    localkafka.fetch_jars(local)
    localkafka.start(local, timeout_s=BROKER_START_TIMEOUT_S, stop_with_parent=True, sasl=True)
    try:
        yield local
    finally:
        localkafka.stop(local)


@pytest.fixture(scope="module")
def principals(sasl_broker: Settings):
    """Each role's credentials file in the environment, as a deployment would set them; nothing shared."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("WALLET_KAFKA_")]:
            patch.delenv(name)  # a developer's own cluster settings must not leak into this broker's clients
        for name, path in localkafka.client_environment(sasl_broker).items():
            patch.setenv(name, path)
        yield patch


@pytest.fixture(scope="module")
def secured(sasl_broker: Settings, principals: pytest.MonkeyPatch) -> Settings:
    """Topics under a fresh prefix with the service ACLs, made the way a person would: `wallet topics
    create --acls` against the local SASL broker, which finds the run folder's admin credentials itself."""
    prefix = f"a{uuid.uuid4().hex[:8]}."
    environment = {name: value for name, value in os.environ.items() if not name.startswith("WALLET_KAFKA_")}
    environment.update(
        WALLET_RUN_DIR=str(sasl_broker.run_dir),
        WALLET_TOPIC_PREFIX=prefix,
        WALLET_LOCAL_KAFKA_PORT=str(sasl_broker.local_kafka_port),
        WALLET_LOCAL_CONTROLLER_PORT=str(sasl_broker.local_controller_port),
    )
    created = subprocess.run(
        [sys.executable, "-m", "wallet.cli", "topics", "create", "--acls", "--partitions", str(PARTITIONS)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    assert "ACLs present for the service principals" in created.stdout, created.stdout
    settings = Settings().with_overrides(
        kafka_bootstrap=sasl_broker.bootstrap,
        topic_prefix=prefix,
        partitions=PARTITIONS,
        run_dir=sasl_broker.run_dir / "stack",
    )
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    return settings


@pytest.fixture(scope="module")
def processor(secured: Settings, principals: pytest.MonkeyPatch):
    # The processor process gets the processor's credentials only: any client in it that used
    # another role would reach the SASL listener without credentials and fail.
    saved = {role: os.environ[_config_file_variable(role)] for role in ROLES}
    for role in ROLES:
        if role != "processor":
            principals.delenv(_config_file_variable(role))
    try:
        process = ProcessorProcess(secured, "acl-1").start()
    finally:
        for role, path in saved.items():
            principals.setenv(_config_file_variable(role), path)
    process.wait_until_assigned()
    yield process
    assert process.stop() == 0, process.log_tail()


def _command(command_class, *, actor: str = "alice", role: str = "user", **fields):
    """A command of whichever message contract is in force: ts_ms (v1) or actor and role (v2), where it has them."""
    names = {field.name for field in msgspec.structs.fields(command_class)}
    extras = {"ts_ms": int(time.time() * 1000), "actor": actor, "role": role}
    return command_class(**fields, **{name: value for name, value in extras.items() if name in names})


def _tx(label: str) -> str:
    return f"{label}-{next(_ids)}"


def _delivery_errors(role: str, settings: Settings, topics: list[str], **config) -> dict[str, KafkaError | None]:
    """Produce one record to each topic as `role`; the delivery report's error per topic (None = written)."""
    reports: dict[str, KafkaError | None] = {}
    producer = Producer(
        {
            **kafka_security(role),
            "bootstrap.servers": settings.bootstrap,
            "acks": "all",
            "message.timeout.ms": DELIVERY_TIMEOUT_S * 1000,
            **config,
        }
    )

    def on_delivery(error: KafkaError | None, message) -> None:
        reports[message.topic()] = error

    for topic in topics:
        producer.produce(topic, b"{}", b"some-account", on_delivery=on_delivery)
    assert producer.flush(DELIVERY_TIMEOUT_S) == 0, "deliveries still pending"
    return reports


def _events(settings: Settings) -> list[tuple[int, Event]]:
    """(partition, event) of every committed record of wallet.events."""
    records = read_topic(settings, settings.events_topic)
    assert all(record.value is not None for record in records), "a processor never writes a tombstone"
    return [(record.partition, decode_event(record.value or b"")) for record in records]


def _balances(settings: Settings) -> dict[str, int]:
    states: dict[int, State] = {}
    for partition, event in _events(settings):
        fold(states.setdefault(partition, State()), event)
    return {
        account_id: account.balance_minor for state in states.values() for account_id, account in state.accounts.items()
    }


@kafka
def test_acls_are_applied_for_the_four_service_principals(secured: Settings):
    listed = {(binding.principal, binding.name, binding.operation) for binding in present_acls(secured)}
    assert (principal_of("api"), secured.commands_topic, AclOperation.WRITE) in listed
    assert (principal_of("processor"), secured.processor_group_id, AclOperation.WRITE) in listed  # its txn ids
    assert not any(principal == principal_of("api") and name == secured.events_topic for principal, name, _ in listed)
    assert ensure_acls(secured, timeout_s=TOPIC_TIMEOUT_S)  # a second run is a no-op, not an error


@kafka
def test_api_principal_cannot_write_events_outcomes_or_dlq(secured: Settings):
    topics = [secured.events_topic, secured.outcomes_topic, secured.dlq_topic]
    for idempotence in (False, True):
        errors = _delivery_errors("api", secured, topics, **{"enable.idempotence": idempotence})
        assert {topic: error.code() if error else None for topic, error in errors.items()} == {
            topic: KafkaError.TOPIC_AUTHORIZATION_FAILED for topic in topics
        }
        assert all(error is not None and error.name() == "TOPIC_AUTHORIZATION_FAILED" for error in errors.values())


@kafka
def test_api_principal_writes_client_commands(secured: Settings):
    assert _delivery_errors("api", secured, [secured.commands_topic], **{"enable.idempotence": True}) == {
        secured.commands_topic: None
    }


@kafka
def test_api_principal_cannot_use_the_processors_transactional_id(secured: Settings):
    producer = Producer(
        {
            **kafka_security("api"),
            "bootstrap.servers": secured.bootstrap,
            "transactional.id": secured.processor_transactional_id("acl-1"),
        }
    )
    with pytest.raises(KafkaException) as raised:
        producer.init_transactions(DELIVERY_TIMEOUT_S)
    error = raised.value.args[0]
    assert error.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, error
    assert error.fatal(), "a producer refused its transactional id is unusable and must be recreated"


@kafka
def test_readmodel_principal_cannot_write_anything(secured: Settings):
    topics = [secured.commands_topic, secured.events_topic, secured.outcomes_topic, secured.dlq_topic]
    errors = _delivery_errors("readmodel", secured, topics)
    assert {topic: error.code() if error else None for topic, error in errors.items()} == {
        topic: KafkaError.TOPIC_AUTHORIZATION_FAILED for topic in topics
    }


@kafka
def test_processor_principal_processes_a_transfer_exactly_once(secured: Settings, processor: ProcessorProcess):
    sender, receiver = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    transfer = _command(
        Transfer, transaction_id=_tx("t"), from_account=sender, to_account=receiver, amount="30.00", currency="USD"
    )
    # The API's path: its own principal publishes client commands and waits on wallet.outcomes.
    with WalletClient.connect(secured) as api:
        for account in (sender, receiver):
            opened = api.request(
                _command(OpenAccount, transaction_id=_tx("open"), account_id=account, currency="USD"), REQUEST_WAIT_S
            )
            assert opened is not None and opened.status == "success", opened
        deposited = api.request(
            _command(
                Deposit,
                transaction_id=_tx("dep"),
                account_id=sender,
                amount="100.00",
                currency="USD",
                actor="bank",
                role="bank",
            ),
            REQUEST_WAIT_S,
        )
        assert deposited is not None and deposited.status == "success", deposited
        first = api.request(transfer, REQUEST_WAIT_S)
        retried = api.request(transfer, REQUEST_WAIT_S)  # a client retry: the first answer, not a second transfer
    assert first is not None and first.status == "success", first
    assert retried is not None and (retried.status, retried.reason) == (first.status, first.reason)

    balances = _balances(secured)
    assert (balances[sender], balances[receiver]) == (7000, 3000)
    kinds = [
        type(event).__name__
        for _, event in _events(secured)
        if getattr(event, "transaction_id", None) == transfer.transaction_id
    ]
    assert kinds.count("TransferDebited") == 1 and kinds.count("TransferCredited") == 1, kinds
    assert processor.process is not None and processor.process.poll() is None, processor.log_tail()


@kafka
def test_processor_principal_writes_the_ticks_that_expire_a_hold_on_a_quiet_partition(
    secured: Settings, processor: ProcessorProcess
):
    account = f"dora-{uuid.uuid4().hex[:6]}"
    hold = _command(
        PlaceHold,
        transaction_id=_tx("hold"),
        actor=account,
        account_id=account,
        to_account="elsewhere",
        amount="1.00",
        currency="USD",
        expires_in_ms=500,
    )
    with WalletClient.connect(secured) as api:
        for command in (
            _command(OpenAccount, transaction_id=_tx("open"), actor=account, account_id=account, currency="USD"),
            _command(
                Deposit,
                transaction_id=_tx("dep"),
                account_id=account,
                amount="1.00",
                currency="USD",
                actor="bank",
                role="bank",
            ),
            hold,
        ):
            answer = api.request(command, REQUEST_WAIT_S)
            assert answer is not None and answer.status == "success", answer
    # Nothing more is sent: only a tick, written by the processor's own principal, expires it.
    deadline_s = time.monotonic() + CATCH_UP_TIMEOUT_S
    while not (
        expiries := [
            event
            for _, event in _events(secured)
            if isinstance(event, HoldExpired) and event.hold_id == hold.transaction_id
        ]
    ):
        assert time.monotonic() < deadline_s, f"no hold_expired within {CATCH_UP_TIMEOUT_S} s:\n{processor.log_tail()}"
        time.sleep(0.5)
    assert expiries[0].command == "tick"
    assert processor.process is not None and processor.process.poll() is None, processor.log_tail()


@kafka
def test_readmodel_and_audit_principals_read_the_ledger(secured: Settings, processor: ProcessorProcess, tmp_path):
    account = f"carol-{uuid.uuid4().hex[:6]}"
    with WalletClient.connect(secured) as api:
        opened = api.request(
            _command(OpenAccount, transaction_id=_tx("open"), account_id=account, currency="USD"), REQUEST_WAIT_S
        )
        deposited = api.request(
            _command(
                Deposit,
                transaction_id=_tx("dep"),
                account_id=account,
                amount="50.00",
                currency="USD",
                actor="bank",
                role="bank",
            ),
            REQUEST_WAIT_S,
        )
    assert opened is not None and opened.status == "success", opened
    assert deposited is not None and deposited.status == "success", deposited
    # The read model as its own principal: consume events and outcomes, measure its lag.
    with ReadModelStore(f"sqlite:///{tmp_path / 'readmodel.db'}") as store:
        store.create_schema()
        consumer = ReadModelConsumer(store, secured, batch_wait_ms=50)
        consumer.start()
        lag_admin = admin_client(secured.bootstrap, role="readmodel")
        deadline_s = time.monotonic() + CATCH_UP_TIMEOUT_S
        try:
            while consumer.step() or sum(item.lag for item in read_lag(lag_admin, secured, store.offsets())):
                assert time.monotonic() < deadline_s, "the read model did not catch up"
        finally:
            consumer.close()
        row = store.account(account)
        assert row is not None and row.balance_minor == 5000, row
    # The audit as its own principal replays all four topics.
    report = run_audit(secured, workers=1)
    assert report.passed, report.render_text()
