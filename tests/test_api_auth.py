"""Who may do what, through the HTTP API with real tokens, against the real broker, a real
processor and the read model: 401 and 403 publish nothing, every command carries its caller as
actor, users read only what they own, the bank deposits, the operator freezes, the auditor reads
everything and moves nothing, and a burst over the rate limit gets 429 and then recovers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from confluent_kafka import Consumer, TopicPartition
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from consumers.readmodel.store import ReadModelStore
from infra.settings import Settings
from producers.auth import (
    LOCAL_ISSUER,
    TOKEN_CACHE_TTL_S,
    AuthConfig,
    AuthError,
    RateLimiter,
    RateLimits,
    TokenVerifier,
    issue_token,
)
from schemas.codec import decode_command
from schemas.outcomes import Reason
from schemas.partitioning import partition_for
from tests.support.api_callers import HTTP_TIMEOUT_S, Caller, open_account, served_api, unique_id
from tests.support.api_callers import people as callers
from tests.support.auth import TEST_SECRET, auth_config, bearer, token
from tests.support.processes import ProcessorProcess
from tests.support.serving import serving_in_thread
from wallet.api_app import create_app

pytest.register_assert_rewrite("tests.readmodel_fixtures")
from tests.readmodel_fixtures import consume_until_caught_up  # noqa: E402

WATERMARK_TIMEOUT_S = 10
LOG_READ_TIMEOUT_S = 30
TRANSFER_PATH = "/v1/wallet/balance_transfer"


@pytest.fixture(scope="module")
def processor(wallet_settings: Settings):
    process = ProcessorProcess(wallet_settings, "auth-1").start().wait_until_assigned()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def readmodel_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('auth-readmodel') / 'readmodel.db'}"


@pytest.fixture(scope="module")
def api(wallet_settings: Settings, processor: ProcessorProcess, readmodel_db: str) -> Iterator[httpx.Client]:
    with served_api(wallet_settings, readmodel_db) as client:
        yield client


@pytest.fixture(scope="module")
def people(api: httpx.Client) -> dict[str, Caller]:
    return callers(api)


def _commands_end_offsets(settings: Settings) -> list[int]:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap, "group.id": unique_id("watermarks")})
    try:
        return [
            consumer.get_watermark_offsets(
                TopicPartition(settings.commands_topic, partition), timeout=WATERMARK_TIMEOUT_S, cached=False
            )[1]
            for partition in range(settings.partitions)
        ]
    finally:
        consumer.close()


def _logged_command(settings: Settings, account_id: str, transaction_id: str):
    """The client command with this transaction id on the account's partition of wallet.commands."""
    partition = partition_for(account_id, settings.partitions)
    end = _commands_end_offsets(settings)[partition]
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap,
            "group.id": unique_id("reader"),
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(settings.commands_topic, partition, 0)])
    deadline_s = time.monotonic() + LOG_READ_TIMEOUT_S
    try:
        offset = 0
        while offset < end and time.monotonic() < deadline_s:
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    continue
                offset = (message.offset() or 0) + 1
                command = decode_command(message.value() or b"")
                if command.transaction_id == transaction_id and getattr(command, "role", None) is not None:
                    return command
        raise AssertionError(f"{transaction_id} is not on {settings.commands_topic}[{partition}]")
    finally:
        consumer.close()


# -- authentication: nothing without a valid token reaches Kafka --------------------------------


def _bad_headers() -> dict[str, dict[str, str]]:
    now_s = time.time()
    return {
        "no token": {},
        "not bearer": {"Authorization": f"Basic {token('alice', 'wallet:user')}"},
        "malformed": {"Authorization": "Bearer not.a.jwt"},
        "bad signature": {"Authorization": f"Bearer {issue_token('another-' + 'x' * 40, 'alice', 'wallet:user')}"},
        "expired": {"Authorization": f"Bearer {token('alice', 'wallet:user', ttl_s=60, now_s=now_s - 3600)}"},
        "not yet valid": {"Authorization": f"Bearer {token('alice', 'wallet:user', not_before_s=now_s + 3600)}"},
        "no sub": {
            "Authorization": "Bearer "
            + jwt.encode({"scope": "wallet:user", "exp": int(now_s) + 60}, TEST_SECRET, algorithm="HS256")
        },
        "alg none": {
            "Authorization": "Bearer "
            + jwt.encode({"sub": "alice", "scope": "wallet:user", "exp": int(now_s) + 60}, "", algorithm="none")
        },
    }


