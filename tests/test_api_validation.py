"""The HTTP API's edge without a broker: every invalid request gets a 4xx naming the field and
the reason in the one error shape (framework refusals included), the OpenAPI document lists the
contract's paths and their bearer security, and an unreachable Kafka gives a 503 within a bound
instead of a hang."""

from __future__ import annotations

import time

import httpx
import pytest

from infra.ports import free_loopback_ports
from infra.settings import Settings
from producers.api import ApiOptions
from tests.support.auth import auth_config, bearer
from tests.support.serving import serving_in_thread
from wallet.api_app import create_app

TRANSFER = {
    "from_account": "alice",
    "to_account": "bob",
    "amount": "12.34",
    "currency": "USD",
    "transaction_id": "tx-validation-1",
}
OUTAGE_ANSWER_BOUND_S = 5  # the API gives up on an unconnected outcome consumer after 2 s


@pytest.fixture(scope="module")
def api_url():
    (port,) = free_loopback_ports(1)
    # Nobody listens on this port: requests that pass validation meet a Kafka outage.
    app = create_app(
        Settings().with_overrides(kafka_bootstrap=f"127.0.0.1:{port}"),
        ApiOptions(request_wait_ms=1000),
        auth=auth_config(),
    )
    with serving_in_thread(app) as url:
        yield url


def _post(url: str, path: str, headers: dict | None = None, **request) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=30, headers={**bearer(), **(headers or {})}, **request)


def _field_error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    first = body["errors"][0]
    return response.status_code, first["field"], first["reason"]


@pytest.mark.parametrize(
    ("change", "field", "reason", "message_part"),
    [
        ({"amount": 12.34}, "amount", "amount_not_string", "JSON string"),
        ({"amount": 12}, "amount", "amount_not_string", "JSON string"),
        ({"amount": "1.234"}, "amount", "invalid_amount", "2 decimal places"),
        ({"amount": "1.5", "currency": "JPY"}, "amount", "invalid_amount", "0 decimal places"),
        ({"amount": "-5.00"}, "amount", "invalid_amount", "positive"),
        ({"amount": "0.00"}, "amount", "invalid_amount", "greater than zero"),
        ({"amount": "1e3"}, "amount", "invalid_amount", "exponent"),
        ({"amount": " 5"}, "amount", "invalid_amount", "plain decimal"),
        ({"amount": "99999999999999999.00"}, "amount", "invalid_amount", "maximum"),
        ({"currency": "XYZ"}, "currency", "unknown_currency", "ISO 4217"),
        ({"currency": "usd"}, "currency", "unknown_currency", "ISO 4217"),
        ({"from_account": "bad id"}, "from_account", "invalid_characters", "letters, digits"),
        ({"to_account": "x" * 65}, "to_account", "too_long", "64"),
        ({"transaction_id": ""}, "transaction_id", "too_short", "1 character"),
        ({"transaction_id": "t" * 129}, "transaction_id", "too_long", "128"),
        ({"merchant_payment": "yes"}, "merchant_payment", "must_be_boolean", "boolean"),
        ({"memo": "hi"}, "memo", "unknown_field", "not permitted"),
    ],
)
def test_an_invalid_transfer_field_is_refused_with_its_name_and_reason(
    api_url: str, change: dict, field: str, reason: str, message_part: str
) -> None:
    response = _post(api_url, "/v1/wallet/balance_transfer", json={**TRANSFER, **change})
    assert _field_error(response) == (422, field, reason)
    assert message_part in response.json()["errors"][0]["message"]


@pytest.mark.parametrize("missing", ["from_account", "to_account", "amount", "currency", "transaction_id"])
def test_a_missing_transfer_field_is_named(api_url: str, missing: str) -> None:
    body = {name: value for name, value in TRANSFER.items() if name != missing}
    assert _field_error(_post(api_url, "/v1/wallet/balance_transfer", json=body)) == (422, missing, "missing")


def test_malformed_json_is_a_400_naming_the_body(api_url: str) -> None:
    response = _post(
        api_url,
        "/v1/wallet/balance_transfer",
        content=b'{"amount": "1.00",',
        headers={"content-type": "application/json"},
    )
    assert _field_error(response) == (400, "body", "malformed_json")
    assert response.json()["error"] == "malformed_json"


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42"])
def test_a_json_body_that_is_not_an_object_is_refused(api_url: str, body: bytes) -> None:
    response = _post(api_url, "/v1/wallet/balance_transfer", content=body, headers={"content-type": "application/json"})
    assert _field_error(response) == (422, "body", "must_be_object")


