"""Skyflow's vault as a deid token service, over Skyflow's v1 data API (REST).

``DEID_VAULT=skyflow://<cluster>.vault.skyflowapis.com/<vault_id>?credentials=…&policy=…``
makes every host (DuckDB plugin, Lambda handlers, plpython3u) tokenize and detokenize through
Skyflow. The warehouse then holds Skyflow tokens; Skyflow holds the values.

- tokenize: values are normalized by deid's kind rules, deduplicated, then inserted with
  ``tokenization: true`` and ``upsert`` on the kind's unique column, so a re-run or a retried
  batch updates the existing record instead of adding a second one. ``mode=lookup`` uses
  ``/tokenize`` instead (values must already be in the vault; nothing is inserted).
- detokenize: ``/detokenize`` with ``redaction: PLAIN_TEXT`` and ``continueOnError: false``;
  the deid-side policy and hash-chained audit (``policy=<deid vault URL>``) run first, and the
  bearer token carries a ``ctx`` claim with the warehouse user so Skyflow's audit shows who
  re-identified.
- fail closed: a per-record error, an HTTP error after retries, a timeout, a malformed or
  short response fails the whole batch; the error names the operation, kind and HTTP status,
  never a value or a token, and never Skyflow's own message (which may echo the value).

URL parameters are documented in docs/skyflow.md and in `SkyflowSettings`.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import logging
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# The skyflow extra (deid[skyflow]); vault._load turns a missing one into a ConfigError.
import jwt
import requests
import requests.auth
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as urllib3_exc
from urllib3.util.retry import Retry

from . import kinds as _kinds
from .cache import BoundedCache
from .errors import (
    ConfigError,
    DeidError,
    InvalidValueError,
    PermissionDeniedError,
    UnknownTokenError,
    VaultUnavailableError,
)
from .store import VaultStore

log = logging.getLogger("deid.skyflow")

# Conservative defaults: small requests keep each one well under Skyflow's request limits
# and a UDF call's deadline; every one is a URL parameter (docs/skyflow.md).
DEFAULT_BATCH_SIZE = 25
DEFAULT_DETOKENIZE_BATCH_SIZE = 25
DEFAULT_CONCURRENCY = 4
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 0.5
DEFAULT_MAX_RETRY_AFTER = 30.0
DEFAULT_REFRESH_MARGIN = 300.0
ASSERTION_LIFETIME = 3600
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"

# kind spec -> (table, column). The Quickstart vault's persons and credit_cards tables, plus
# columns a deid schema adds (docs/skyflow.md has the full vault schema).
DEFAULT_MAPPING: dict[str, tuple[str, str]] = {
    "email": ("persons", "email"),
    "phone": ("persons", "phone_number"),
    "ssn": ("persons", "ssn"),
    "name": ("persons", "name"),
    "address": ("persons", "address"),
    "date": ("persons", "date_of_birth"),
    "card": ("credit_cards", "card_number"),
    "string": ("deid_strings", "value"),
}

_RETRY_STATUSES = (409, 429, 500, 502, 503, 504)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_VAULT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_MAX_TOKEN_CHARS = 4096


# ---------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, slots=True)
class Target:
    """Where one kind spec lives in the Skyflow vault."""

    table: str
    column: str
    column_group: str | None = None


@dataclass(frozen=True)
class SkyflowSettings:
    """Everything the URL says, parsed once at the host's edge."""

    vault_url: str  # https://<cluster>.vault.skyflowapis.com/v1/vaults/<vault_id>
    vault_id: str
    credentials: str  # a file path, secretsmanager:<arn>, or env:<VAR>
    mapping: dict[str, Target]
    policy: str | None = None  # a deid vault URL, "skyflow" (delegate), or None (refuse)
    mode: str = "upsert"  # or "lookup"
    batch_size: int = DEFAULT_BATCH_SIZE
    detokenize_batch_size: int = DEFAULT_DETOKENIZE_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    refresh_margin: float = DEFAULT_REFRESH_MARGIN
    ctx: str = "user"  # none | user | user+query
    tokenize_role: str | None = None
    detokenize_role: str | None = None
    cache_size: int = 1_000_000

    @property
    def label(self) -> str:
        """The vault without parameters, for audit records and messages."""
        return self.vault_url


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ConfigError(f"deid skyflow: URL parameter {name!r} is given more than once")
    return values[0]


