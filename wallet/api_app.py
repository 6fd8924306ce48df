"""The HTTP app of `wallet api`: the command routes, the query routes, one error shape, one gate.

The composition lives here, at the top, so that neither side imports the other: the command
side (`producers/api.py`) knows nothing of the read model, and the query side
(`consumers/readmodel/query_api.py`) knows nothing of Kafka publishing; both take the
authentication gate (`producers/auth.py`) as a dependency.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from infra.http import install_error_handlers
from infra.settings import Settings
from producers.api import ApiOptions, BodyGate, cached_status_router, command_router, command_side, health_router
from producers.api_holds import hold_router
from producers.api_metrics import ApiMetrics, RequestMetrics
from producers.auth import SCOPES, AuthConfig, Gate, RateLimits

DESCRIPTION = """Every route but `/healthz` and `/readyz` needs `Authorization: Bearer <JWT>` with a `sub` and a `scope`
claim (space-separated): `wallet:user` opens accounts (which it then owns), reads its own and moves money out
of them (transfers, payments, withdrawals; holds: place, capture, void); `wallet:bank` deposits and withdraws
on any account; `wallet:operator` freezes, unfreezes, closes, captures and voids any hold, and reads
everything; `wallet:audit` reads everything and moves nothing. 401 without a valid token, 403 without the
scope, 429 (with `Retry-After`) over the caller's rate. Every error is `{"error", "message", "errors"}`."""


def create_app(
    settings: Settings,
    options: ApiOptions | None = None,
    readmodel_db: str | None = None,
    *,
    auth: AuthConfig | None = None,
    rate_limits: RateLimits | None = None,
    metrics: ApiMetrics | None = None,
) -> FastAPI:
    """The API for the topics of `settings`; with `readmodel_db`, also the read model's query routes.

    `auth` defaults to the environment's key (the run folder's HS256 secret unless an external
    identity provider is configured); `AuthConfig(enabled=False)` serves without tokens. `metrics`: where
    the app counts its requests (`wallet api` serves them on `--metrics-port`); by default, unserved ones.
    """
    options = options if options is not None else ApiOptions()
    options.check()
    metrics = metrics if metrics is not None else ApiMetrics()
    gate = Gate(
        auth if auth is not None else AuthConfig.from_environment(settings),
        rate_limits if rate_limits is not None else RateLimits.from_environment(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with command_side(app, settings, options.publish_timeout_ms):
            metrics.watch(app.state.client)
            yield

    app = FastAPI(title="Streamwallet API", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.gate = gate
    app.state.metrics = metrics
    app.add_middleware(BodyGate, body_bytes_max=options.body_bytes_max)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it sees every answer
    install_error_handlers(app)
    app.include_router(command_router(gate, options))
    if readmodel_db is not None:
        # Imported only when configured: the command API runs without the read model's dependencies.
        from consumers.readmodel.query_api import hold_finder, query_router

        # Capture and void find the hold's account in the read model.
        app.include_router(hold_router(gate, options, hold_finder(readmodel_db)))
        app.include_router(query_router(readmodel_db, settings, caller=gate.requires(*SCOPES)))
    else:
        app.include_router(hold_router(gate, options, None))
        app.include_router(cached_status_router(gate))
    app.include_router(health_router(readmodel=readmodel_db is not None))
    return app
