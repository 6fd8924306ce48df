"""`wallet health`: the stack's liveness and readiness checked from the command line, the same checks
as the API's `/healthz` and `/readyz` and the processes' metrics endpoints, for an operator's shell or a
supervisor's probe.

Every check is bounded (`CHECK_TIMEOUT_S`); the exit code is 0 when every check passed, 1 when one
failed or nothing runs.

| check | passes when |
|---|---|
| `<process> running` | every process `wallet up` started is alive |
| `kafka answers` | a broker answers a metadata request |
| `processors own every partition` | the processors' group is stable and owns every partition of `wallet.commands` |
| `<process> metrics` | its metrics endpoint answers (the detail says its lag, or where it restores) |
| `api live` | `GET /healthz` answers 200 |
| `api ready` | `GET /readyz` answers 200: the outcome consumer is positioned and Kafka answers |
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from confluent_kafka import KafkaException

from infra.admin import admin_client
from infra.metrics import ScrapeError, scrape
from infra.settings import Settings, settings_from_args
from wallet.stack import (
    ManagedProcess,
    StackState,
    get_json,
    is_alive,
    processors_not_ready,
    reporting_errors,
    state_path,
)

CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    subject: str  # a process name, "kafka" or "processors"
    check: str
    ok: bool
    detail: str


def register(subparsers: argparse._SubParsersAction) -> None:
    health = subparsers.add_parser(
        "health", help="check that the running stack is live and ready (exit 0 only when every check passes)"
    )
    health.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    health.set_defaults(handler=reporting_errors(_health))


def _metrics_check(process: ManagedProcess) -> Check:
    assert process.metrics_port is not None
    try:
        found = scrape(f"http://127.0.0.1:{process.metrics_port}/metrics", CHECK_TIMEOUT_S)
    except ScrapeError as error:
        return Check(process.name, "metrics", False, str(error))
    if process.role == "processor":
        restoring = found.total("wallet_processor_restore_remaining_offsets")
        detail = f"{found.total('wallet_processor_partitions_owned'):.0f} partitions, lag " + (
            f"{found.total('wallet_processor_consumer_lag_records'):.0f}"
        )
        if restoring:
            detail += f", restoring ({restoring:.0f} offsets to read)"
    elif process.role == "readmodel":
        detail = f"lag {found.total('wallet_readmodel_lag_records'):.0f}"
    else:
        detail = f"{found.total('wallet_api_request_duration_seconds_count'):.0f} requests served"
    return Check(process.name, "metrics", True, detail)


def _http_check(url: str, name: str) -> Check:
    try:
        status, body = get_json(url, CHECK_TIMEOUT_S)
    except (OSError, ValueError) as error:
        return Check("api", name, False, f"{url}: {error or type(error).__name__}")
    detail = body.get("message") or json.dumps(body, sort_keys=True)
    return Check("api", name, status == 200, f"HTTP {status}: {detail}"[:300])


def check_stack(settings: Settings) -> list[Check]:
    state = StackState.load(state_path(settings))
    if state is None:
        return []
    checks = [
        Check(process.name, "running", is_alive(process), f"pid {process.pid}")
        for process in state.processes
        if process.started_by_up
    ]
    admin = admin_client(settings.bootstrap)
    try:
        metadata = admin.list_topics(timeout=CHECK_TIMEOUT_S)
        checks.append(Check("kafka", "answers", True, f"{len(metadata.brokers)} brokers at {settings.bootstrap}"))
    except KafkaException as error:
        checks.append(Check("kafka", "answers", False, f"{settings.bootstrap}: {error}"))
    if any(process.role == "processor" for process in state.processes):
        waiting = processors_not_ready(admin, settings)
        checks.append(Check("processors", "own every partition", waiting is None, waiting or "stable"))
    alive = [process for process in state.processes if process.metrics_port is not None and is_alive(process)]
    checks += [_metrics_check(process) for process in alive]
    if any(process.role == "api" for process in state.processes):
        checks.append(_http_check(f"{state.api_url}/healthz", "live"))
        checks.append(_http_check(f"{state.api_url}/readyz", "ready"))
    return checks


def _health(args: argparse.Namespace) -> int:
    checks = check_stack(settings_from_args(args))
    if args.json:
        print(json.dumps([asdict(check) for check in checks]))
    elif not checks:
        print("nothing runs (start the stack with `wallet up`)")
    else:
        for check in checks:
            print(f"{'ok' if check.ok else 'FAIL':4}  {check.subject:13} {check.check:22} {check.detail}")
    return 0 if checks and all(check.ok for check in checks) else 1
