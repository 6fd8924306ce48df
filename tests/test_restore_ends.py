"""The restore's end offsets while a partition has no leader (a broker down, an election)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException

from streams.runtime.restore import RestoreTimeout, stable_ends


class _Admin:
    """Answers `list_offsets` from a script: each call pops the next offset (or error) per partition."""

    def __init__(self, script: dict[int, list[int | KafkaError]]) -> None:
        self.script = script
        self.metadata_requests = 0

    def list_topics(self, topic=None, timeout=-1):  # noqa: ARG002 - the AdminClient's signature
        self.metadata_requests += 1

    def list_offsets(self, request, isolation_level, request_timeout):  # noqa: ARG002 - the AdminClient's signature
        futures = {}
        for topic_partition in request:
            answers = self.script[topic_partition.partition]
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            future: Future = Future()
            if isinstance(answer, KafkaError):
                future.set_exception(KafkaException(answer))
            else:
                future.set_result(SimpleNamespace(offset=answer))
            futures[topic_partition] = future
        return futures


def test_a_partition_without_a_leader_is_asked_again_never_taken_as_its_end() -> None:
    # -1001 (no offset) and a retriable error first: the end is unknown, not -1001.
    leaderless = KafkaError(KafkaError.LEADER_NOT_AVAILABLE, "no leader", retriable=True)
    # Seen on a cluster losing brokers, and not flagged retriable by librdkafka.
    fenced_epoch = KafkaError(KafkaError.FENCED_LEADER_EPOCH, "Leader epoch is older than broker epoch")
    admin = _Admin({0: [-1001, -1001, leaderless, fenced_epoch, fenced_epoch, 42], 1: [7]})
    assert stable_ends(cast(Any, admin), "events", [0, 1], timeout_s=10) == {0: 42, 1: 7}


def test_a_partition_that_never_gets_a_leader_times_out_with_a_clear_reason() -> None:
    admin = _Admin({0: [-1001]})
    with pytest.raises(RestoreTimeout, match="no leader"):
        stable_ends(cast(Any, admin), "events", [0], timeout_s=0.3)


def test_an_error_no_wait_cures_is_raised_at_once() -> None:
    refused = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized")
    admin = _Admin({0: [refused]})
    with pytest.raises(KafkaException):
        stable_ends(cast(Any, admin), "events", [0], timeout_s=10)


class _StaleLeaderCacheAdmin(_Admin):
    """As librdkafka 2.16 does: `list_offsets` asks the leader with the leader epoch of its metadata
    cache, and a FENCED_LEADER_EPOCH answer does not drop that cache (only NOT_LEADER_OR_FOLLOWER
    and LEADER_NOT_AVAILABLE do), so the same stale epoch is sent again until a metadata request
    for the topic refreshes it."""

    def __init__(self, end: int) -> None:
        super().__init__({})
        self.end = end

    def list_offsets(self, request, isolation_level, request_timeout):  # noqa: ARG002 - the AdminClient's signature
        futures = {}
        for topic_partition in request:
            future: Future = Future()
            if self.metadata_requests == 0:
                stale = KafkaError(KafkaError.FENCED_LEADER_EPOCH, "Leader epoch is older than broker epoch")
                future.set_exception(KafkaException(stale))
            else:
                future.set_result(SimpleNamespace(offset=self.end))
            futures[topic_partition] = future
        return futures


def test_a_leader_epoch_older_than_the_leaders_refreshes_the_metadata_before_asking_again() -> None:
    # Seen after a broker came back and took its leaderships back: without a refresh every ask
    # failed the same way until the restore's bound, and the processor stopped serving.
    admin = _StaleLeaderCacheAdmin(end=42)
    assert stable_ends(cast(Any, admin), "events", [0], timeout_s=2) == {0: 42}
    assert admin.metadata_requests >= 1


def test_a_partition_whose_leaders_cannot_be_found_yet_is_asked_again() -> None:
    # librdkafka's answer while a partition's leader is elected anew (seen when the transaction
    # coordinator's broker was killed): not retriable by its flag, cured by waiting.
    no_leaders = KafkaError(KafkaError._NOENT, "Failed to query partition leaders: No leaders found")
    admin = _Admin({0: [no_leaders, no_leaders, 42]})
    assert stable_ends(cast(Any, admin), "events", [0], timeout_s=10) == {0: 42}