def test_a_form_encoded_body_is_refused_as_not_json(api_url: str) -> None:
    response = _post(api_url, "/v1/wallet/balance_transfer", data={"amount": "1.00"})
    assert _field_error(response) == (415, "content-type", "not_json")


def test_an_oversized_body_is_refused_before_it_is_parsed(api_url: str) -> None:
    response = _post(api_url, "/v1/wallet/balance_transfer", json={**TRANSFER, "from_account": "a" * 20_000})
    assert _field_error(response) == (413, "body", "too_large")


def test_an_oversized_body_without_a_declared_length_is_refused_too(api_url: str) -> None:
    chunks = (b"x" * 1024 for _ in range(20))  # streamed: chunked transfer encoding, no Content-Length
    response = _post(
        api_url, "/v1/wallet/balance_transfer", content=chunks, headers={"content-type": "application/json"}
    )
    assert _field_error(response) == (413, "body", "too_large")


@pytest.mark.parametrize(
    ("path", "body", "field", "reason"),
    [
        (
            "/v1/accounts",
            {"account_id": "a", "currency": "USD", "kind": "admin", "transaction_id": "t"},
            "kind",
            "not_allowed",
        ),
        (
            "/v1/accounts",
            {"account_id": "a", "currency": "EURO", "transaction_id": "t"},
            "currency",
            "unknown_currency",
        ),
        ("/v1/accounts", {"currency": "USD", "transaction_id": "t"}, "account_id", "missing"),
        (
            "/v1/accounts/alice/deposit",
            {"amount": 5, "currency": "USD", "transaction_id": "t"},
            "amount",
            "amount_not_string",
        ),
        (
            "/v1/accounts/alice/withdraw",
            {"amount": "0.0001", "currency": "BHD", "transaction_id": "t"},
            "amount",
            "invalid_amount",
        ),
        ("/v1/accounts/alice/withdraw", {"amount": "1.00", "transaction_id": "t"}, "currency", "missing"),
        (
            "/v1/accounts/bad%20id/deposit",
            {"amount": "1.00", "currency": "USD", "transaction_id": "t"},
            "account_id",
            "invalid_characters",
        ),
        ("/v1/accounts/alice/freeze", {}, "transaction_id", "missing"),
        ("/v1/accounts/alice/close", {"transaction_id": "t", "amount": "1.00"}, "amount", "unknown_field"),
        ("/v1/accounts/alice/unfreeze?wait_ms=-1", {"transaction_id": "t"}, "wait_ms", "greater_than_equal"),
    ],
)
def test_every_command_path_names_the_invalid_field(
    api_url: str, path: str, body: dict, field: str, reason: str
) -> None:
    assert _field_error(_post(api_url, path, json=body)) == (422, field, reason)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # JSON Schema's integer includes 3.0 (found by schemathesis); 3.5 stays refused.
        (
            "/v1/accounts",
            {"account_id": "m", "currency": "USD", "kind": "merchant", "shards": 3.0, "transaction_id": "t"},
        ),
        ("/v1/wallet/balance_transfer", {**TRANSFER, "to_shards": 2.0}),
    ],
)
def test_a_whole_number_written_with_a_fraction_is_an_integer(api_url: str, path: str, body: dict) -> None:
    assert _post(api_url, path, json=body).status_code == 503  # valid: it would have been published
    field = "shards" if "shards" in body else "to_shards"
    assert _field_error(_post(api_url, path, json={**body, field: 3.5})) == (422, field, "int_type")


def test_a_valid_request_during_a_kafka_outage_gets_a_503_within_a_bound(api_url: str) -> None:
    started_s = time.monotonic()
    response = _post(api_url, "/v1/wallet/balance_transfer", json=TRANSFER)
    assert time.monotonic() - started_s < OUTAGE_ANSWER_BOUND_S
    assert response.status_code == 503
    assert response.json()["error"] == "kafka_unavailable"
    assert "Kafka" in response.json()["message"]


def test_the_status_of_a_transaction_this_api_never_saw_is_unknown(api_url: str) -> None:
    response = httpx.get(f"{api_url}/v1/transactions/never-seen", timeout=10, headers=bearer())
    assert (response.status_code, response.json()["status"]) == (200, "unknown")


