"""The one partitioning function of the project: Kafka's Java murmur2 of the record key.

Every producer sets librdkafka's `partitioner=murmur2_random`, which places keyed records
exactly as the Java client does; this module computes the same placement in Python for the
places that must know it without producing (the processor's restore, tests, the audit).
"""

from __future__ import annotations

# librdkafka's name for Java's default partitioner; set on every producer of the project.
KAFKA_PARTITIONER = "murmur2_random"

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2` (seed 0x9747b28c), as an unsigned 32-bit value."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    tail_start = length - (length & 3)
    for i in range(0, tail_start, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    remaining = length & 3
    if remaining == 3:
        h ^= data[tail_start + 2] << 16
    if remaining >= 2:
        h ^= data[tail_start + 1] << 8
    if remaining >= 1:
        h ^= data[tail_start]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(account_id: str, partition_count: int) -> int:
    """The partition of `wallet.commands` and `wallet.events` that owns an account."""
    return (murmur2(account_id.encode()) & 0x7FFFFFFF) % partition_count
