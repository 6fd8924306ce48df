"""Processor instances as real OS processes, so tests can SIGKILL them like an operator's bad day."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from infra.admin import admin_client
from infra.settings import Settings
from infra.supervision import Supervised, log_tail
from wallet.stack import processors_not_ready

STOP_TIMEOUT_S = 30
READY_TIMEOUT_S = 60


class ProcessorProcess:
    def __init__(self, settings: Settings, instance_id: str, *extra_args: str) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.store = Path(settings.run_dir) / f"processor-{instance_id}"
        self.log_path = Path(settings.run_dir) / f"processor-{instance_id}.log"
        self.extra_args = extra_args
        self.process: Supervised | None = None

    def start(self) -> ProcessorProcess:
        # The test's run folder: the processor's leg keys are the ones the test (and its audit) read.
        env = dict(
            os.environ,
            WALLET_KAFKA_BOOTSTRAP=self.settings.bootstrap,
            WALLET_TOPIC_PREFIX=self.settings.topic_prefix,
            WALLET_RUN_DIR=str(self.settings.run_dir),
        )
        self.process = Supervised.start(
            f"processor {self.instance_id}",
            [
                sys.executable,
                "-m",
                "wallet.cli",
                "processor",
                "--instance-id",
                self.instance_id,
                "--store",
                str(self.store),
                *self.extra_args,
            ],
            log_path=self.log_path,
            env=env,
        )
        return self

    def wait_until_assigned(self, timeout_s: float = READY_TIMEOUT_S) -> ProcessorProcess:
        """Until the processors' group is stable and owns every partition, so a test never
        waits on a join."""
        admin = admin_client(self.settings.bootstrap)
        deadline_s = time.monotonic() + timeout_s
        waiting_for: str | None = "the first check"
        while time.monotonic() < deadline_s:
            exit_code = self._started().poll()
            assert exit_code is None, f"the processor exited with {exit_code}:\n{self.log_tail()}"
            waiting_for = processors_not_ready(admin, self.settings)
            if waiting_for is None:
                return self
            time.sleep(0.2)
        raise AssertionError(f"still waiting for {waiting_for} after {timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no goodbye."""
        self._started().kill()

    def stop(self) -> int:
        """SIGTERM and wait: the graceful path (finish the batch, commit, close)."""
        process = self._started()
        if not process.stop(STOP_TIMEOUT_S):
            raise AssertionError(f"processor {self.instance_id} did not stop within {STOP_TIMEOUT_S} s on SIGTERM")
        exit_code = process.poll()
        assert exit_code is not None
        return exit_code

    def _started(self) -> Supervised:
        assert self.process is not None, f"processor {self.instance_id} was never started"
        return self.process

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)