def test_the_openapi_document_describes_the_command_paths_and_their_bodies(api_url: str) -> None:
    document = httpx.get(f"{api_url}/openapi.json", timeout=10).json()
    assert {
        "/v1/wallet/balance_transfer",
        "/v1/accounts",
        "/v1/accounts/{account_id}/deposit",
        "/v1/accounts/{account_id}/withdraw",
        "/v1/accounts/{account_id}/freeze",
        "/v1/accounts/{account_id}/unfreeze",
        "/v1/accounts/{account_id}/close",
        "/v1/transactions/{transaction_id}",
    } <= set(document["paths"])
    transfer = document["components"]["schemas"]["BalanceTransferRequest"]
    assert set(transfer["required"]) == {"from_account", "to_account", "amount", "currency", "transaction_id"}
    assert transfer["properties"]["amount"]["type"] == "string"
    reply = document["components"]["schemas"]["CommandReply"]
    assert reply["properties"]["status"]["enum"] == ["success", "failure", "pending"]


def test_a_wait_above_the_maximum_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="request_wait_ms"):
        create_app(Settings(), ApiOptions(request_wait_ms=10**6), auth=auth_config())


def test_with_a_read_model_the_app_also_serves_its_query_routes(tmp_path) -> None:
    (port,) = free_loopback_ports(1)
    settings = Settings().with_overrides(kafka_bootstrap=f"127.0.0.1:{port}")
    app = create_app(settings, readmodel_db=f"sqlite:///{tmp_path / 'readmodel.db'}", auth=auth_config())
    with serving_in_thread(app) as url:
        paths = set(httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"])
        health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert {
        "/v1/accounts/{account_id}",
        "/v1/accounts/{account_id}/transactions",
        "/v1/transactions/{transaction_id}",
        "/v1/wallet/balance_transfer",
    } <= paths
    assert health["readmodel"] is True


def _error_shape(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "message", "errors"}, body
    return body["error"]


def test_an_unknown_route_answers_the_error_shape(api_url: str) -> None:
    response = httpx.get(f"{api_url}/v1/nowhere", timeout=10)
    assert (response.status_code, _error_shape(response)) == (404, "not_found")


def test_a_wrong_method_answers_the_error_shape(api_url: str) -> None:
    response = httpx.delete(f"{api_url}/v1/wallet/balance_transfer", timeout=10, headers=bearer())
    assert (response.status_code, _error_shape(response)) == (405, "method_not_allowed")


def test_a_request_without_a_token_is_401_with_www_authenticate(api_url: str) -> None:
    response = httpx.post(f"{api_url}/v1/wallet/balance_transfer", json=TRANSFER, timeout=10)
    assert (response.status_code, _error_shape(response)) == (401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_the_openapi_document_declares_bearer_security_on_every_route_but_health(api_url: str) -> None:
    document = httpx.get(f"{api_url}/openapi.json", timeout=10).json()
    assert document["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    health_routes = {"/healthz", "/readyz"}  # for probes, which carry no token
    assert health_routes <= set(document["paths"])
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            expected: list[dict[str, list[str]]] = [] if path in health_routes else [{"HTTPBearer": []}]
            assert operation.get("security", []) == expected, (method, path)
            if path not in health_routes:
                assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)


def _self_signed_certificate(folder) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_wallet_api_serves_https_with_a_certificate_and_key(tmp_path) -> None:
    import os
    import ssl
    import subprocess
    import sys

    cert, key = _self_signed_certificate(tmp_path)
    trusted = ssl.create_default_context(cafile=cert)
    kafka_port, api_port = free_loopback_ports(2)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wallet.cli",
            "--bootstrap",
            f"127.0.0.1:{kafka_port}",
            "api",
            "--port",
            str(api_port),
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ],
        env={**os.environ, "WALLET_RUN_DIR": str(tmp_path / "run")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline_s = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"https://127.0.0.1:{api_port}/healthz", verify=trusted, timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline_s, "wallet api did not serve HTTPS"
                time.sleep(0.2)
        assert (health.status_code, health.json()["status"]) == (200, "ok")
        refused = httpx.get(f"https://127.0.0.1:{api_port}/v1/transactions/t", verify=trusted, timeout=5)
        assert refused.status_code == 401
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert f"https://127.0.0.1:{api_port}" in output
