"""`wallet api`: serve the HTTP app composed in `wallet/api_app.py` with uvicorn, in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys

from infra.metrics import add_metrics_options
from infra.settings import settings_from_args
from producers.client import REQUEST_WAIT_MS_DEFAULT

EXIT_FAILURE = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_api(subparsers)


def _register_api(subparsers: argparse._SubParsersAction) -> None:
    api = subparsers.add_parser("api", help="serve the HTTP command API (uvicorn, foreground)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    api.add_argument("--readmodel-db", help="read model database URL; adds the query routes (balances, history)")
    api.add_argument(
        "--request-wait-ms",
        type=int,
        default=REQUEST_WAIT_MS_DEFAULT,
        help=f"how long a request waits for its outcome before answering pending (default {REQUEST_WAIT_MS_DEFAULT})",
    )
    api.add_argument(
        "--auth",
        choices=("on", "off"),
        default="on",
        help="require bearer tokens (default on; the key comes from the environment, see README)",
    )
    api.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate chain (PEM)")
    api.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    add_metrics_options(api)
    api.set_defaults(handler=_serve_api)


def _serve_api(args: argparse.Namespace) -> int:
    import uvicorn

    from infra.metrics import new_registry, serve_if_asked
    from producers.api import ApiOptions
    from producers.api_metrics import ApiMetrics
    from producers.auth import AuthConfig
    from wallet.api_app import create_app

    if (args.tls_cert is None) != (args.tls_key is None):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_FAILURE
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s api %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("wallet.producers.kafka").setLevel(logging.CRITICAL)  # one line per refused connection otherwise
    settings = settings_from_args(args)
    auth = AuthConfig.from_environment(settings, enabled=args.auth == "on")
    registry = new_registry()
    metrics = ApiMetrics(registry)
    app = create_app(
        settings,
        ApiOptions(request_wait_ms=args.request_wait_ms),
        readmodel_db=args.readmodel_db,
        auth=auth,
        metrics=metrics,
    )
    server = serve_if_asked(args, registry)
    scheme = "https" if args.tls_cert else "http"
    print(f"serving the wallet API at {scheme}://{args.host}:{args.port} (OpenAPI: /docs, /openapi.json)", flush=True)
    if not auth.enabled:
        print("WARNING: AUTHENTICATION IS OFF (--auth off): every caller may move any money", flush=True)
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            ssl_certfile=args.tls_cert,
            ssl_keyfile=args.tls_key,
        )
    finally:
        if server is not None:
            server.close()
    return 0
