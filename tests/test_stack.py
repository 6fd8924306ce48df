"""`wallet up/ps/down/demo` as a user runs them: real subprocesses against the real broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from infra.ports import free_loopback_ports
from infra.settings import Settings
from infra.supervision import read_proc_stat, start_ticks_of
from streams.core.state import ACTIVE
from tests.support.kafka_io import wait_for
from wallet.stack import READMODELS_MAX, ManagedProcess, StackError, is_alive, state_path, up

pytest_plugins = ["tests.readmodel_fixtures"]

COMMAND_TIMEOUT_S = 180
HTTP_TIMEOUT_S = 30
READ_MODEL_CATCH_UP_TIMEOUT_S = 60
READ_MODEL_SHARDS = 2
API_PORT_UNUSED = 1  # never bound: the refusal comes first


def _wallet(env: dict, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wallet.cli", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


@pytest.fixture
def stack_env(make_settings, tmp_path: Path) -> dict:
    settings = make_settings(4)
    return {
        **os.environ,
        "WALLET_KAFKA_BOOTSTRAP": settings.bootstrap,
        "WALLET_TOPIC_PREFIX": settings.topic_prefix,
        "WALLET_PARTITIONS": "4",
        "WALLET_RUN_DIR": str(tmp_path / "run"),
    }


def _ps(env: dict) -> list[dict]:
    listed = _wallet(env, "ps", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, Z, ...), None when there is no such process."""
    stat = read_proc_stat(pid)
    return stat.state if stat is not None else None


def _pid_exists(pid: int) -> bool:
    return _process_state(pid) not in (None, "Z")