def test_requests_without_a_valid_token_get_401_and_publish_nothing(
    api: httpx.Client, wallet_settings: Settings
) -> None:
    before = _commands_end_offsets(wallet_settings)
    body = {
        "from_account": "a",
        "to_account": "b",
        "amount": "1.00",
        "currency": "USD",
        "transaction_id": unique_id("t"),
    }
    for what, headers in _bad_headers().items():
        for method, path, payload in (
            ("POST", TRANSFER_PATH, body),
            ("GET", "/v1/accounts/a", None),
            ("GET", "/v1/transactions/t", None),
        ):
            response = api.request(method, path, json=payload, headers=headers)
            assert response.status_code == 401, (what, path, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer"), what
            assert set(response.json()) == {"error", "message", "errors"} and response.json()["error"] == "unauthorized"
    assert _commands_end_offsets(wallet_settings) == before


def test_a_valid_token_without_the_scope_gets_403_and_publishes_nothing(
    api: httpx.Client, people: dict[str, Caller], wallet_settings: Settings
) -> None:
    alice, bank, operator = people["alice"], people["bank"], people["operator"]
    money = {"amount": "1.00", "currency": "USD"}
    refused = [
        (alice, "/v1/accounts/x/deposit", money),
        (alice, "/v1/accounts/x/freeze", {}),
        (alice, "/v1/accounts/x/close", {}),
        (bank, TRANSFER_PATH, {"from_account": "x", "to_account": "y", **money}),
        (bank, "/v1/accounts", {"account_id": "x", "currency": "USD"}),
        (bank, "/v1/accounts/x/unfreeze", {}),
        (operator, "/v1/accounts/x/deposit", money),
        (operator, "/v1/accounts/x/withdraw", money),
        (operator, TRANSFER_PATH, {"from_account": "x", "to_account": "y", **money}),
    ]
    before = _commands_end_offsets(wallet_settings)
    for caller, path, body in refused:
        response = caller.post(path, body)
        assert (response.status_code, response.json()["error"]) == (403, "forbidden"), (caller.sub, path)
        assert "insufficient_scope" in response.headers["www-authenticate"]
    assert _commands_end_offsets(wallet_settings) == before


def test_the_auditor_reads_everything_and_moves_nothing(
    api: httpx.Client, people: dict[str, Caller], wallet_settings: Settings, readmodel_db: str
) -> None:
    alice, bob, bank, auditor = people["alice"], people["bob"], people["bank"], people["auditor"]
    accounts = [open_account(alice, bank, "5.00"), open_account(bob, bank, "7.00")]
    with ReadModelStore(readmodel_db) as store:
        consume_until_caught_up(store, wallet_settings)
    assert [auditor.get(f"/v1/accounts/{a}").json()["balance"] for a in accounts] == ["5.00", "7.00"]
    assert all(auditor.get(f"/v1/accounts/{a}/transactions").status_code == 200 for a in accounts)
    before = _commands_end_offsets(wallet_settings)
    money = {"amount": "1.00", "currency": "USD"}
    for path, body in (
        (TRANSFER_PATH, {"from_account": accounts[0], "to_account": accounts[1], **money}),
        ("/v1/accounts", {"account_id": unique_id("audit-acct"), "currency": "USD"}),
        (f"/v1/accounts/{accounts[0]}/deposit", money),
        (f"/v1/accounts/{accounts[0]}/withdraw", money),
        (f"/v1/accounts/{accounts[0]}/freeze", {}),
        (f"/v1/accounts/{accounts[0]}/close", {}),
    ):
        assert auditor.post(path, body).status_code == 403, path
    assert _commands_end_offsets(wallet_settings) == before


# -- authorization: the caller is the actor; users move only their own money ------------------------


def test_every_command_carries_the_token_subject_as_actor_and_the_scope_as_role(
    api: httpx.Client, people: dict[str, Caller], wallet_settings: Settings
) -> None:
    alice, bank, operator = people["alice"], people["bank"], people["operator"]
    account = unique_id("actor-acct")
    opening = alice.post("/v1/accounts", {"account_id": account, "currency": "USD", "actor": "mallory"})
    assert (opening.status_code, opening.json()["errors"][0]["reason"]) == (422, "unknown_field")
    steps = [
        (alice, "/v1/accounts", {"account_id": account, "currency": "USD"}, "user"),
        (bank, f"/v1/accounts/{account}/deposit", {"amount": "3.00", "currency": "USD"}, "bank"),
        (operator, f"/v1/accounts/{account}/freeze", {}, "operator"),
    ]
    for caller, path, body, role in steps:
        transaction_id = unique_id("actor-tx")
        assert caller.command(path, {**body, "transaction_id": transaction_id})["status"] == "success"
        logged = _logged_command(wallet_settings, account, transaction_id)
        assert (logged.actor, logged.role) == (caller.sub, role)


def test_the_bank_deposits_and_the_operator_freezes(
    api: httpx.Client, people: dict[str, Caller], wallet_settings: Settings, readmodel_db: str
) -> None:
    alice, bank, operator = people["alice"], people["bank"], people["operator"]
    account = open_account(alice, bank, "10.00")
    withdrawn = bank.command(f"/v1/accounts/{account}/withdraw", {"amount": "1.00", "currency": "USD"})
    assert withdrawn["status"] == "success"
    assert operator.command(f"/v1/accounts/{account}/freeze", {})["status"] == "success"
    frozen = alice.command(
        TRANSFER_PATH,
        {"from_account": account, "to_account": open_account(people["bob"], bank), "amount": "1.00", "currency": "USD"},
    )
    assert (frozen["status"], frozen["reason"]) == ("failure", "account_frozen")
    with ReadModelStore(readmodel_db) as store:
        consume_until_caught_up(store, wallet_settings)
    view = operator.get(f"/v1/accounts/{account}").json()
    assert (view["status"], view["balance"]) == ("frozen", "9.00")


def test_a_user_moves_money_to_anyone_but_out_of_its_own_accounts_only(
    api: httpx.Client, people: dict[str, Caller], wallet_settings: Settings
) -> None:
    alice, bob, bank = people["alice"], people["bob"], people["bank"]
    alices, bobs = open_account(alice, bank, "10.00"), open_account(bob, bank, "10.00")
    paid = alice.command(
        TRANSFER_PATH, {"from_account": alices, "to_account": bobs, "amount": "2.00", "currency": "USD"}
    )
    assert paid["status"] == "success"
    core_decides = hasattr(Reason, "NOT_AUTHORIZED")  # contract v2's core refuses a debit by a non-owner
    for path, body in (
        (TRANSFER_PATH, {"from_account": bobs, "to_account": alices}),
        (TRANSFER_PATH, {"from_account": bobs, "to_account": alices, "merchant_payment": True}),
        (f"/v1/accounts/{bobs}/withdraw", {}),
    ):
        transaction_id = unique_id("steal")
        response = alice.post(path, {"amount": "1.00", "currency": "USD", "transaction_id": transaction_id, **body})
        assert response.status_code == 200, response.text
        logged = _logged_command(wallet_settings, bobs, transaction_id)
        assert (logged.actor, logged.role) == (alice.sub, "user"), "the log says who asked"
        if core_decides:
            assert (response.json()["status"], response.json()["reason"]) == ("failure", "not_authorized")


def test_a_user_cannot_read_another_users_account_history_or_requests(
    api: httpx.Client, people: dict[str, Caller], wallet_settings: Settings, readmodel_db: str
) -> None:
    alice, bob, bank = people["alice"], people["bob"], people["bank"]
    alices, bobs = open_account(alice, bank, "4.00"), open_account(bob, bank, "4.00")
    transaction_id = unique_id("bobs-tx")
    assert (
        bob.command(
            TRANSFER_PATH,
            {
                "from_account": bobs,
                "to_account": alices,
                "amount": "1.00",
                "currency": "USD",
                "transaction_id": transaction_id,
            },
        )["status"]
        == "success"
    )
    with ReadModelStore(readmodel_db) as store:
        consume_until_caught_up(store, wallet_settings)
    assert alice.get(f"/v1/accounts/{alices}").json()["balance"] == "5.00"
    assert bob.get(f"/v1/accounts/{bobs}").json()["balance"] == "3.00"
    for path in (f"/v1/accounts/{bobs}", f"/v1/accounts/{bobs}/transactions"):
        response = alice.get(path)
        assert (response.status_code, response.json()["error"]) == (404, "account_not_found"), path
    assert bob.get(f"/v1/transactions/{transaction_id}").json()["status"] == "success"
    assert bob.get(f"/v1/transactions/{transaction_id}", account_id=bobs).json()["status"] == "success"
    assert alice.get(f"/v1/transactions/{transaction_id}").json()["status"] == "unknown"
    assert alice.get(f"/v1/transactions/{transaction_id}", account_id=bobs).json()["status"] == "unknown"
    assert people["operator"].get(f"/v1/transactions/{transaction_id}").json()["status"] == "success"


# -- rate limits ----------------------------------------------------------------------------------


def test_a_burst_over_the_rate_limit_gets_429_and_recovers_after_retry_after(
    wallet_settings: Settings, tmp_path: Path
) -> None:
    app = create_app(
        wallet_settings,
        readmodel_db=f"sqlite:///{tmp_path / 'rm.db'}",
        auth=auth_config(),
        rate_limits=RateLimits(rate_per_s=1, burst=5),
    )
    headers, other = bearer("bursty", "wallet:user"), bearer("calm", "wallet:user")
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        started_s = time.monotonic()
        statuses = [client.get("/v1/transactions/t-1", headers=headers).status_code for _ in range(8)]
        elapsed_s = time.monotonic() - started_s
        # The bucket refills at 1 request/s while the burst is sent: a slow machine earns a token
        # per second it takes; an unlimited API answers all eight.
        assert statuses[:5] == [200] * 5
        assert statuses.count(429) >= 3 - math.ceil(elapsed_s), (statuses, elapsed_s)
        for _ in range(10):  # bounded: each request spends the token a slow one may have earned
            limited = client.get("/v1/transactions/t-1", headers=headers)
            if limited.status_code == 429:
                break
        assert limited.json()["error"] == "rate_limited"
        retry_after_s = int(limited.headers["retry-after"])
        assert 1 <= retry_after_s <= 2
        assert client.get("/v1/transactions/t-1", headers=other).status_code == 200, "limits are per principal"
        time.sleep(retry_after_s)
        assert client.get("/v1/transactions/t-1", headers=headers).status_code == 200


def test_a_principal_has_a_bound_on_requests_waiting_at_once() -> None:
    limiter = RateLimiter(RateLimits(rate_per_s=100, burst=100, concurrent_waits_max=2))
    assert limiter.enter_wait("a") and limiter.enter_wait("a")
    assert not limiter.enter_wait("a")
    assert limiter.enter_wait("b"), "another principal is not affected"
    limiter.leave_wait("a")
    assert limiter.enter_wait("a")


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now_s = [100.0]
    limiter = RateLimiter(RateLimits(rate_per_s=10, burst=3), clock=lambda: now_s[0])
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    assert limiter.take("a") == pytest.approx(0.1)
    now_s[0] += 0.1
    assert limiter.take("a") is None
    now_s[0] += 60
    assert [limiter.take("a") is None for _ in range(4)] == [True, True, True, False]


# -- verified tokens are remembered, but never past their expiry or the cache's life ---------------


def _verifier_at(now_s: list[float]) -> TokenVerifier:
    return TokenVerifier(auth_config(), clock=lambda: now_s[0])


def test_a_remembered_token_still_expires() -> None:
    now_s = [time.time()]
    verifier = _verifier_at(now_s)
    header = f"Bearer {token('alice', 'wallet:user', ttl_s=120)}"
    assert verifier.principal(header).sub == "alice"
    now_s[0] += 120 + verifier.config.leeway_s - 1
    assert verifier.principal(header).sub == "alice", "inside exp plus the leeway"
    now_s[0] += 2
    with pytest.raises(AuthError, match="expired"):
        verifier.principal(header)


@pytest.mark.parametrize(
    ("claims", "refused"),
    [
        ({"sub": "alice", "exp": str(int(time.time()) + 600)}, "exp must be a number"),
        ({"sub": "alice\ud800", "exp": int(time.time()) + 600}, "UTF-8"),
        ({"sub": "local:alice", "exp": int(time.time()) + 600}, "local edges"),
        ({"sub": "alice", "exp": int(time.time()) + 600, "nbf": str(int(time.time()) - 60)}, "nbf must be a number"),
        ({"sub": "alice", "exp": int(time.time()) + 600, "iat": str(int(time.time()))}, "iat must be a number"),
    ],
    ids=[
        "exp as a numeric string",
        "sub with a lone surrogate",
        "sub of a local edge's actor",
        "nbf as a numeric string",
        "iat as a numeric string",
    ],
)
def test_a_signed_token_with_claims_the_api_cannot_take_is_refused_not_a_500(claims: dict, refused: str) -> None:
    # Each is signed by the trusted key and accepted by PyJWT. The first two then raised: TypeError
    # on the remembered expiry, UnicodeEncodeError in the command's digest and the read model's
    # query. The third would act as the owner of every account a local edge opened as "alice".
    signed = jwt.encode({**claims, "iss": LOCAL_ISSUER, "scope": "wallet:user"}, TEST_SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match=refused):
        _verifier_at([time.time()]).principal(f"Bearer {signed}")


def test_a_remembered_token_does_not_vouch_for_the_same_claims_with_another_signature() -> None:
    verifier = _verifier_at([time.time()])
    signed = token("alice", "wallet:user")
    assert verifier.principal(f"Bearer {signed}").sub == "alice"
    forged = signed[: signed.rindex(".") + 1] + base64.urlsafe_b64encode(b"x" * 32).rstrip(b"=").decode()
    with pytest.raises(AuthError, match="signature"):
        verifier.principal(f"Bearer {forged}")


def test_a_withdrawn_key_stops_verifying_remembered_tokens_after_the_cache_life(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("producers.auth.TOKENS_CACHED_MAX", 2)
    now_s = [time.time()]
    verifier = _verifier_at(now_s)
    headers = [f"Bearer {token(sub, 'wallet:user')}" for sub in ("a", "b", "c")]
    for header in headers:
        verifier.principal(header)
    verifier.config = AuthConfig(enabled=True, secret="rotated-" + "f" * 56)  # the old key is withdrawn
    with pytest.raises(AuthError, match="signature"):
        verifier.principal(headers[0])  # the least recently used, forgotten beyond the bound
    assert verifier.principal(headers[2]).sub == "c", "remembered within the cache's life"
    now_s[0] += TOKEN_CACHE_TTL_S
    with pytest.raises(AuthError, match="signature"):
        verifier.principal(headers[2])


# -- keys of an external identity provider ---------------------------------------------------------


def _claims(**extra) -> dict:
    return {"sub": "idp-user", "scope": "wallet:user wallet:audit", "exp": int(time.time()) + 60, **extra}


def _hs256_by_hand(claims: dict, key: bytes) -> str:
    # PyJWT itself refuses to HMAC with a PEM key, so the attacker's token is made by hand.
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    signing_input = f"{b64(header)}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


def test_an_rs256_token_verifies_with_the_configured_public_key_and_hs256_cannot_impersonate_it() -> None:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    verifier = TokenVerifier(AuthConfig(enabled=True, public_key=public_pem, audience="wallet"))
    signed = jwt.encode(_claims(aud="wallet"), private_key, algorithm="RS256")
    principal = verifier.principal(f"Bearer {signed}")
    assert (principal.sub, principal.scopes) == ("idp-user", frozenset({"wallet:user", "wallet:audit"}))
    with pytest.raises(AuthError, match="(?i)audience"):
        verifier.principal(f"Bearer {jwt.encode(_claims(aud='elsewhere'), private_key, algorithm='RS256')}")
    # The classic confusion attack: an HS256 token "signed" with the public key as its secret.
    forged = _hs256_by_hand(_claims(aud="wallet"), public_pem.encode())
    with pytest.raises(AuthError):
        verifier.principal(f"Bearer {forged}")


def test_an_es256_token_verifies_with_a_key_from_the_identity_providers_jwks_url() -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key()))
    document = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "ES256"}]}).encode()

    class Keys(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *_) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        verifier = TokenVerifier(AuthConfig(enabled=True, jwks_url=f"http://127.0.0.1:{server.server_port}/jwks"))
        signed = jwt.encode(_claims(), private_key, algorithm="ES256", headers={"kid": "k1"})
        assert verifier.principal(f"Bearer {signed}").sub == "idp-user"
        unknown = jwt.encode(
            _claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "k2"}
        )
        with pytest.raises(AuthError):
            verifier.principal(f"Bearer {unknown}")
    finally:
        server.shutdown()
