"""Real tokens for the API tests: one HS256 test secret, signed exactly as `wallet auth token` signs."""

from __future__ import annotations

from producers.auth import SCOPES, AuthConfig, issue_token

TEST_SECRET = "test-secret-" + "0123456789abcdef" * 4
ALL_SCOPES = " ".join(SCOPES)


def auth_config() -> AuthConfig:
    return AuthConfig(enabled=True, secret=TEST_SECRET)


def token(sub: str, scope: str, **options) -> str:
    return issue_token(TEST_SECRET, sub, scope, **options)


def bearer(sub: str = "tester", scope: str = ALL_SCOPES, **options) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, scope, **options)}"}
