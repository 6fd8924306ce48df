"""Prometheus metrics: the serving side every process shares, and the reading side of `wallet top` and
`wallet health`.

Each process (a processor, the read model, the API) defines its own metrics in one module beside its
code (`streams/runtime/metrics.py`, `consumers/readmodel/metrics.py`, `producers/api_metrics.py`), on a
registry of its own made here, and serves it with `--metrics-port` on a port apart from any API port.
That port has no authentication (Prometheus scrapes it without a token), so it carries no secret and
no id, and listens on loopback unless told otherwise (a container's private network). Names follow Prometheus'
conventions: a `wallet_<component>_` prefix, `_total` on counters, base units (`_seconds`), money in
integer minor units (`_minor`), and only bounded labels: a partition number, a currency, a command type,
a status, a route template; never an account or a transaction id.

This module is on the operator's side of the trust boundary: what it reads (`scrape`) comes from
the stack's own processes on loopback, and a reply that does not parse is reported, never trusted.
"""

from __future__ import annotations

import argparse
import math
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.parser import text_string_to_metric_families

METRICS_HOST_DEFAULT = "127.0.0.1"
SCRAPE_TIMEOUT_S_DEFAULT = 2.0
SCRAPE_BYTES_MAX = 4 * 1024 * 1024  # a process's whole exposition is tens of KiB; more is not ours

# The seconds buckets of every latency histogram of the project: from a fast local commit (1 ms) to the
# longest Kafka call bound (30 s), so an outage's stalls land in a bucket instead of +Inf.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def new_registry() -> CollectorRegistry:
    """A registry for one process's metrics, with the process' CPU, memory and GC figures."""
    # No `_created` series beside every counter and histogram: they double the exposition and no
    # figure of ours needs them (Prometheus tells a restart from a counter that went down).
    disable_created_metrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port, logged); default: not served",
    )
    parser.add_argument(
        "--metrics-host",
        default=METRICS_HOST_DEFAULT,
        help=f"address the metrics port listens on (default {METRICS_HOST_DEFAULT}; 0.0.0.0 in a container)",
    )


class MetricsServer:
    """The registry served over HTTP on a daemon thread (prometheus_client's own server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"--metrics-port must be within 0..65535, got {port}")
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_if_asked(args: argparse.Namespace, registry: CollectorRegistry) -> MetricsServer | None:
    """Serves `registry` when the command was given `--metrics-port`; says where on stdout."""
    if args.metrics_port is None:
        return None
    try:
        server = MetricsServer(registry, args.metrics_host, args.metrics_port)
    except OSError as error:  # a taken port: the operator's to fix, said in one line
        raise SystemExit(f"error: cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {error}") from None
    print(f"serving Prometheus metrics at {server.url}", flush=True)
    return server


# -- reading: what `wallet top` and `wallet health` see ------------------------------------------


class ScrapeError(RuntimeError):
    """A metrics endpoint did not answer, or answered something that is not Prometheus' text format."""


Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    """One reading of one process's metrics: every sample by (name, sorted labels)."""

    samples: dict[tuple[str, Labels], float]
    taken_s: float  # time.monotonic() of the reading, for rates between two readings

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def matching(self, name: str, **labels: str) -> Iterable[tuple[dict[str, str], float]]:
        for (sample_name, sample_labels), value in self.samples.items():
            if sample_name == name:
                found = dict(sample_labels)
                if all(found.get(key) == wanted for key, wanted in labels.items()):
                    yield found, value

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels` (0 when there is none)."""
        return sum(value for _, value in self.matching(name, **labels))

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """The samples of `name`, summed per value of `label`."""
        sums: dict[str, float] = {}
        for found, value in self.matching(name, **labels):
            key = found.get(label, "")
            sums[key] = sums.get(key, 0.0) + value
        return sums

    def buckets(self, histogram: str, **labels: str) -> dict[float, float]:
        """A histogram's cumulative bucket counts by upper bound, summed over its other labels."""
        return {float(le): count for le, count in self.by_label(f"{histogram}_bucket", "le", **labels).items()}


def parse_exposition(text: str, taken_s: float) -> Scrape:
    samples: dict[tuple[str, Labels], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    except ValueError as error:
        raise ScrapeError(f"not Prometheus' text format: {error}") from None
    return Scrape(samples, taken_s)


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S_DEFAULT) -> Scrape:
    """GET and parse one metrics endpoint; raises ScrapeError when it cannot."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            body = reply.read(SCRAPE_BYTES_MAX + 1)
    except OSError as error:
        raise ScrapeError(f"{url}: {error}") from None
    if len(body) > SCRAPE_BYTES_MAX:
        raise ScrapeError(f"{url}: more than {SCRAPE_BYTES_MAX} bytes of metrics")
    return parse_exposition(body.decode("utf-8", errors="replace"), time.monotonic())


def rate_per_s(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How fast a counter grew between two readings; a counter that went down (a restart) counts from 0."""
    elapsed_s = after.taken_s - before.taken_s
    if elapsed_s <= 0:
        return 0.0
    now, then = after.total(name, **labels), before.total(name, **labels)
    return (now - then if now >= then else now) / elapsed_s


def histogram_quantile(quantile: float, buckets: dict[float, float]) -> float | None:
    """The quantile of cumulative `buckets` (upper bound -> count), interpolated within its bucket as
    PromQL's histogram_quantile does; None without observations. Past the last finite bound: that bound."""
    assert 0 <= quantile <= 1, quantile
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = quantile * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_increase(before: Scrape, after: Scrape, histogram: str, **labels: str) -> dict[float, float]:
    """The observations that fell in each bucket between two readings (all of `after` after a restart)."""
    now, then = after.buckets(histogram, **labels), before.buckets(histogram, **labels)
    if any(count < then.get(bound, 0.0) for bound, count in now.items()):
        return now
    return {bound: count - then.get(bound, 0.0) for bound, count in now.items()}