def _number(params: dict[str, list[str]], name: str, default: float, *, lo: float, hi: float,
            integer: bool = False) -> Any:
    raw = _one(params, name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"deid skyflow: URL parameter {name!r} must be a number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"deid skyflow: URL parameter {name!r} must be between {lo} and {hi}")
    return value


_KNOWN_PARAMS = {
    "credentials", "mapping", "policy", "mode", "batch_size", "detokenize_batch_size",
    "concurrency", "connect_timeout", "timeout", "retries", "backoff", "max_retry_after",
    "refresh_margin", "ctx", "tokenize_role", "detokenize_role", "scheme",
}


def parse_url(url: str, *, cache_size: int = 1_000_000) -> SkyflowSettings:
    """``skyflow://<host>/<vault_id>?credentials=…`` → settings; ConfigError names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "skyflow":
        raise ConfigError("deid skyflow: the vault URL must start with skyflow://")
    params = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(params) - _KNOWN_PARAMS)
    if unknown:
        raise ConfigError(f"deid skyflow: unknown URL parameter(s) {', '.join(unknown)}; "
                          f"expected some of {', '.join(sorted(_KNOWN_PARAMS))}")
    host = parts.hostname
    if not host:
        raise ConfigError("deid skyflow: the URL names no host "
                          "(skyflow://<cluster>.vault.skyflowapis.com/<vault_id>)")
    vault_id = parts.path.strip("/")
    if not _VAULT_ID.fullmatch(vault_id):
        raise ConfigError("deid skyflow: the URL path must be the vault ID "
                          "(skyflow://<cluster>.vault.skyflowapis.com/<vault_id>)")
    scheme = (_one(params, "scheme") or "https").lower()
    if scheme not in ("https", "http"):
        raise ConfigError("deid skyflow: scheme must be https (or http for a local test server)")
    if scheme == "http" and not _is_loopback(host):
        raise ConfigError("deid skyflow: scheme=http is only for a test server on this machine "
                          "(127.0.0.1, ::1 or localhost); a real vault needs https")
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host:
        netloc = f"[{host}]" + ("" if parts.port is None else f":{parts.port}")
    credentials = _one(params, "credentials")
    if not credentials:
        raise ConfigError("deid skyflow: add credentials=<path to the service account's "
                          "credentials.json> (or credentials=secretsmanager:<arn>, "
                          "credentials=env:<VARIABLE>) to the vault URL")
    mode = _one(params, "mode") or "upsert"
    if mode not in ("upsert", "lookup"):
        raise ConfigError("deid skyflow: mode must be upsert (insert new values) or lookup "
                          "(only values already in the vault)")
    ctx = _one(params, "ctx") or "user"
    if ctx not in ("none", "user", "user+query"):
        raise ConfigError("deid skyflow: ctx must be none, user or user+query")
    policy = _one(params, "policy") or None
    if policy is not None and policy != "skyflow":
        from .vault import scheme_of

        if scheme_of(policy) == "skyflow":
            raise ConfigError("deid skyflow: policy= must be a deid vault URL (sqlite:///…, "
                              "postgresql://…, dynamodb://…) or the word skyflow")
    mapping = load_mapping(_one(params, "mapping"))
    if mode == "lookup" and _one(params, "mapping") is None:
        raise ConfigError("deid skyflow: mode=lookup needs a mapping file that names each "
                          "kind's column_group")
    read_timeout = _number(params, "timeout", DEFAULT_READ_TIMEOUT, lo=0.01, hi=900)
    return SkyflowSettings(
        vault_url=f"{scheme}://{netloc}/v1/vaults/{vault_id}",
        vault_id=vault_id,
        credentials=credentials,
        mapping=mapping,
        policy=policy,
        mode=mode,
        batch_size=_number(params, "batch_size", DEFAULT_BATCH_SIZE, lo=1, hi=1000,
                           integer=True),
        detokenize_batch_size=_number(params, "detokenize_batch_size",
                                      DEFAULT_DETOKENIZE_BATCH_SIZE, lo=1, hi=1000,
                                      integer=True),
        concurrency=_number(params, "concurrency", DEFAULT_CONCURRENCY, lo=1, hi=64,
                            integer=True),
        connect_timeout=_number(params, "connect_timeout", DEFAULT_CONNECT_TIMEOUT,
                                lo=0.01, hi=120),
        read_timeout=read_timeout,
        retries=_number(params, "retries", DEFAULT_RETRIES, lo=0, hi=20, integer=True),
        backoff=_number(params, "backoff", DEFAULT_BACKOFF, lo=0, hi=60),
        max_retry_after=_number(params, "max_retry_after", DEFAULT_MAX_RETRY_AFTER,
                                lo=0, hi=600),
        refresh_margin=_number(params, "refresh_margin", DEFAULT_REFRESH_MARGIN,
                               lo=0, hi=3000),
        ctx=ctx,
        tokenize_role=_one(params, "tokenize_role") or None,
        detokenize_role=_one(params, "detokenize_role") or None,
        cache_size=cache_size,
    )


def _spec_key(spec: _kinds.KindSpec) -> str:
    return spec.name if spec.domain == spec.name else f"{spec.name}:{spec.domain}"


def load_mapping(path: str | None) -> dict[str, Target]:
    """Defaults, overlaid by a JSON or YAML file of ``{"<kind spec>": {table, column,
    column_group?}}`` or ``{"<kind spec>": "table.column"}``."""
    mapping = {k: Target(t, c) for k, (t, c) in DEFAULT_MAPPING.items()}
    if path is None:
        return mapping
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"deid skyflow: cannot read the mapping file {p} "
                          f"({exc.__class__.__name__})") from None
    try:
        if p.suffix.lower() in (".yml", ".yaml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception:  # any parse failure is the same config error
        fmt = "YAML" if p.suffix.lower() in (".yml", ".yaml") else "JSON"
        raise ConfigError(f"deid skyflow: the mapping file {p} is not valid {fmt}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"deid skyflow: the mapping file {p} must map kind specs to columns")
    for key, entry in doc.items():
        try:
            spec = _kinds.parse_kind(str(key))
        except DeidError:
            raise ConfigError(f"deid skyflow: mapping file {p}: {str(key)[:40]!r} is not a "
                              "kind spec (kind or kind:domain)") from None
        if isinstance(entry, str):
            table, _, column = entry.partition(".")
            entry = {"table": table, "column": column}
        if not isinstance(entry, dict):
            raise ConfigError(f"deid skyflow: mapping file {p}: {key!r} must be "
                              "'table.column' or {table, column, column_group}")
        table, column = entry.get("table"), entry.get("column")
        group = entry.get("column_group")
        for what, name in (("table", table), ("column", column)):
            if not isinstance(name, str) or not _IDENT.fullmatch(name):
                raise ConfigError(f"deid skyflow: mapping file {p}: {key!r} has no valid "
                                  f"{what} name (letters, digits, _)")
        if group is not None and (not isinstance(group, str) or not _IDENT.fullmatch(group)):
            raise ConfigError(f"deid skyflow: mapping file {p}: {key!r} has an invalid "
                              "column_group name")
        mapping[_spec_key(spec)] = Target(table, column, group)
    return mapping


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


# ---------------------------------------------------------------------------------------
# HTTP


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:  # never print the token
        return "_Bearer(…)"


def _retry_class(cap: float) -> type[Retry]:
    class CappedRetry(Retry):
        """Honours Retry-After, but never sleeps longer than `max_retry_after` at once: a
        UDF call has a deadline (Lambda, dbt) and a long wait would only time it out."""

        def get_retry_after(self, response: Any) -> float | None:
            value = super().get_retry_after(response)
            return None if value is None else min(value, cap)

    return CappedRetry


def _transport(exc: Exception) -> str:
    # After retries, requests wraps a read timeout in a ConnectionError: look at the reason.
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(exc, requests.Timeout) or isinstance(reason, urllib3_exc.TimeoutError):
        return "timed out"
    if isinstance(exc, requests.exceptions.RetryError):
        return "too many retries"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return exc.__class__.__name__


def _request_id(resp: requests.Response) -> str:
    rid = resp.headers.get("x-request-id")
    if rid and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid):
        return f", Skyflow request id {rid}"
    return ""


def _error_code(resp: requests.Response) -> str:
    """Skyflow's error body is {"error": {grpc_code, http_code, http_status, message, details}}.
    Only the codes are kept: the message may quote the value that was refused."""
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(err, dict):
        return ""
    grpc = err.get("grpc_code")
    status = err.get("http_status")
    out = []
    if isinstance(status, str) and re.fullmatch(r"[A-Za-z ]{1,40}", status):
        out.append(status)
    if isinstance(grpc, int):
        out.append(f"gRPC code {grpc}")
    return f" ({', '.join(out)})" if out else ""


class SkyflowClient:
    """POSTs JSON to the vault with pooled connections, retries and bearer tokens."""

    def __init__(self, settings: SkyflowSettings, credentials: Credentials, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.session = requests.Session()
        retry = _retry_class(settings.max_retry_after)(
            total=settings.retries, connect=settings.retries, read=settings.retries,
            status=settings.retries, other=0,
            backoff_factor=settings.backoff, backoff_max=max(settings.backoff * 16, 1.0),
            # 409: two writers upserting one new value at once (two dbt models tokenizing
            # the same customer ids); the retry finds the record and updates it.
            status_forcelist=_RETRY_STATUSES,
            # Every call is idempotent: insert upserts on a unique column, the rest read.
            allowed_methods=frozenset({"POST"}),
            respect_retry_after_header=True, raise_on_status=False,
        )
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(settings.concurrency, 4) * 2,
                              max_retries=retry)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.timeout = (settings.connect_timeout, settings.read_timeout)
        self.tokens = TokenProvider(credentials, self.session, timeout=self.timeout,
                                    refresh_margin=settings.refresh_margin, clock=clock)

    def post(self, path: str, body: dict[str, Any], *, what: str, scope: str | None = None,
             ctx: dict[str, str] | None = None) -> dict[str, Any]:
        """The decoded JSON object of a 200 answer; anything else raises, naming `what`."""
        url = self.settings.vault_url + path
        for attempt in (1, 2):
            bearer = self.tokens.bearer(scope, ctx)
            try:
                # auth= (not a header) so a ~/.netrc entry can never replace the bearer
                # token; no redirects, so the token never follows a 3xx elsewhere.
                resp = self.session.post(url, json=body, timeout=self.timeout,
                                         auth=_Bearer(bearer), allow_redirects=False)
            except requests.RequestException as exc:
                raise VaultUnavailableError(
                    f"{what}: Skyflow {_transport(exc)} after {self.settings.retries} "
                    "retries") from None
            if resp.status_code == 401 and attempt == 1:
                # Revoked or expired early: one fresh token, then give up.
                self.tokens.invalidate(bearer)
                continue
            break
        status = resp.status_code
        log.debug("skyflow %s -> HTTP %s", path.rsplit("/", 1)[-1], status)
        if status != 200:
            detail = f"HTTP {status}{_error_code(resp)}{_request_id(resp)}"
            if status == 403:
                raise PermissionDeniedError(
                    f"{what}: Skyflow refused the service account ({detail}); check its "
                    "roles and the vault's policies")
            if status in (400, 404) and path.endswith("/detokenize"):
                raise UnknownTokenError(
                    f"{what}: Skyflow does not hold a token of the batch ({detail}; the "
                    "token is not shown)")
            raise VaultUnavailableError(f"{what}: Skyflow answered {detail}"
                                        + (" after retries" if status in _RETRY_STATUSES
                                           else ""))
        try:
            doc = resp.json()
        except ValueError:
            raise VaultUnavailableError(f"{what}: Skyflow answered HTTP 200 with a body that "
                                        "is not JSON (malformed response)") from None
        if not isinstance(doc, dict):
            raise VaultUnavailableError(f"{what}: Skyflow answered HTTP 200 with a body that "
                                        "is not a JSON object (malformed response)")
        return doc

    def close(self) -> None:
        self.session.close()


# ---------------------------------------------------------------------------------------
# the token service


def _malformed(what: str, reason: str) -> VaultUnavailableError:
    return VaultUnavailableError(f"{what}: malformed Skyflow response: {reason} "
                                 "(nothing from the batch was used)")


def _records(doc: dict[str, Any], expected: int, what: str) -> list[dict[str, Any]]:
    """The response's records: exactly `expected` JSON objects, in request order."""
    records = doc.get("records")
    if not isinstance(records, list) or len(records) != expected:
        raise _malformed(what, f"expected {expected} records, got "
                         f"{len(records) if isinstance(records, list) else 'none'}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _malformed(what, f"record {i + 1} is not an object")
    return records


class SkyflowTokenService:
    """A `TokenService` over a Skyflow vault. Safe to share between threads."""

    def __init__(self, settings: SkyflowSettings, *, credentials: Credentials | None = None,
                 policy_store: VaultStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.client = SkyflowClient(settings, credentials or load_credentials(
            settings.credentials), clock=clock)
        self._policy = policy_store
        if self._policy is None and settings.policy not in (None, "skyflow"):
            from .vault import open_store

            self._policy = open_store(settings.policy)
        self._keyring = self._policy.keyring() if self._policy is not None else None
        self._cache = BoundedCache(settings.cache_size)
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency,
                                        thread_name_prefix="deid-skyflow")

    # -- helpers ---------------------------------------------------------------------------

    def _target(self, spec: _kinds.KindSpec) -> Target:
        key = _spec_key(spec)
        target = self.settings.mapping.get(key)
        if target is None:
            # Never fall back to the kind's default column: that would link a separate domain.
            raise ConfigError(f"deid.tokenize: kind {key!r} has no Skyflow column; add "
                              f'"{key}": {{"table": …, "column": …}} to the mapping file')
        if self.settings.mode == "lookup" and target.column_group is None:
            raise ConfigError(f"deid.tokenize: kind {key!r}: mode=lookup needs a "
                              "column_group for it in the mapping file")
        return target

    def _map_chunks(self, fn: Callable[[list[str]], list[str]], items: list[str],
                    size: int) -> list[str]:
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        if len(chunks) == 1:
            return fn(chunks[0])
        out: list[str] = []
        for part in self._pool.map(fn, chunks):  # map keeps the chunks' order
            out.extend(part)
        return out

    @staticmethod
    def _scope(role: str | None) -> str | None:
        return f"role:{role}" if role else None

    # -- tokenize ----------------------------------------------------------------------------

    def tokenize(self, kind: str, values: Sequence[str | None], *,
                 column: str | None = None) -> list[str | None]:
        spec = _kinds.parse_kind(kind)
        target = self._target(spec)
        values = values if isinstance(values, list) else list(values)
        # One cache namespace per domain and kind: a value has one token per domain.
        namespace = (spec.domain, spec.name)
        out = self._cache.lookup(namespace, values)
        pending: dict[str, list[int]] = {}
        for i, (v, t) in enumerate(zip(values, out, strict=True)):
            if t is None and v is not None:
                if not isinstance(v, str):
                    raise InvalidValueError(spec.name, "is not text", row=i + 1, column=column)
                pending.setdefault(v, []).append(i)
        if not pending:
            return out
        by_canonical: dict[str, list[str]] = {}
        for raw, rows in pending.items():
            try:
                canonical, _match = _kinds.normalize(spec.kind, raw)
            except _kinds._Invalid as exc:
                raise InvalidValueError(spec.name, str(exc), row=rows[0] + 1,
                                        column=column) from None
            by_canonical.setdefault(canonical, []).append(raw)

        canonicals = list(by_canonical)
        what = f"deid.tokenize: kind {_spec_key(spec)!r}" + (f", column {column!r}"
                                                             if column else "")
        if self.settings.mode == "lookup":
            def call(chunk: list[str]) -> list[str]:
                return self._lookup(target, chunk, what)
        else:
            def call(chunk: list[str]) -> list[str]:
                return self._upsert(target, chunk, what)
        tokens = self._map_chunks(call, canonicals, self.settings.batch_size)
        if len(tokens) != len(canonicals):  # pragma: no cover - guarded per chunk
            raise _malformed(what, "token count differs from value count")
        learned = []
        for canonical, token in zip(canonicals, tokens, strict=True):
            for raw in by_canonical[canonical]:
                learned.append((raw, token))
                for i in pending[raw]:
                    out[i] = token
        self._cache.store(namespace, learned)
        return out

    @staticmethod
    def _check_token(token: Any, value: str, what: str, index: int, target: Target) -> str:
        if not isinstance(token, str) or not token:
            raise _malformed(what, f"record {index + 1} of the request has no token")
        if token == value:
            # The column is not tokenized (or the token type is a pass-through): the
            # warehouse would receive the clear value.
            raise VaultUnavailableError(
                f"{what}: Skyflow returned the value itself as its token for record "
                f"{index + 1}: enable tokenization on {target.table}.{target.column} (fail closed)")
        return token

    def _upsert(self, target: Target, chunk: list[str], what: str) -> list[str]:
        body = {"records": [{"fields": {target.column: v}} for v in chunk],
                "tokenization": True, "upsert": target.column}
        doc = self.client.post(f"/{target.table}", body, what=what,
                               scope=self._scope(self.settings.tokenize_role))
        records = _records(doc, len(chunk), what)
        out = []
        for i, (rec, value) in enumerate(zip(records, chunk, strict=True)):
            if rec.get("error"):
                raise VaultUnavailableError(f"{what}: Skyflow reported an error for record "
                                            f"{i + 1} of the request (the value is not shown)")
            tokens = rec.get("tokens")
            if not isinstance(tokens, dict):
                raise _malformed(what, f"record {i + 1} has no tokens (is tokenization "
                                 "enabled on the column?)")
            out.append(self._check_token(tokens.get(target.column), value, what, i, target))
        return out

    def _lookup(self, target: Target, chunk: list[str], what: str) -> list[str]:
        body = {"tokenizationParameters": [{"value": v, "columnGroup": target.column_group}
                                           for v in chunk]}
        doc = self.client.post("/tokenize", body, what=what,
                               scope=self._scope(self.settings.tokenize_role))
        records = _records(doc, len(chunk), what)
        out = []
        for i, (rec, value) in enumerate(zip(records, chunk, strict=True)):
            if rec.get("error"):
                raise VaultUnavailableError(f"{what}: Skyflow reported an error for record "
                                            f"{i + 1} of the request (the value is not shown; "
                                            "mode=lookup needs values already in the vault)")
            out.append(self._check_token(rec.get("token"), value, what, i, target))
        return out

    # -- detokenize --------------------------------------------------------------------------

    def detokenize(self, tokens: Sequence[str | None], *, principal: str,
                   query_id: str | None = None, host: str | None = None) -> list[str | None]:
        what = "deid.detokenize"
        present = [t for t in tokens if t is not None]
        bad_row = None
        for i, t in enumerate(tokens):
            if t is None:
                continue
            if (not isinstance(t, str) or not t or len(t) > _MAX_TOKEN_CHARS
                    or _CONTROL.search(t)):
                bad_row = i + 1
                break
        self._gate(principal, len(present), query_id, host, rejected=bad_row is not None)
        if bad_row is not None:
            raise UnknownTokenError(f"{what}: row {bad_row} of the batch is not a Skyflow "
                                    "token (the input is not shown)")
        if not present:
            return [None] * len(tokens)
        distinct = list(dict.fromkeys(present))
        ctx = self._ctx(principal, query_id)
        scope = self._scope(self.settings.detokenize_role)

        def call(chunk: list[str]) -> list[str]:
            return self._detokenize_chunk(chunk, ctx, scope, what)

        values = dict(zip(distinct, self._map_chunks(call, distinct,
                                                     self.settings.detokenize_batch_size),
                          strict=True))
        return [values[t] if t is not None else None for t in tokens]

    def _ctx(self, principal: str, query_id: str | None) -> dict[str, str] | None:
        mode = self.settings.ctx
        if mode == "none":
            return None
        ctx = {"user": str(principal)}
        if mode == "user+query" and query_id is not None:
            ctx["query_id"] = str(query_id)
        return ctx

    def _detokenize_chunk(self, chunk: list[str], ctx: dict[str, str] | None,
                          scope: str | None, what: str) -> list[str]:
        body = {"detokenizationParameters": [{"token": t, "redaction": "PLAIN_TEXT"}
                                             for t in chunk],
                "continueOnError": False}
        doc = self.client.post("/detokenize", body, what=what, scope=scope, ctx=ctx)
        records = _records(doc, len(chunk), what)
        out = []
        for i, (rec, token) in enumerate(zip(records, chunk, strict=True)):
            if rec.get("error"):
                raise UnknownTokenError(f"{what}: Skyflow reported an error for record "
                                        f"{i + 1} of the request (token not found or not "
                                        "allowed; the token is not shown)")
            if rec.get("token") != token:
                raise _malformed(what, f"record {i + 1} answers a different token than was "
                                 "asked (out of order)")
            value = rec.get("value")
            if not isinstance(value, str) or value == token:
                raise _malformed(what, f"record {i + 1} carries no plain-text value")
            out.append(value)
        return out

    # -- deid-side policy and audit ----------------------------------------------------------

    def _gate(self, principal: str, count: int, query_id: str | None, host: str | None,
              *, rejected: bool) -> None:
        if self.settings.policy is None:
            raise ConfigError(
                "deid.detokenize: the Skyflow vault URL has no policy= parameter: set "
                "policy=<deid vault URL> (e.g. sqlite:///.deid/skyflow-policy.db) for deid's "
                "detokenize policy and audit log, or policy=skyflow to leave both to "
                "Skyflow's roles and audit")
        if self._policy is None:  # policy=skyflow: delegated, see docs/skyflow.md
            return
        allowed = self._policy.is_allowed(principal)
        outcome = "rejected" if allowed and rejected else ("allowed" if allowed else "denied")
        record = {
            "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
            "action": "detokenize",
            "principal": principal,
            "outcome": outcome,
            "count": count,
            "kinds": {},  # Skyflow tokens do not carry their kind
            "query_id": query_id,
            "host": host,
            "vault": self.settings.label,
        }
        assert self._keyring is not None
        self._policy.append_audit(record, self._keyring.chain)
        if not allowed:
            raise PermissionDeniedError(
                f"deid.detokenize: permission denied: principal {principal!r} is not in the "
                "detokenize policy (grant it in the policy= vault: deid grant <principal>)")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        if self._policy is not None:
            self._policy.close()


def open_service(config: Any) -> SkyflowTokenService:
    """Entry point for `deid.vault.open_service` (scheme ``skyflow``)."""
    settings = parse_url(config.url, cache_size=config.cache_size)
    return SkyflowTokenService(settings)
