"""The raw Kafka ceiling: a transactional consume-and-copy loop with no logic at all.

It does what the processor does around its logic and nothing else: consume a batch
(read_committed, the processor's own consumer settings), produce every record to an output
topic (the processor's own producer settings), send the consumed offsets into the
transaction, commit. Whatever rate it reaches on this machine is the most any Python
transactional pipeline on this broker can reach, so the processor is judged against it.

Run as `python -m benchmarks.raw_ceiling --input-topic T --output-topic O ...`: it copies
the input topic as it is at start (up to the end offsets it finds then) and prints one JSON
line per progress step and a final JSON line `{"records", "elapsed_s", ...}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from infra.kafka_clients import processor_consumer_config, processor_producer_config
from infra.produce import produce_with_room
from streams.runtime.processor import ProcessorConfig

KAFKA_CALL_TIMEOUT_S = ProcessorConfig(instance_id="", store_path=Path()).kafka_call_timeout_ms / 1000

PROGRESS_INTERVAL_S = 0.5


class CopyTimeout(RuntimeError):
    pass


@dataclass(frozen=True)
class CopyResult:
    records: int
    # From the first consumed record to the return of the last commit: the group join
    # before it is the same fixed cost for every stage and is left out.
    elapsed_s: float
    transactions: int

    @property
    def messages(self) -> int:
        return 2 * self.records  # one consumed + one produced per record


def copy_topic(
    bootstrap: str,
    input_topic: str,
    output_topic: str,
    group_id: str,
    instance_id: str,
    batch_size_max: int,
    commit_interval_ms: int,
    transaction_timeout_ms: int,
    timeout_s: float,
    on_progress=None,
) -> CopyResult:
    consumer = Consumer(processor_consumer_config(bootstrap, group_id, instance_id))
    producer = Producer(processor_producer_config(bootstrap, f"{group_id}-{instance_id}", transaction_timeout_ms))
    try:
        ends = _end_offsets(consumer, input_topic)
        producer.init_transactions(KAFKA_CALL_TIMEOUT_S)
        consumer.subscribe([input_topic])
        return _copy(
            consumer,
            producer,
            input_topic,
            output_topic,
            ends,
            batch_size_max,
            commit_interval_ms,
            timeout_s,
            on_progress,
        )
    finally:
        consumer.close()
        producer.flush(KAFKA_CALL_TIMEOUT_S)


def _end_offsets(consumer: Consumer, topic: str) -> dict[int, int]:
    metadata = consumer.list_topics(topic, timeout=KAFKA_CALL_TIMEOUT_S).topics[topic]
    if metadata.error is not None:
        raise KafkaException(metadata.error)
    return {
        partition: consumer.get_watermark_offsets(TopicPartition(topic, partition), KAFKA_CALL_TIMEOUT_S)[1]
        for partition in metadata.partitions
    }


def _copy(
    consumer: Consumer,
    producer: Producer,
    input_topic: str,
    output_topic: str,
    ends: dict[int, int],
    batch_size_max: int,
    commit_interval_ms: int,
    timeout_s: float,
    on_progress,
) -> CopyResult:
    remaining = {partition for partition, end in ends.items() if end > 0}
    deadline_s = time.monotonic() + timeout_s
    started_s = None
    copied = transactions = 0
    last_progress_s = 0.0
    while remaining:
        if time.monotonic() > deadline_s:
            raise CopyTimeout(
                f"copied {copied} records of {input_topic} in {timeout_s:.0f} s; partitions "
                f"{sorted(remaining)} did not reach their end offsets {ends}"
            )
        records = consumer.consume(num_messages=batch_size_max, timeout=commit_interval_ms / 1000)
        if not records:
            continue
        if started_s is None:
            started_s = time.monotonic()
        next_offsets: dict[int, int] = {}
        batch_copied = 0
        producer.begin_transaction()
        for record in records:
            error = record.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                continue
            partition, offset = record.partition(), record.offset()
            assert partition is not None and offset is not None  # set on every consumed record
            produce_with_room(producer, output_topic, record.value(), record.key(), partition=partition)
            next_offsets[partition] = offset + 1
            batch_copied += 1
        producer.send_offsets_to_transaction(
            [TopicPartition(input_topic, partition, offset) for partition, offset in next_offsets.items()],
            consumer.consumer_group_metadata(),
            KAFKA_CALL_TIMEOUT_S,
        )
        producer.commit_transaction(KAFKA_CALL_TIMEOUT_S)
        transactions += 1
        copied += batch_copied
        remaining -= {partition for partition, offset in next_offsets.items() if offset >= ends[partition]}
        now_s = time.monotonic()
        if on_progress is not None and now_s - last_progress_s >= PROGRESS_INTERVAL_S:
            on_progress(copied)
            last_progress_s = now_s
    elapsed_s = time.monotonic() - started_s if started_s is not None else 0.0
    return CopyResult(records=copied, elapsed_s=elapsed_s, transactions=transactions)


def main(argv: list[str] | None = None) -> int:
    defaults = ProcessorConfig(instance_id="", store_path=Path())
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raw_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True, help="must exist, with the input's partition count")
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--instance-id", default="ceiling")
    parser.add_argument("--batch-size-max", type=int, default=defaults.batch_size_max)
    parser.add_argument("--commit-interval-ms", type=int, default=defaults.commit_interval_ms)
    parser.add_argument("--transaction-timeout-ms", type=int, default=defaults.transaction_timeout_ms)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long (default 600)")
    args = parser.parse_args(argv)

    def report(copied: int) -> None:
        print(json.dumps({"copied": copied}), flush=True)

    try:
        result = copy_topic(
            args.bootstrap,
            args.input_topic,
            args.output_topic,
            args.group_id,
            args.instance_id,
            args.batch_size_max,
            args.commit_interval_ms,
            args.transaction_timeout_ms,
            args.timeout_s,
            on_progress=report,
        )
    except (CopyTimeout, KafkaException) as error:
        print(json.dumps({"error": str(error)}), flush=True)
        return 1
    print(json.dumps({**asdict(result), "messages": result.messages}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
