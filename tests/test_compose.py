"""docker-compose.yml cannot run here (no Docker engine), so it is checked against the project instead.

Every service's command must be a real `wallet` subcommand with options the CLI accepts, the
Kafka image must be the version the local broker pins, and the wiring (bootstrap address,
database URL, health-gated start order) must agree between services.
"""

from __future__ import annotations

import argparse
import json
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

EXPECTED_SERVICES = {"kafka", "postgres", "topics", "processor", "api", "readmodel", "prometheus", "grafana"}
WALLET_SERVICES = {"topics", "processor", "api", "readmodel"}
MONITORED_SERVICES = {"processor", "api", "readmodel"}
MONITORING_DIR = PROJECT_ROOT / "monitoring"


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
    assert re.search(r'pip install .*"\.\[native\]"\s', dockerfile)  # the project, with mypyc for its core
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) ", dockerfile, flags=re.MULTILINE))
    assert {pattern.rstrip("*") for pattern in includes} <= copied


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_prometheus_scrapes_every_service_on_the_port_it_serves_metrics_on(services: dict) -> None:
    config = yaml.safe_load((MONITORING_DIR / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: (sd["names"], sd["port"]) for job in config["scrape_configs"] for sd in job["dns_sd_configs"]
    }
    assert set(targets) == MONITORED_SERVICES
    for name in MONITORED_SERVICES:
        command = services[name]["command"]
        # Reached from the prometheus container: the port must listen beyond the container's loopback.
        assert _option(command, "--metrics-host") == "0.0.0.0", name
        assert targets[name] == ([name], int(_option(command, "--metrics-port"))), name
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in services["prometheus"]["volumes"]}
    assert mounted["/etc/prometheus/prometheus.yml"] == "./monitoring/prometheus.yml"
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert mounted["/etc/prometheus/alerts.yml"] == "./monitoring/alerts.yml"


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard(services: dict) -> None:
    grafana = services["grafana"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in grafana["volumes"]}
    assert mounted["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    provider = yaml.safe_load((MONITORING_DIR / "grafana/provisioning/dashboards/streamwallet.yml").read_text())
    dashboards_in_container = provider["providers"][0]["options"]["path"]
    assert mounted[dashboards_in_container] == "./monitoring/grafana/dashboards"
    datasource = yaml.safe_load((MONITORING_DIR / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((MONITORING_DIR / "grafana/dashboards/streamwallet.json").read_text())
    used = {panel["datasource"]["uid"] for panel in dashboard["panels"] if panel["type"] != "row"} | {
        target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    }
    assert used == {source["uid"]}
    # The wallet's secrets stay with the wallet's services.
    assert "env_file" not in grafana and "env_file" not in services["prometheus"]
