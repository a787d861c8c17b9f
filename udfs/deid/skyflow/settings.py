"""What a ``skyflow://`` vault URL says, parsed once at the host's edge, and the kind → column
mapping."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import kinds as _kinds
from .._url import parse_vault_url, scheme_of
from ..errors import (
    ConfigError,
    DeidError,
)

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


_KNOWN_PARAMS = {
    "credentials", "mapping", "policy", "mode", "batch_size", "detokenize_batch_size",
    "concurrency", "connect_timeout", "timeout", "retries", "backoff", "max_retry_after",
    "refresh_margin", "ctx", "tokenize_role", "detokenize_role", "scheme",
}


def parse_url(url: str, *, cache_size: int = 1_000_000) -> SkyflowSettings:
    """``skyflow://<host>/<vault_id>?credentials=…`` → settings; ConfigError names what is wrong."""
    parsed = parse_vault_url(url, "Skyflow", known=_KNOWN_PARAMS)
    parts, one = parsed.parts, parsed.text
    if parts.scheme.lower() != "skyflow":
        raise ConfigError("deid skyflow: the vault URL must start with skyflow://")
    host = parts.hostname
    if not host:
        raise ConfigError("deid skyflow: the URL names no host "
                          "(skyflow://<cluster>.vault.skyflowapis.com/<vault_id>)")
    vault_id = parts.path.strip("/")
    if not _VAULT_ID.fullmatch(vault_id):
        raise ConfigError("deid skyflow: the URL path must be the vault ID "
                          "(skyflow://<cluster>.vault.skyflowapis.com/<vault_id>)")
    scheme = (one("scheme") or "https").lower()
    if scheme not in ("https", "http"):
        raise ConfigError("deid skyflow: scheme must be https (or http for a local test server)")
    if scheme == "http" and not _is_loopback(host):
        raise ConfigError("deid skyflow: scheme=http is only for a test server on this machine "
                          "(127.0.0.1, ::1 or localhost); a real vault needs https")
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host:
        netloc = f"[{host}]" + ("" if parts.port is None else f":{parts.port}")
    credentials = one("credentials")
    if not credentials:
        raise ConfigError("deid skyflow: add credentials=<path to the service account's "
                          "credentials.json> (or credentials=secretsmanager:<arn>, "
                          "credentials=env:<VARIABLE>) to the vault URL")
    mode = one("mode") or "upsert"
    if mode not in ("upsert", "lookup"):
        raise ConfigError("deid skyflow: mode must be upsert (insert new values) or lookup "
                          "(only values already in the vault)")
    ctx = one("ctx") or "user"
    if ctx not in ("none", "user", "user+query"):
        raise ConfigError("deid skyflow: ctx must be none, user or user+query")
    policy = one("policy") or None
    if policy is not None and policy != "skyflow" and scheme_of(policy) == "skyflow":
        raise ConfigError("deid skyflow: policy= must be a deid vault URL (sqlite:///…, "
                          "postgresql://…, dynamodb://…) or the word skyflow")
    mapping = load_mapping(one("mapping"))
    if mode == "lookup" and one("mapping") is None:
        raise ConfigError("deid skyflow: mode=lookup needs a mapping file that names each "
                          "kind's column_group")
    read_timeout = parsed.number("timeout", DEFAULT_READ_TIMEOUT, lo=0.01, hi=900)
    return SkyflowSettings(
        vault_url=f"{scheme}://{netloc}/v1/vaults/{vault_id}",
        vault_id=vault_id,
        credentials=credentials,
        mapping=mapping,
        policy=policy,
        mode=mode,
        batch_size=parsed.integer("batch_size", DEFAULT_BATCH_SIZE, lo=1, hi=1000),
        detokenize_batch_size=parsed.integer("detokenize_batch_size",
                                             DEFAULT_DETOKENIZE_BATCH_SIZE, lo=1, hi=1000),
        concurrency=parsed.integer("concurrency", DEFAULT_CONCURRENCY, lo=1, hi=64),
        connect_timeout=parsed.number("connect_timeout", DEFAULT_CONNECT_TIMEOUT,
                                      lo=0.01, hi=120),
        read_timeout=read_timeout,
        retries=parsed.integer("retries", DEFAULT_RETRIES, lo=0, hi=20),
        backoff=parsed.number("backoff", DEFAULT_BACKOFF, lo=0, hi=60),
        max_retry_after=parsed.number("max_retry_after", DEFAULT_MAX_RETRY_AFTER,
                                      lo=0, hi=600),
        refresh_margin=parsed.number("refresh_margin", DEFAULT_REFRESH_MARGIN, lo=0, hi=3000),
        ctx=ctx,
        tokenize_role=one("tokenize_role") or None,
        detokenize_role=one("detokenize_role") or None,
        cache_size=cache_size,
    )


def _spec_key(spec: _kinds.KindSpec) -> str:
    return spec.name if spec.domain == spec.name else f"{spec.name}:{spec.domain}"


def _mapped_name(path: Path, key: Any, what: str, name: Any) -> str:
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise ConfigError(f"deid skyflow: mapping file {path}: {key!r} has no valid "
                          f"{what} name (letters, digits, _)")
    return name


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
            spelled_table, _, spelled_column = entry.partition(".")
            entry = {"table": spelled_table, "column": spelled_column}
        if not isinstance(entry, dict):
            raise ConfigError(f"deid skyflow: mapping file {p}: {key!r} must be "
                              "'table.column' or {table, column, column_group}")
        table, column = (_mapped_name(p, key, what, entry.get(what))
                         for what in ("table", "column"))
        group = entry.get("column_group")
        if group is not None and (not isinstance(group, str) or not _IDENT.fullmatch(group)):
            raise ConfigError(f"deid skyflow: mapping file {p}: {key!r} has an invalid "
                              "column_group name")
        mapping[_spec_key(spec)] = Target(table, column, group)
    return mapping