def test_up_starts_a_working_stack_that_outlives_it_and_down_stops_exactly_that(stack_env: dict) -> None:
    (port,) = free_loopback_ports(1)
    started = _wallet(stack_env, "up", "--port", str(port))
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"http://127.0.0.1:{port}" in started.stdout
    try:
        running = _ps(stack_env)
        assert {process["role"] for process in running} == {"processor", "readmodel", "api"}
        assert [process["port"] for process in running if process["role"] == "api"] == [port]
        assert all(process["port"] is None for process in running if process["role"] != "api")
        for process in running:  # `wallet up` has exited; each runs on in its own session
            assert _pid_exists(process["pid"]) and os.getsid(process["pid"]) == process["pid"]

        again = _wallet(stack_env, "up", "--port", str(port))
        assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr
        assert _ps(stack_env) == running

        # An operator's bad day: the processor is SIGKILLed; `wallet up` starts it again, alike.
        (killed,) = [process["pid"] for process in running if process["role"] == "processor"]
        os.kill(killed, signal.SIGKILL)
        restarted = _wallet(stack_env, "up", "--port", str(port))
        assert restarted.returncode == 0 and "restarted processor-1" in restarted.stdout, restarted.stderr
        after = _ps(stack_env)
        ((new_pid, new_port),) = [(p["pid"], p["port"]) for p in after if p["role"] == "processor"]
        assert new_pid != killed and _pid_exists(new_pid) and new_port is None
        assert [p for p in after if p["role"] != "processor"] == [p for p in running if p["role"] != "processor"]
        running = after

        base = f"http://127.0.0.1:{port}"
        account = f"stack-{uuid.uuid4().hex[:8]}"
        request = {"account_id": account, "currency": "USD", "transaction_id": f"{account}-open"}
        assert "authentication is on" in started.stdout and "wallet auth token" in started.stdout
        assert httpx.post(f"{base}/v1/accounts", json=request, timeout=HTTP_TIMEOUT_S).status_code == 401
        minted = _wallet(stack_env, "auth", "token", "--sub", "stack-user", "--scope", "wallet:user")
        assert minted.returncode == 0, minted.stderr
        opened = httpx.post(
            f"{base}/v1/accounts",
            json=request,
            timeout=HTTP_TIMEOUT_S,
            headers={"Authorization": f"Bearer {minted.stdout.strip()}"},
        )
        assert opened.json()["status"] == "success", opened.text
    finally:
        stopped = _wallet(stack_env, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert all(not _pid_exists(process["pid"]) for process in running)
    assert _ps(stack_env) == []
    assert "nothing to stop" in _wallet(stack_env, "down").stdout


@pytest.fixture
def db_kind() -> str:
    return "postgresql"  # the read model's shards: SQLite has one writer


def test_up_runs_read_model_shards_into_postgresql_restarts_an_exited_one_and_down_stops_them(
    stack_env: dict, db_url: str
) -> None:
    (port,) = free_loopback_ports(1)
    shards = ["--readmodels", str(READ_MODEL_SHARDS), "--readmodel-db", db_url]
    started = _wallet(stack_env, "up", "--port", str(port), "--auth", "off", *shards)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        running = _ps(stack_env)
        readmodels = [process for process in running if process["role"] == "readmodel"]
        assert sorted(process["shard"] for process in readmodels) == ["0/2", "1/2"], running
        assert len({process["pid"] for process in readmodels}) == READ_MODEL_SHARDS

        killed = next(process for process in readmodels if process["shard"] == "1/2")
        os.kill(killed["pid"], signal.SIGKILL)
        restarted = _wallet(stack_env, "up", "--port", str(port), "--auth", "off", *shards)
        assert restarted.returncode == 0 and "restarted readmodel-1" in restarted.stdout, restarted.stderr
        after = [process for process in _ps(stack_env) if process["role"] == "readmodel"]
        assert sorted(process["shard"] for process in after) == ["0/2", "1/2"], after
        assert killed["pid"] not in {process["pid"] for process in after}
        running = _ps(stack_env)

        # Accounts on every partition: the API's query side reads what both shards wrote.
        base = f"http://127.0.0.1:{port}"
        accounts = [f"shards-{uuid.uuid4().hex[:8]}" for _ in range(8)]
        for account in accounts:
            request = {"account_id": account, "currency": "USD", "transaction_id": f"{account}-open"}
            opened = httpx.post(f"{base}/v1/accounts", json=request, timeout=HTTP_TIMEOUT_S)
            # Pending when the processor answers after the API's request wait (a loaded machine).
            assert opened.json()["status"] in ("success", "pending"), opened.text

        def readable() -> bool:
            reads = [httpx.get(f"{base}/v1/accounts/{account}", timeout=HTTP_TIMEOUT_S) for account in accounts]
            return all(read.status_code == 200 and read.json()["status"] == ACTIVE for read in reads)

        wait_for(readable, READ_MODEL_CATCH_UP_TIMEOUT_S, "every account in the API's query side")
        wait_for(
            lambda: httpx.get(f"{base}/v1/readmodel/lag", timeout=HTTP_TIMEOUT_S).json()["total_lag"] == 0,
            READ_MODEL_CATCH_UP_TIMEOUT_S,
            "the read-model shards to catch up on every partition",
        )
    finally:
        stopped = _wallet(stack_env, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert all(not _pid_exists(process["pid"]) for process in running)


def test_up_refuses_read_model_shards_on_sqlite_before_starting_anything(tmp_path: Path) -> None:
    settings = Settings().with_overrides(run_dir=tmp_path / "run")
    with pytest.raises(StackError, match="SQLite has one writer at a time"):
        up(settings, port=API_PORT_UNUSED, processors=1, readmodel=True, timeout_s=1, readmodels=2)
    assert not state_path(settings).exists()


def test_up_reads_the_read_models_database_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    settings = Settings().with_overrides(run_dir=tmp_path / "run")
    from_environment = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("WALLET_READMODEL_DB", from_environment)
    with pytest.raises(StackError, match=f"database {from_environment} is not PostgreSQL"):
        up(settings, port=API_PORT_UNUSED, processors=1, readmodel=True, timeout_s=1, readmodels=2)


@pytest.mark.parametrize("readmodels", [0, READMODELS_MAX + 1])
def test_up_refuses_a_read_model_count_out_of_bounds_before_starting_anything(tmp_path: Path, readmodels: int) -> None:
    settings = Settings().with_overrides(run_dir=tmp_path / "run")
    with pytest.raises(StackError, match=f"--readmodels must be within 1..{READMODELS_MAX}, got {readmodels}"):
        up(settings, port=API_PORT_UNUSED, processors=1, readmodel=True, timeout_s=1, readmodels=readmodels)
    assert not state_path(settings).exists()


def test_up_on_a_taken_port_starts_nothing(stack_env: dict) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        refused = _wallet(stack_env, "up", "--port", str(taken.getsockname()[1]))
    assert refused.returncode == 1
    assert "is taken" in refused.stderr
    assert _ps(stack_env) == []
    assert not state_path(Settings().with_overrides(run_dir=Path(stack_env["WALLET_RUN_DIR"]))).exists()


def test_the_demo_runs_a_workload_prints_a_summary_and_stops_what_it_started(stack_env: dict) -> None:
    (port,) = free_loopback_ports(1)
    demo = _wallet(stack_env, "demo", "--port", str(port), "--accounts", "20", "--transfers", "400")
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "published 400 transfers" in demo.stdout
    assert "outcomes: 400 of 400" in demo.stdout
    assert ": conserved" in demo.stdout
    # The holds: one captured in two parts, one whole, one voided, one expired, all through the HTTP API.
    assert (
        "holds: 4 placed, 2 captured (1 in two partial captures), 1 voided, 1 expired at the log's time: as planned"
        in demo.stdout
    ), demo.stdout[-3000:]
    assert "held 0.00, available 60.00" in demo.stdout  # 100.00 funded, 15.00 + 25.00 captured
    assert "stopped api" in demo.stdout
    assert _ps(stack_env) == []


def test_liveness_tells_our_process_from_another_with_the_same_pid() -> None:
    pid = os.getpid()
    ticks = start_ticks_of(pid)
    assert ticks is not None
    ours = ManagedProcess("api", "api", pid, None, None, ticks)
    assert is_alive(ours)
    reused = ManagedProcess("api", "api", pid, None, None, ticks + 1)
    assert not is_alive(reused)


def test_an_exited_child_is_not_alive_even_before_it_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = start_ticks_of(child.pid)
    deadline_s = time.monotonic() + 10
    while _process_state(child.pid) != "Z":
        assert time.monotonic() < deadline_s, "the child did not exit"
        time.sleep(0.01)
    assert not is_alive(ManagedProcess("processor", "processor-1", child.pid, None, None, ticks))
