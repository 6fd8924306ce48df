"""The one process supervisor: start, stop with SIGTERM then SIGKILL after a bound, report how it ended."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from infra.supervision import Supervised, is_running, log_tail, read_proc_stat, stop_together

# A child that says it is ready, then sleeps; with IGNORE_TERM it shrugs SIGTERM off.
SLEEPER = "import signal, sys, time\n{ignore}print('ready', flush=True)\ntime.sleep(60)\n"
IGNORE_TERM = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
READY_TIMEOUT_S = 10


def _sleeper(tmp_path: Path, name: str, ignore_term: bool = False, own_session: bool = False) -> Supervised:
    log_path = tmp_path / f"{name}.log"
    child = Supervised.start(
        name,
        [sys.executable, "-c", SLEEPER.format(ignore=IGNORE_TERM if ignore_term else "")],
        log_path=log_path,
        own_session=own_session,
    )
    deadline_s = time.monotonic() + READY_TIMEOUT_S
    while "ready" not in log_tail(log_path, 1):  # its signal handling is in place once it has said so
        assert time.monotonic() < deadline_s and child.poll() is None, log_tail(log_path, 20)
        time.sleep(0.02)
    return child


def test_a_child_that_honours_sigterm_stops_gracefully_and_reports_its_exit(tmp_path: Path) -> None:
    child = _sleeper(tmp_path, "polite")
    stat = read_proc_stat(child.pid)
    assert child.is_running() and stat is not None and child.start_ticks == stat.start_ticks
    assert child.stop(timeout_s=10) is True
    assert child.poll() == -signal.SIGTERM and not child.is_running()


def test_a_child_that_ignores_sigterm_is_killed_after_the_bound(tmp_path: Path) -> None:
    child = _sleeper(tmp_path, "stubborn", ignore_term=True)
    started_s = time.monotonic()
    assert child.stop(timeout_s=0.5) is False
    assert time.monotonic() - started_s >= 0.5
    assert child.poll() == -signal.SIGKILL


def test_an_attached_process_is_stopped_by_pid_and_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    child = _sleeper(tmp_path, "elsewhere", own_session=True)
    assert child.start_ticks is not None
    impostor = Supervised.attach("impostor", child.pid, child.start_ticks + 1, leads_group=True)
    assert not impostor.is_running()
    assert stop_together([impostor], timeout_s=0.5) == [True]  # nothing was signalled...
    assert child.is_running()  # ...so the real one still runs
    attached = Supervised.attach("elsewhere", child.pid, child.start_ticks, leads_group=True)
    assert stop_together([attached], timeout_s=10) == [True]
    # (The attached handle reaped the child, so the Popen handle no longer learns its exit code.)
    assert not is_running(child.pid, child.start_ticks) and not child.is_running()
