"""A running stack observed as an operator would (`wallet up`, a real broker): every process serves its
metrics on the port `wallet ps` lists, the metrics count a known workload exactly, `wallet top` and
`wallet health` read them, the dashboard and the alerts name only metrics the processes export, and a
real Prometheus server scrapes the stack and answers PromQL for the commit rate and the API's p99.

Prometheus is Debian's `prometheus` package: without its binary that test fails under CI (CI=true) and
is skipped elsewhere, as the PostgreSQL tests do.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from confluent_kafka import Producer
from rich.console import Console

from infra.kafka_clients import kafka_security
from infra.metrics import Scrape, parse_exposition, scrape
from infra.ports import free_loopback_ports
from infra.settings import PROJECT_ROOT, Settings
from infra.supervision import Supervised, log_tail
from schemas.outcomes import Reason
from tests.support.kafka_io import wait_for
from tests.test_stack import _ps, _wallet
from wallet.stack import ManagedProcess
from wallet.top import Reading, render

PROCESSORS = 2
HTTP_TIMEOUT_S = 60
WAIT_MS = 30_000  # the API's longest wait for an outcome: a refund takes three hops on a loaded machine
SETTLE_TIMEOUT_S = 60
PROMETHEUS_START_TIMEOUT_S = 60
PROMQL_TIMEOUT_S = 90
TOP_TIMEOUT_S = 60
MONITORING_DIR = PROJECT_ROOT / "monitoring"
DASHBOARD_PATH = MONITORING_DIR / "grafana/dashboards/streamwallet.json"
ALERTS_PATH = MONITORING_DIR / "alerts.yml"

ACCOUNTS = ("obs-a", "obs-b", "obs-c", "obs-d")
TRANSFERS_OK = 5  # obs-a -> obs-b, 10.00 each


@dataclass(frozen=True)
class Stack:
    env: dict
    settings: Settings
    api_url: str
    headers: dict[str, str]
    processes: list[dict]
    up_output: str  # what `wallet up` printed

    def metrics_urls(self, role: str | None = None) -> list[str]:
        return [
            f"http://127.0.0.1:{p['metrics_port']}/metrics"
            for p in self.processes
            if p["metrics_port"] is not None and role in (None, p["role"])
        ]

    def scrapes(self, role: str) -> list[Scrape]:
        return [scrape(url) for url in self.metrics_urls(role)]

    def total(self, role: str, name: str, **labels: str) -> float:
        return sum(found.total(name, **labels) for found in self.scrapes(role))

    def command(self, path: str, body: dict) -> dict:
        reply = httpx.post(
            f"{self.api_url}{path}",
            params={"wait_ms": WAIT_MS},
            json=body,
            headers=self.headers,
            timeout=HTTP_TIMEOUT_S,
        )
        assert reply.status_code == 200, f"{path}: {reply.status_code} {reply.text}"
        return reply.json()

    def transfer(self, from_account: str, to_account: str, amount: str, transaction_id: str) -> dict:
        return self.command(
            "/v1/wallet/balance_transfer",
            {
                "from_account": from_account,
                "to_account": to_account,
                "amount": amount,
                "currency": "USD",
                "transaction_id": transaction_id,
            },
        )


def _run_workload(stack: Stack) -> None:
    """4 accounts opened and funded, 5 transfers credited, one refused for funds, one refunded (missing
    receiver), one request without a token, one record no processor can decode."""
    for account in ACCOUNTS:
        opened = stack.command(
            "/v1/accounts", {"account_id": account, "currency": "USD", "transaction_id": f"{account}-o"}
        )
        assert opened["status"] == "success", opened
        funded = stack.command(
            f"/v1/accounts/{account}/deposit", {"amount": "100.00", "currency": "USD", "transaction_id": f"{account}-d"}
        )
        assert funded["status"] == "success", funded
    for number in range(TRANSFERS_OK):
        assert stack.transfer("obs-a", "obs-b", "10.00", f"ok-{number}")["status"] == "success"
    assert stack.transfer("obs-c", "obs-d", "1000.00", "too-much")["reason"] == Reason.INSUFFICIENT_FUNDS
    assert stack.transfer("obs-a", "obs-nobody", "1.00", "to-nobody")["reason"] == Reason.ACCOUNT_NOT_FOUND
    assert httpx.post(f"{stack.api_url}/v1/accounts", json={}, timeout=HTTP_TIMEOUT_S).status_code == 401
    producer = Producer({**kafka_security("admin"), "bootstrap.servers": stack.settings.bootstrap})
    producer.produce(stack.settings.commands_topic, b"not a command", key=b"obs-a")
    assert producer.flush(30) == 0


@pytest.fixture(scope="module")
def stack(make_settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = make_settings(4)
    env = {
        **os.environ,
        "WALLET_KAFKA_BOOTSTRAP": settings.bootstrap,
        "WALLET_TOPIC_PREFIX": settings.topic_prefix,
        "WALLET_PARTITIONS": "4",
        "WALLET_RUN_DIR": str(tmp_path_factory.mktemp("observed") / "run"),
    }
    (port,) = free_loopback_ports(1)
    started = _wallet(env, "up", "--port", str(port), "--processors", str(PROCESSORS))
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        minted = _wallet(env, "auth", "token", "--sub", "observer", "--scope", "wallet:user wallet:bank")
        assert minted.returncode == 0, minted.stderr
        observed = Stack(
            env,
            settings,
            f"http://127.0.0.1:{port}",
            {"Authorization": f"Bearer {minted.stdout.strip()}"},
            _ps(env),
            started.stdout,
        )
        _run_workload(observed)
        yield observed
    finally:
        _wallet(env, "down")


def test_ps_lists_a_metrics_port_for_every_service_and_each_serves_its_own_metrics(stack: Stack) -> None:
    ports: dict[str, list[int | None]] = {}
    for process in stack.processes:
        ports.setdefault(process["role"], []).append(process["metrics_port"])
    assert len(ports["processor"]) == PROCESSORS and len(ports["readmodel"]) == len(ports["api"]) == 1
    served = ports["processor"] + ports["readmodel"] + ports["api"]
    assert all(isinstance(port, int) for port in served) and len(set(served)) == len(served)
    assert set(ports.get("kafka", [None])) == {None}  # the broker's figures are Kafka's own (JMX), not ours
    for url in stack.metrics_urls():  # `wallet up` says where to curl
        assert url in stack.up_output, stack.up_output
    for role, prefix in (
        ("processor", "wallet_processor_"),
        ("readmodel", "wallet_readmodel_"),
        ("api", "wallet_api_"),
    ):
        for found in stack.scrapes(role):
            ours = {name for name in found.names() if name.startswith("wallet_")}
            assert ours and all(name.startswith(prefix) for name in ours), (role, sorted(ours))


def test_the_metrics_count_the_workload_exactly(stack: Stack) -> None:
    expected_decisions = {
        ("open_account", "success", ""): 4,
        ("deposit", "success", ""): 4,
        ("transfer", "continues", ""): TRANSFERS_OK + 1,  # debited; the answer comes from the receiver's side
        ("transfer", "failure", Reason.INSUFFICIENT_FUNDS): 1,
        ("credit_leg", "success", ""): TRANSFERS_OK,
        ("credit_leg", "continues", ""): 1,  # no such receiver: a refund leg goes back
        ("refund_leg", "failure", Reason.ACCOUNT_NOT_FOUND): 1,
    }

    def decisions() -> dict:
        found: dict = {}
        for reading in stack.scrapes("processor"):
            for labels, value in reading.matching("wallet_processor_commands_decided_total"):
                key = (labels["command"], labels["status"], labels["reason"])
                found[key] = found.get(key, 0) + value
        return found

    def settled() -> bool:
        return (
            decisions() == expected_decisions
            and stack.total("processor", "wallet_processor_dead_letters_total") == 1
            and stack.total("processor", "wallet_processor_debits_open", currency="USD") == TRANSFERS_OK
            and stack.total("readmodel", "wallet_readmodel_lag_records") == 0
        )

    wait_for(settled, SETTLE_TIMEOUT_S, "the processors' and the read model's metrics to count the workload")
    # Every credited transfer's debit stays open on the sender's side; the refunded one is closed.
    assert stack.total("processor", "wallet_processor_debits_open_minor", currency="USD") == TRANSFERS_OK * 1000
    assert stack.total("processor", "wallet_processor_legs_produced_total") == TRANSFERS_OK + 2
    assert stack.total("processor", "wallet_processor_outcomes_produced_total") == 4 + 4 + 1 + TRANSFERS_OK + 1
    assert stack.total("processor", "wallet_processor_partitions_owned") == 4
    # The read model applied exactly what the processors wrote, and holds nothing in flight.
    events = stack.total("processor", "wallet_processor_events_produced_total")
    assert stack.total("readmodel", "wallet_readmodel_records_applied_total", kind="events") == events
    assert stack.total("readmodel", "wallet_readmodel_transfers_in_flight", currency="USD") == 0
    assert stack.total("readmodel", "wallet_readmodel_money_in_flight_minor", currency="USD") == 0
    (api,) = stack.scrapes("api")
    assert api.by_label("wallet_api_command_answers_total", "status", command="transfer") == {
        "success": TRANSFERS_OK,
        "failure": 2,
    }
    assert api.total("wallet_api_command_answers_total", command="open_account", status="success") == 4
    assert api.total("wallet_api_refusals_total", status="401") == 1
    transfers = api.total("wallet_api_request_duration_seconds_count", route="/v1/wallet/balance_transfer")
    assert transfers == TRANSFERS_OK + 2
    assert api.total("wallet_api_outcome_consumer_ready") == 1


def test_wallet_top_once_shows_every_process_and_the_money_without_a_terminal(stack: Stack) -> None:
    shown = _wallet(stack.env, "top", "--once", "--interval-s", "0.5")
    assert shown.returncode == 0, shown.stderr
    frame = shown.stdout
    for name in ("processor-1", "processor-2", "readmodel", "api"):
        assert re.search(rf"│ {name}\s+│", frame), frame
    assert "dead letters since the processors started: 1" in frame
    # The read model's money in flight (none) beside the debits the processors hold open (5 x 10.00).
    assert re.search(r"│ USD\s+│\s+0 │\s+0\.00 │\s+5 │\s+50\.00 │", frame), frame
    assert "no metrics from" not in frame


def test_wallet_top_refreshes_in_a_terminal_until_q_is_pressed(stack: Stack) -> None:
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    # A terminal of its own: stdin, stdout and stderr on a pseudo-terminal, as in an operator's shell.
    process = subprocess.Popen(
        [sys.executable, "-m", "wallet.cli", "top"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        # COLUMNS and LINES from the caller's environment would override the terminal's own size.
        env={**{k: v for k, v in stack.env.items() if k not in ("COLUMNS", "LINES")}, "TERM": "xterm-256color"},
        start_new_session=True,
    )
    os.close(terminal)
    screen = b""
    try:
        deadline_s = time.monotonic() + TOP_TIMEOUT_S
        # Two frames drawn (it refreshes by itself), and the second processor's row in one of them:
        # on a loaded machine the first frames may come before every process answered a scrape.
        while screen.count(b"processors") < 2 or b"processor-2" not in screen:
            assert process.poll() is None, f"wallet top exited:\n{screen.decode(errors='replace')}"
            assert time.monotonic() < deadline_s, (
                f"wallet top drew no second frame with both processors:\n{screen.decode(errors='replace')}"
            )
            if select.select([controller], [], [], 1)[0]:
                screen += os.read(controller, 65536)
        os.write(controller, b"q")
        assert process.wait(10) == 0
        while select.select([controller], [], [], 0.5)[0]:  # the rest of the last frame
            try:
                screen += os.read(controller, 65536)
            except OSError:  # EIO: every writer of the terminal has gone
                break
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(controller)
    assert b"processor-2" in screen and b"money in flight" in screen


def test_wallet_top_never_cuts_a_process_name_short_in_a_narrow_terminal() -> None:
    scrape_text = "wallet_processor_partitions_owned 4\nwallet_readmodel_lag_records 0\n"
    readings = {
        name: Reading(ManagedProcess(role, name, 100 + i, None, None, None), parse_exposition(scrape_text, 0.0), None)
        for i, (role, name) in enumerate(
            [("processor", "processor-1"), ("processor", "processor-2"), ("readmodel", "readmodel"), ("api", "api")]
        )
    }
    console = Console(width=60, record=True, color_system=None)
    console.print(render({}, readings, stack_empty=False))
    frame = console.export_text()
    assert "processor-1" in frame and "processor-2" in frame and "readmodel" in frame, frame


def test_wallet_health_passes_on_the_stack_and_names_what_fails_when_the_api_hangs(stack: Stack) -> None:
    healthy = _wallet(stack.env, "health")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "FAIL" not in healthy.stdout and re.search(r"ok\s+api\s+ready", healthy.stdout), healthy.stdout
    (api_pid,) = [p["pid"] for p in stack.processes if p["role"] == "api"]
    os.kill(api_pid, signal.SIGSTOP)
    try:
        hung = _wallet(stack.env, "health", "--json")
    finally:
        os.kill(api_pid, signal.SIGCONT)
    assert hung.returncode == 1, hung.stdout + hung.stderr
    failed = {(check["subject"], check["check"]) for check in json.loads(hung.stdout) if not check["ok"]}
    assert failed == {("api", "metrics"), ("api", "live"), ("api", "ready")}, hung.stdout


# -- the dashboard, the alerts and a real Prometheus -----------------------------------------------

_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool", "inf"}
)


def promql_metric_names(expression: str) -> set[str]:
    """The metric names an expression reads: what is left once strings, label matchers, ranges,
    groupings, functions, keywords and numbers are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expression)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        following = text[match.end() :].lstrip()
        if following.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(word)
    return names


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS_PATH.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_promql_metric_names_are_the_series_an_expression_reads() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (le, route) (rate(wallet_api_request_duration_seconds_bucket{route!~"/x"}'
        '[5m]))) > 0.5 and on() sum(up{job="api"}) == 0'
    )
    assert promql_metric_names(expression) == {"wallet_api_request_duration_seconds_bucket", "up"}


def test_the_dashboard_and_the_alerts_name_only_metrics_the_processes_export(stack: Stack) -> None:
    exported = {"up"}  # added by Prometheus to every target it scrapes
    for url in stack.metrics_urls():
        exported |= scrape(url).names()
    expressions = _dashboard_expressions() + _alert_expressions()
    assert len(expressions) >= 20
    named = set().union(*(promql_metric_names(expression) for expression in expressions))
    assert named - exported == set(), f"the dashboard or the alerts read metrics nobody exports: {named - exported}"
    # Every figure `wallet top` shows is on the dashboard too.
    for figure in (
        "wallet_processor_commands_decided_total",
        "wallet_processor_transaction_commit_duration_seconds_bucket",
        "wallet_processor_consumer_lag_records",
        "wallet_processor_dead_letters_total",
        "wallet_readmodel_money_in_flight_minor",
        "wallet_readmodel_lag_records",
        "wallet_api_request_duration_seconds_bucket",
    ):
        assert figure in named, figure


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "no `prometheus` binary: install Debian's `prometheus` package (.ci/run does)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _promql(base_url: str, query: str) -> list[dict]:
    reply = httpx.get(f"{base_url}/api/v1/query", params={"query": query}, timeout=HTTP_TIMEOUT_S)
    assert reply.status_code == 200, f"{query}: {reply.text}"
    body = reply.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(result: list[dict]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_a_prometheus_server_scrapes_the_stack_and_answers_the_commit_rate_and_the_api_p99(
    stack: Stack, tmp_path: Path
) -> None:
    binary = _prometheus_binary()
    (port,) = free_loopback_ports(1)
    targets: dict[str, list[str]] = {}
    for process in stack.processes:
        if process["metrics_port"] is not None:
            targets.setdefault(process["role"], []).append(f"127.0.0.1:{process['metrics_port']}")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS_PATH)],
        "scrape_configs": [
            {"job_name": role, "static_configs": [{"targets": addresses}]} for role, addresses in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "prometheus.log"
    server = Supervised.start(
        "prometheus",
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log_path=log_path,
        stop_with_parent=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            assert server.is_running(), f"prometheus exited:\n{log_tail(log_path, 20)}"
            try:
                return httpx.get(f"{base_url}/-/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, PROMETHEUS_START_TIMEOUT_S, "prometheus to answer", interval_s=0.2)
        wait_for(lambda: len(_promql(base_url, "up == 1")) == PROCESSORS + 2, 30, "every target to be up")
        assert {series["metric"]["job"] for series in _promql(base_url, "up")} == {"processor", "readmodel", "api"}
        # Traffic while Prometheus watches: its rates need two scrapes with commits between them.
        started_s, sent = time.monotonic(), 0
        while time.monotonic() - started_s < 6:
            assert stack.transfer("obs-b", "obs-a", "0.01", f"watched-{sent}")["status"] == "success"
            sent += 1
        commit_rate = "sum(rate(wallet_processor_transaction_commit_duration_seconds_count[30s]))"
        p99 = (
            "histogram_quantile(0.99, sum by (le) (rate("
            'wallet_api_request_duration_seconds_bucket{route="/v1/wallet/balance_transfer"}[30s])))'
        )
        debits = 'sum(wallet_processor_commands_decided_total{command="transfer", status="continues"})'

        def figures() -> tuple[float, float] | None:
            rate, latency = _value(_promql(base_url, commit_rate)), _value(_promql(base_url, p99))
            counted = _value(_promql(base_url, debits))
            if rate and latency and counted == TRANSFERS_OK + 1 + sent:
                return rate, latency
            return None

        rate, latency = wait_for(figures, PROMQL_TIMEOUT_S, "PromQL to see the watched transfers", interval_s=1)
        assert 0 < rate < 1000, rate  # commits/s of two processors doing a few transfers a second
        assert 0 < latency <= 30, latency  # the p99 of balance_transfer round trips, in seconds

        def rules_evaluated() -> list[dict] | None:
            groups = httpx.get(f"{base_url}/api/v1/rules", timeout=HTTP_TIMEOUT_S).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if all(rule["health"] == "ok" for rule in rules) else None

        rules = wait_for(rules_evaluated, 30, "every alert rule to evaluate without an error")
        assert len(rules) == len(_alert_expressions())
    finally:
        server.stop(10)
