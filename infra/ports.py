"""Loopback ports: finding free ones (for the processes `wallet up` and the benchmarks start) and
asking whether one answers."""

from __future__ import annotations

import socket


def free_loopback_ports(count: int) -> list[int]:
    """Ports nobody listens on right now (held open together so they are distinct).

    A port is free when this returns, not necessarily when its user binds it: whoever binds it
    must report a taken port as the clear error it is."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
