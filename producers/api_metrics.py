"""The HTTP API's Prometheus metrics, every one defined here, and the ASGI middleware that times requests.

`RequestMetrics` wraps the whole app (outside the body gate), so every answer is counted: the
routes', the gate's 413/415, the framework's 404/405/422 and a bug's 500. A request is labelled
with its route's template (`/v1/accounts/{account_id}/deposit`), never with the path it was sent
to, so an account id never becomes a label; a path no route matches is `unmatched`.

- `wallet_api_request_duration_seconds` (histogram; route, method, status): from the request's arrival to
  its answer's last byte
- `wallet_api_command_answers_total` (counter; command, status (`success`, `failure`, `pending`)): what
  command requests were answered; `pending` is the 202 after the wait ran out
- `wallet_api_refusals_total` (counter; status (`401`, `403`, `429`)): requests refused by the token gate or
  the rate limits
- `wallet_api_outcome_waits` (gauge): requests waiting for their outcome now
- `wallet_api_outcome_consumer_ready` (gauge): 1 once the outcome consumer is positioned on
  `wallet.outcomes`, else 0
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match

from infra.metrics import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from producers.client import WalletClient

UNMATCHED_ROUTE = "unmatched"
# The method is the client's word: any other is labelled `other`, so a client cannot grow the label set.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REFUSAL_STATUSES = frozenset({401, 403, 429})


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.request_duration = Histogram(
            "wallet_api_request_duration_seconds",
            "HTTP requests, from arrival to the answer's last byte, by route template, method and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.command_answers = Counter(
            "wallet_api_command_answers_total",
            "answers to command requests by command and status (pending: the wait ran out, HTTP 202)",
            ["command", "status"],
            registry=registry,
        )
        self.refusals = Counter(
            "wallet_api_refusals_total",
            "requests refused by the token gate (401, 403) or the rate limits (429)",
            ["status"],
            registry=registry,
        )
        self.outcome_waits = Gauge(
            "wallet_api_outcome_waits", "requests waiting for their outcome now", registry=registry
        )
        self.outcome_consumer_ready = Gauge(
            "wallet_api_outcome_consumer_ready",
            "1 once the outcome consumer is positioned on wallet.outcomes",
            registry=registry,
        )

    def watch(self, client: WalletClient) -> None:
        """The gauges read the client's outcome waiter at each scrape."""
        waiter = client.waiter
        self.outcome_waits.set_function(lambda: waiter.waiting_count)
        self.outcome_consumer_ready.set_function(lambda: 1.0 if waiter.ready else 0.0)

    def request(self, route: str, method: str, status: int, duration_s: float) -> None:
        self.request_duration.labels(route, method, str(status)).observe(duration_s)
        if status in REFUSAL_STATUSES:
            self.refusals.labels(str(status)).inc()


def _route_template(scope) -> str:
    """The template of the route that handled the request; for one answered before routing (the body
    gate's 413/415), the route the path would have matched."""
    route = scope.get("route")
    if route is not None:
        return route.path
    app = scope.get("app")
    return _matching_template(getattr(getattr(app, "router", None), "routes", ()), scope)


def _matching_template(routes, scope) -> str:
    for candidate in routes:
        path = getattr(candidate, "path", None)
        if path is None:
            # FastAPI 0.165 keeps an included router as one entry without a path of its own (its
            # routes carry their full paths): its routes are searched instead. Taking its `.path`
            # raised, so every 413 and 415 ended in a 500 of the middleware.
            included = getattr(candidate, "original_router", None)
            template = _matching_template(getattr(included, "routes", ()), scope)
            if template != UNMATCHED_ROUTE:
                return template
            continue
        match, _ = candidate.matches(scope)
        if match is not Match.NONE:
            return path
    return UNMATCHED_ROUTE


class RequestMetrics:
    """ASGI middleware: times every HTTP request and counts it by route template, method and status."""

    def __init__(self, app, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        status = 500  # what the server answers when the app raises before starting a response

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.request(_route_template(scope), method, status, time.perf_counter() - started_s)
