"""Service-account credentials and the cached bearer tokens signed with them."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# The skyflow extra (deid[skyflow]); vault._load turns a missing one into a ConfigError.
import jwt
import requests
import requests.auth

from ..errors import (
    ConfigError,
    VaultUnavailableError,
)
from ._http import _request_id, _transport
from .settings import ASSERTION_LIFETIME, GRANT_TYPE, _is_loopback

# ---------------------------------------------------------------------------------------
# credentials and bearer tokens


@dataclass(frozen=True)
class Credentials:
    """A Skyflow service account key. repr() never shows the private key."""

    client_id: str
    key_id: str
    token_uri: str
    private_key: str = field(repr=False)
    source: str = "memory"

    @classmethod
    def from_json(cls, text: str, source: str) -> Credentials:
        try:
            doc = json.loads(text)
            creds = cls(str(doc["clientID"]), str(doc["keyID"]), str(doc["tokenURI"]),
                        str(doc["privateKey"]), source)
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"deid skyflow: {source} is not a Skyflow service account "
                              "credentials file (JSON with clientID, keyID, tokenURI, "
                              "privateKey)") from None
        uri = urlsplit(creds.token_uri)
        if uri.scheme != "https" and not (uri.scheme == "http" and _is_loopback(uri.hostname)):
            raise ConfigError(f"deid skyflow: {source}: tokenURI must be an https URL")
        return creds


def load_credentials(spec: str) -> Credentials:
    """From a file path, ``secretsmanager:<arn or name>`` (Lambda), or ``env:<VARIABLE>``."""
    if spec.startswith("secretsmanager:"):
        secret_id = spec.partition(":")[2]
        try:
            import boto3

            region = secret_id.split(":")[3] if secret_id.startswith("arn:") else None
            client = boto3.client("secretsmanager", region_name=region or None)
            text = client.get_secret_value(SecretId=secret_id)["SecretString"]
        except ImportError:
            raise ConfigError("deid skyflow: credentials=secretsmanager: needs boto3 "
                              "(install deid[redshift])") from None
        except Exception as exc:
            raise ConfigError(f"deid skyflow: cannot read the credentials secret from AWS "
                              f"Secrets Manager ({exc.__class__.__name__}); check the ARN and "
                              "the role's secretsmanager:GetSecretValue permission") from None
        return Credentials.from_json(text, "the Secrets Manager secret")
    if spec.startswith("env:"):
        import os

        name = spec[4:]
        text = os.environ.get(name)
        if not text:
            raise ConfigError(f"deid skyflow: environment variable {name} is not set")
        return Credentials.from_json(text, f"environment variable {name}")
    path = Path(spec)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"deid skyflow: cannot read the credentials file {path} "
                          f"({exc.__class__.__name__})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # The same rule as deid's key files: a private key others can read is not private.
        raise ConfigError(f"deid skyflow: the credentials file {path} is readable by group or "
                          f"others; run: chmod 600 {path}")
    return Credentials.from_json(text, f"credentials file {path}")


class TokenProvider:
    """Bearer tokens per (role scope, ctx), cached until `refresh_margin` before expiry.

    One lock per cache key: concurrent callers wanting the same token wait for one exchange;
    callers with another ctx do not wait for them.
    """

    _MAX_ENTRIES = 256

    def __init__(self, credentials: Credentials, session: requests.Session, *,
                 timeout: tuple[float, float], refresh_margin: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._creds = credentials
        self._session = session
        self._timeout = timeout
        self._margin = refresh_margin
        self._clock = clock
        self._cache: OrderedDict[tuple[str | None, str | None], tuple[str, float]] = OrderedDict()
        self._locks: dict[tuple[str | None, str | None], threading.Lock] = {}
        self._guard = threading.Lock()
        self.exchanges = 0

    def bearer(self, scope: str | None, ctx: dict[str, str] | None) -> str:
        key = (scope, json.dumps(ctx, sort_keys=True) if ctx else None)
        hit = self._fresh(key)
        if hit:
            return hit
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            hit = self._fresh(key)
            if hit:
                return hit
            token, expires = self._exchange(scope, ctx)
            with self._guard:
                self._cache[key] = (token, expires)
                self._cache.move_to_end(key)
                while len(self._cache) > self._MAX_ENTRIES:
                    old, _ = self._cache.popitem(last=False)
                    self._locks.pop(old, None)
            return token

    def invalidate(self, token: str) -> None:
        """Forget a bearer token the vault refused (revoked, or expired early)."""
        with self._guard:
            for key, (cached, _) in list(self._cache.items()):
                if cached == token:
                    del self._cache[key]

    def _fresh(self, key: tuple[str | None, str | None]) -> str | None:
        with self._guard:
            entry = self._cache.get(key)
        if entry and entry[1] - self._margin > self._clock():
            return entry[0]
        return None

    def _exchange(self, scope: str | None, ctx: dict[str, str] | None) -> tuple[str, float]:
        c = self._creds
        now = int(self._clock())
        claims: dict[str, Any] = {"iss": c.client_id, "key": c.key_id, "aud": c.token_uri,
                                  "sub": c.client_id, "exp": now + ASSERTION_LIFETIME}
        if ctx:
            claims["ctx"] = ctx
        try:
            assertion = jwt.encode(claims, c.private_key, algorithm="RS256")
        except Exception:
            raise ConfigError(f"deid skyflow: cannot sign the JWT assertion with the private "
                              f"key in {c.source} (is privateKey an RSA PEM key?)") from None
        body: dict[str, str] = {"grant_type": GRANT_TYPE, "assertion": assertion}
        if scope:
            body["scope"] = scope
        try:
            resp = self._session.post(c.token_uri, json=body, timeout=self._timeout,
                                      allow_redirects=False)
        except requests.RequestException as exc:
            raise VaultUnavailableError(
                f"deid skyflow: the token exchange failed ({_transport(exc)}); check "
                "network access to the credentials' tokenURI") from None
        self.exchanges += 1
        if resp.status_code != 200:
            hint = (" (the service account key was refused: check keyID/privateKey and that "
                    "the service account is active)" if resp.status_code in (400, 401, 403)
                    else "")
            raise VaultUnavailableError(
                f"deid skyflow: the token exchange failed: HTTP {resp.status_code}"
                f"{_request_id(resp)}{hint}")
        try:
            doc = resp.json()
            token = doc["accessToken"]
            if not isinstance(token, str) or not token:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise VaultUnavailableError("deid skyflow: the token exchange returned no "
                                        "accessToken (malformed response)") from None
        if str(doc.get("tokenType", "Bearer")).lower() != "bearer":
            raise VaultUnavailableError("deid skyflow: the token exchange returned a token "
                                        "type other than Bearer")
        return token, self._expiry(token, now)

    @staticmethod
    def _expiry(token: str, now: int) -> float:
        # Skyflow's access tokens are JWTs: read exp without verifying (the vault verifies).
        try:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
            if isinstance(exp, int | float):
                return float(exp)
        except jwt.PyJWTError:
            pass
        return float(now + ASSERTION_LIFETIME)
