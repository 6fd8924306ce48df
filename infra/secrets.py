"""Secrets the local stack generates once per run folder and production passes in.

Both live outside the repository: the run folder (`WALLET_RUN_DIR`, git-ignored) keeps files
readable by their owner only; an environment variable, when set, wins over the file.
- the saga-leg MAC keys, held by processors only (`WALLET_LEG_KEYS="kid:hex,kid:hex"`, the first
  signs, every one verifies, so keys rotate by prepending a new one);
- the HS256 secret that signs the local API's bearer tokens (`WALLET_JWT_SECRET`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from infra.settings import Settings

LEG_KEYS_ENV = "WALLET_LEG_KEYS"
JWT_SECRET_ENV = "WALLET_JWT_SECRET"
_KEY_BYTES = 32


def _secret_file(path: Path, make: str) -> str:
    """The file's text, written first (mode 0600, atomically) if it does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = path.with_suffix(f".{os.getpid()}.tmp")
        descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(make)
        try:
            os.link(fresh, path)  # fails if another process won the race: keep theirs
        except FileExistsError:
            pass
        finally:
            fresh.unlink()
    return path.read_text().strip()


def leg_keys_text(settings: Settings) -> str:
    """`kid:hex[,kid:hex...]`: the processors' leg MAC keys, the signing one first."""
    configured = os.environ.get(LEG_KEYS_ENV, "").strip()
    if configured:
        return configured
    return _secret_file(settings.run_dir / "secrets" / "leg-keys", f"k1:{secrets.token_hex(_KEY_BYTES)}")


def jwt_secret(settings: Settings) -> str:
    """The HS256 secret of locally signed tokens."""
    configured = os.environ.get(JWT_SECRET_ENV, "").strip()
    if configured:
        return configured
    return _secret_file(settings.run_dir / "secrets" / "jwt-hs256", secrets.token_hex(_KEY_BYTES))
