"""Processor instances as real OS processes, so tests can SIGKILL them like an operator's bad day."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import ConsumerGroupState, KafkaException

from infra.settings import Settings
from infra.admin import admin_client

STOP_TIMEOUT_S = 30
READY_TIMEOUT_S = 60


class ProcessorProcess:
    def __init__(self, settings: Settings, instance_id: str, *extra_args: str) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.store = Path(settings.run_dir) / f"processor-{instance_id}"
        self.log_path = Path(settings.run_dir) / f"processor-{instance_id}.log"
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None

    def start(self) -> "ProcessorProcess":
        # The test's run folder: the processor's leg keys are the ones the test (and its audit) read.
        env = dict(os.environ, WALLET_KAFKA_BOOTSTRAP=self.settings.bootstrap,
                   WALLET_TOPIC_PREFIX=self.settings.topic_prefix, WALLET_RUN_DIR=str(self.settings.run_dir))
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wallet.cli", "processor", "--instance-id", self.instance_id,
             "--store", str(self.store), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def wait_until_assigned(self, timeout_s: float = READY_TIMEOUT_S) -> "ProcessorProcess":
        """Until the processors' group is stable and owns every partition, so a test never
        waits on a join. A freshly started broker answers NOT_COORDINATOR for a while: that is
        not ready yet, not an error."""
        group = self.settings.processor_group_id
        admin = admin_client(self.settings.bootstrap)
        deadline_s = time.monotonic() + timeout_s
        owned: set[int] = set()
        while time.monotonic() < deadline_s:
            assert self.process.poll() is None, f"the processor exited with {self.process.returncode}:\n{self.log_tail()}"
            try:
                description = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
            except KafkaException:
                time.sleep(0.2)
                continue
            owned = {tp.partition for member in description.members for tp in member.assignment.topic_partitions
                     if tp.topic == self.settings.commands_topic}
            if description.state == ConsumerGroupState.STABLE and len(owned) == self.settings.partitions:
                return self
            time.sleep(0.2)
        raise AssertionError(f"the processor owned {sorted(owned)} of {self.settings.partitions} partitions after "
                             f"{timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no goodbye."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> int:
        """SIGTERM and wait: the graceful path (finish the batch, commit, close)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise AssertionError(f"processor {self.instance_id} did not stop within {STOP_TIMEOUT_S} s on SIGTERM")
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
