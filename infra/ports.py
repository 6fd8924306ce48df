"""Loopback ports: finding free ones (for the servers `wallet up`, the benchmarks and the tests
start) and asking whether one answers."""

from __future__ import annotations

import random
import socket

from infra.settings import LOCAL_NODE_PORT_STEP

# Where the ports of servers started here and by the tests are chosen: below Linux's ephemeral
# range (32768-60999), from which every client socket on the machine takes its local port. A port
# found free there (a `bind(0)`) can be taken by any outgoing connection in the seconds before a
# broker's JVM binds it; parallel test workers and their clients make that likely.
SERVER_PORTS = range(20_000, 32_000)
PORT_PICKS_MAX = 1_000
_PICK = random.SystemRandom()  # not the global generator, which tests (and hypothesis) may seed


def port_is_free(port: int) -> bool:
    """Nobody listens on `port` of 127.0.0.1 (connections lingering in TIME_WAIT do not count: the
    JVM and uvicorn bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct ports of `SERVER_PORTS` nobody listens on right now, chosen at random so
    that processes choosing at the same moment (parallel test workers) do not choose alike."""
    chosen: list[int] = []
    for _ in range(PORT_PICKS_MAX):
        port = _PICK.choice(SERVER_PORTS)
        if port not in chosen and port_is_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free ports in {SERVER_PORTS.start}..{SERVER_PORTS.stop - 1} of 127.0.0.1")


def free_port_ladder(rungs: int, step: int) -> int:
    """A port `base` such that `base + step * rung` and the port after it are free for every rung
    (the client and controller ports of each node of a local cluster)."""
    for _ in range(PORT_PICKS_MAX):
        base = _PICK.randrange(SERVER_PORTS.start, SERVER_PORTS.stop - step * rungs, 2)
        if all(port_is_free(base + step * rung + offset) for rung in range(rungs) for offset in (0, 1)):
            return base
    raise RuntimeError(f"no free ports for {rungs} nodes in {SERVER_PORTS.start}..{SERVER_PORTS.stop - 1}")


def free_cluster_ports(nodes: int) -> tuple[int, int]:
    """(client port, controller port) of node 1 of a local broker of `nodes` nodes such that every
    node's pair (each `LOCAL_NODE_PORT_STEP` further) is free right now."""
    base = free_port_ladder(nodes, LOCAL_NODE_PORT_STEP)
    return base, base + 1


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
