"""The one way to run a child process and to stop one: start it, record its PID and start time,
SIGTERM, SIGKILL after a bound, report how it ended.

A process is known by its PID *and* its start time (clock ticks since boot, field 22 of
`/proc/<pid>/stat`), so a PID the kernel has since given to another process is never mistaken
for, or signalled as, ours. `read_proc_stat` is the only reader of that file in the project.

Two kinds of handle, one class: `Supervised.start` runs a child of this process (its exit code
is known); `Supervised.attach` names a process another invocation started (`wallet down` stops
what an earlier `wallet up` started), whose exit code is not ours to read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# How long a SIGKILLed process may take to disappear before that is an error: the kernel acts
# at once, so this only covers a loaded machine.
KILL_WAIT_S = 10.0
POLL_INTERVAL_S = 0.05
DEAD_STATES = ("Z", "X")  # an unreaped zombie is dead for our purposes


class SupervisionError(RuntimeError):
    """A process outlived SIGKILL by `KILL_WAIT_S`; the message names it."""


@dataclass(frozen=True, slots=True)
class ProcStat:
    state: str  # R, S, D, T, Z, X, ...
    start_ticks: int


def read_proc_stat(pid: int) -> ProcStat | None:
    """The state and start time of process `pid`, None when there is no such process.

    Raises OSError (other than FileNotFoundError) where /proc itself is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return ProcStat(fields[0], int(fields[19]))


def start_ticks_of(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, None when it is gone or /proc is absent."""
    try:
        stat = read_proc_stat(pid)
    except OSError:
        return None
    return stat.start_ticks if stat is not None else None


def is_running(pid: int, start_ticks: int | None = None) -> bool:
    """Runs, is not a zombie, and (when `start_ticks` is known) is the process that started then."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is an exited child of ours
    try:
        stat = read_proc_stat(pid)
    except OSError:  # no /proc: the PID alone has to do
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    if stat is None or stat.state in DEAD_STATES:
        return False
    return start_ticks is None or stat.start_ticks == start_ticks


def log_tail(log_path: Path | str | None, line_count: int) -> str:
    """The last `line_count` lines of a child's log, for an error message that says why it failed."""
    if log_path is None or not Path(log_path).exists():
        return "(no log)"
    return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-line_count:])


class Supervised:
    """A process this one started (`start`) or knows by PID and start time (`attach`)."""

    def __init__(
        self,
        name: str,
        pid: int,
        start_ticks: int | None,
        *,
        leads_group: bool,
        popen: subprocess.Popen | None = None,
        started_s: float | None = None,
    ) -> None:
        self.name = name
        self.pid = pid
        self.start_ticks = start_ticks
        self.leads_group = leads_group  # signals go to its whole process group (helpers it spawned too)
        self._popen = popen
        self.started_s = time.monotonic() if started_s is None else started_s  # monotonic; attach: when attached

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        *,
        log_path: Path | None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        own_session: bool = False,
        stop_with_parent: bool = False,
    ) -> Supervised:
        """Run `argv` with stdin closed and stdout and stderr appended to `log_path`, or piped to
        `self.stdout` when `log_path` is None.

        `own_session`: a session (and process group) of its own, so it outlives this process and
        a Ctrl-C in this terminal does not reach it. `stop_with_parent`: the kernel sends it
        SIGTERM when this process dies, even by SIGKILL (through `setpriv`, where installed)."""
        setpriv = shutil.which("setpriv") if stop_with_parent else None
        prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []  # setpriv execs argv: the PID stays
        log: IO[bytes] | None = open(log_path, "ab") if log_path is not None else None
        started_s = time.monotonic()
        try:
            popen = subprocess.Popen(
                prefix + argv,
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log if log is not None else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=own_session,
            )
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor
        return cls(
            name, popen.pid, start_ticks_of(popen.pid), leads_group=own_session, popen=popen, started_s=started_s
        )

    @classmethod
    def attach(cls, name: str, pid: int, start_ticks: int | None, *, leads_group: bool) -> Supervised:
        return cls(name, pid, start_ticks, leads_group=leads_group)

    @property
    def stdout(self) -> IO[bytes]:
        assert self._popen is not None and self._popen.stdout is not None, f"{self.name}: output is not piped"
        return self._popen.stdout

    def is_running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None  # reaps it and keeps the exit code
        return is_running(self.pid, self.start_ticks)

    def poll(self) -> int | None:
        """The exit code once a child of ours has exited, None while it runs."""
        assert self._popen is not None, f"{self.name} (pid {self.pid}) is not our child: its exit code is unknown"
        return self._popen.poll()

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def wait(self, timeout_s: float) -> bool:
        """Until it has exited or `timeout_s` passed; returns whether it exited."""
        if self._popen is not None:
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline_s = time.monotonic() + timeout_s
        while self.is_running():
            if time.monotonic() >= deadline_s:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def send(self, signal_number: int) -> None:
        """Signal it, only while it is still the process we know (never a later one with its PID)."""
        if not self.is_running():
            return
        with contextlib.suppress(ProcessLookupError):
            if self.leads_group:
                os.killpg(self.pid, signal_number)
            else:
                os.kill(self.pid, signal_number)

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no goodbye; returns once it is gone."""
        self.send(signal.SIGKILL)
        if not self.wait(KILL_WAIT_S):
            raise SupervisionError(f"{self.name} (pid {self.pid}) survived SIGKILL for {KILL_WAIT_S:.0f} s")

    def stop(self, timeout_s: float) -> bool:
        """SIGTERM, then SIGKILL if it outlives `timeout_s`; returns whether it stopped by itself."""
        return stop_together([self], timeout_s) == [True]


def stop_together(processes: Iterable[Supervised], timeout_s: float) -> list[bool]:
    """SIGTERM every process, one shared `timeout_s` for all to exit, SIGKILL the survivors.
    Returns, per process, whether it stopped by itself (one that was not running counts as stopped)."""
    processes = list(processes)
    for process in processes:
        process.send(signal.SIGTERM)
    deadline_s = time.monotonic() + timeout_s
    graceful = [process.wait(max(0.0, deadline_s - time.monotonic())) for process in processes]
    for process, stopped in zip(processes, graceful, strict=True):
        if not stopped:
            process.kill()
    return graceful
