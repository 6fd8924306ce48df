"""docker-compose.yml cannot run here (no Docker engine), so it is checked against the project instead.

Every service's command must be a real `wallet` subcommand with options the CLI accepts, the
Kafka image must be the version the local broker pins, and the wiring (bootstrap address,
database URL, health-gated start order) must agree between services.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from urllib.parse import urlsplit

import pytest
import yaml

from infra.settings import PROJECT_ROOT
from wallet.cli import build_parser
from wallet.localkafka import KAFKA_VERSION

COMPOSE_PATH = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE_PATH = PROJECT_ROOT / "Dockerfile"

EXPECTED_SERVICES = {"kafka", "postgres", "topics", "processor", "api", "readmodel"}
WALLET_SERVICES = {"topics", "processor", "api", "readmodel"}


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text())["services"]


def _registered_subcommands(parser: argparse.ArgumentParser) -> set[str]:
    [subcommands] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return set(subcommands.choices)


def test_compose_has_exactly_the_expected_services(services: dict) -> None:
    assert set(services) == EXPECTED_SERVICES


def test_kafka_is_the_official_image_of_the_pinned_version_in_kraft_mode(services: dict) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    environment = kafka["environment"]
    assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert environment["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == 1
    assert environment["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert "healthcheck" in kafka
    assert "29092:29092" in kafka["ports"]


def test_postgres_is_version_16_with_a_health_check(services: dict) -> None:
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_api_publishes_port_8080(services: dict) -> None:
    assert services["api"]["ports"] == ["8080:8080"]
    command = services["api"]["command"]
    assert command[command.index("--port") + 1] == "8080"


def test_wallet_services_use_the_broker_that_kafka_advertises(services: dict) -> None:
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    plaintext = re.search(r"PLAINTEXT://([^,]+)", advertised)
    assert plaintext is not None, advertised
    internal_address = plaintext.group(1)
    for name in WALLET_SERVICES:
        service = services[name]
        assert service["build"] == ".", name
        assert service["environment"]["WALLET_KAFKA_BOOTSTRAP"] == internal_address, name
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy", name


def test_pipeline_services_start_after_the_topics_exist(services: dict) -> None:
    for name in WALLET_SERVICES - {"topics"}:
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully", name


def test_readmodel_database_url_matches_the_postgres_service(services: dict) -> None:
    command = services["readmodel"]["command"]
    url = urlsplit(command[command.index("--db") + 1])
    environment = services["postgres"]["environment"]
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert (url.username, url.password, url.path.lstrip("/")) == (
        environment["POSTGRES_USER"],
        environment["POSTGRES_PASSWORD"],
        environment["POSTGRES_DB"],
    )
    assert services["readmodel"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(WALLET_SERVICES))
def test_service_command_is_a_real_wallet_subcommand(services: dict, name: str) -> None:
    command = services[name]["command"]
    assert command[0] == "wallet"
    subcommand = command[1]
    parser = build_parser()
    registered = _registered_subcommands(parser)
    assert subcommand in registered, (
        f"`{' '.join(command)}`: `{subcommand}` is not a wallet subcommand (registered: {sorted(registered)})"
    )
    try:
        parser.parse_args(command[1:])
    except SystemExit as error:
        pytest.fail(f"`{' '.join(command)}` is rejected by the CLI (exit {error.code})")


def test_dockerfile_installs_every_package_of_the_project() -> None:
    dockerfile = DOCKERFILE_PATH.read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert re.search(r"pip install .*\.\s", dockerfile)
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) ", dockerfile, flags=re.MULTILINE))
    assert {pattern.rstrip("*") for pattern in includes} <= copied
