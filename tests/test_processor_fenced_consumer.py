"""A processor whose consumer goes fatal replaces it and rejoins, instead of running on owning nothing.

A static member is fenced (FATAL) when another consumer joins with its `group.instance.id`, which
is what a session timeout during a broker failover looks like to the group coordinator.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer

from schemas.commands import Deposit, OpenAccount
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, wait_for
from tests.support.processes import ProcessorProcess

FENCER_HOLD_S = 3.0


def test_a_fenced_consumer_is_replaced_and_the_processor_decides_again(make_settings) -> None:
    settings = make_settings(2)
    processor = ProcessorProcess(settings, "fenced-1").start().wait_until_assigned()
    outcomes = OutcomeCollector(settings)
    try:
        producer = command_producer(settings)
        opening = edge(OpenAccount, transaction_id="open-carol", account_id="carol", currency="USD")
        publish(producer, settings, [opening])
        outcomes.wait_all({opening.transaction_id})

        # Another member with the processor's static instance id fences the processor's consumer.
        group_id = settings.processor_group_id
        fencer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap,
                "group.id": group_id,
                "group.instance.id": f"{group_id}-fenced-1",
                "session.timeout.ms": 6000,
            }
        )
        fencer.subscribe([settings.commands_topic])
        deadline_s = time.monotonic() + 60
        while not fencer.assignment() and time.monotonic() < deadline_s:
            fencer.poll(0.2)
        hold_until_s = time.monotonic() + FENCER_HOLD_S
        while time.monotonic() < hold_until_s:
            fencer.poll(0.2)
        fencer.close()

        wait_for(
            lambda: "replacing it and rejoining the group" in processor.log_tail(200),
            60,
            "the processor to replace its fenced consumer",
        )
        deposit = edge(Deposit, transaction_id="fund-carol", account_id="carol", amount="5.00", currency="USD")
        publish(producer, settings, [deposit])
        [answer] = outcomes.wait(deposit.transaction_id, timeout_s=90)
        assert answer.status == "success"
    finally:
        outcomes.close()
        assert processor.stop() == 0, processor.log_tail()
