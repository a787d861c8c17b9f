"""Open a token service from one vault URL (env ``DEID_VAULT`` or a host's ``vault`` setting).

=================================  ==========================================================
``sqlite:///relative/path.db``     deid's embedded vault (default ``sqlite:///.deid/vault.db``)
``sqlite:////absolute/path.db``
``postgresql://…``                 deid's vault in a PostgreSQL schema
``dynamodb://table?region=…``      deid's vault in DynamoDB, keys wrapped by KMS
``skyflow://…``                    Skyflow's vault over its REST API
=================================  ==========================================================

Backends are imported lazily so the embedded default needs none of their dependencies.
Opening never creates a vault: `deid init` does (``open_store(url, create=True)``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

from ._url import anchored, scheme_of, sqlite_path
from .errors import ConfigError
from .service import DEFAULT_CACHE_SIZE, TokenService, VaultTokenService
from .stores import VaultStore

DEFAULT_VAULT = "sqlite:///.deid/vault.db"

# scheme -> "module:function" returning a VaultStore (ours) or a TokenService (external).
_STORES = {
    "sqlite": "deid.stores.sqlite:open_store",
    "postgresql": "deid.stores.postgres:open_store",
    "postgres": "deid.stores.postgres:open_store",
    "dynamodb": "deid.stores.dynamodb:open_store",
}
_SERVICES = {
    "skyflow": "deid.skyflow:open_service",
}


@dataclass(frozen=True)
class VaultConfig:
    """Read once at a host's edge (plugin initialize, handler load), then passed explicitly."""

    url: str = DEFAULT_VAULT
    cache_size: int = DEFAULT_CACHE_SIZE
    detokenize_cache_size: int = DEFAULT_CACHE_SIZE
    #: ``DEID_KEYS``: the key set's JSON from a secret manager, or None (the vault's key file
    #: or keyring table). Never in repr: a config may end up in a log line.
    keys: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, overrides: dict[str, Any] | None = None) -> VaultConfig:
        """From a host's settings (`overrides`: the plugin config) over ``DEID_*`` variables."""
        o = overrides or {}
        return cls(
            url=str(o.get("vault") or os.environ.get("DEID_VAULT") or DEFAULT_VAULT),
            cache_size=_cache_size(o, "cache_size", "DEID_CACHE_SIZE"),
            detokenize_cache_size=_cache_size(o, "detokenize_cache_size",
                                              "DEID_DETOKENIZE_CACHE_SIZE"),
            # From the environment only: a profile or plugin config is no place for keys.
            keys=os.environ.get("DEID_KEYS") or None,
        )


def _cache_size(overrides: dict[str, Any], name: str, env: str) -> int:
    raw = overrides.get(name, os.environ.get(env, DEFAULT_CACHE_SIZE))
    try:
        size = int(raw)
    except (TypeError, ValueError):
        size = -1
    if size < 0 or isinstance(raw, bool):
        raise ConfigError(f"deid: {name} (or {env}) must be a whole number of cache entries "
                          "(0 turns the cache off)")
    return size


def _load(target: str) -> Any:
    module, _, func = target.partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as exc:
        raise ConfigError(f"deid vault: the backend module {module} cannot be imported "
                          f"({exc.name} missing?); install deid with the matching extra") from None


def open_store(url: str, *, keys: str | None = None, create: bool = False) -> VaultStore:
    """A deid vault backend (not Skyflow, which is a service of its own); `keys` is the
    host's ``DEID_KEYS`` (`VaultConfig.keys`).

    `create` makes a missing SQLite vault (`deid init`); PostgreSQL and DynamoDB vaults are
    created by their installers (docs/postgres.md, the SAM template), never here.
    """
    scheme = scheme_of(url)
    if scheme not in _STORES:
        if scheme in _SERVICES:
            raise ConfigError(f"deid vault: {scheme}:// is an external vault; deid's own vault "
                              "commands (keys, grant, audit) do not apply to it")
        raise ConfigError(f"deid vault: unknown vault scheme {scheme!r}; expected one of "
                          f"{', '.join(sorted({*_STORES, *_SERVICES}))}")
    opener = _load(_STORES[scheme])
    store: VaultStore = (opener(url, keys=keys, create=True) if create and scheme == "sqlite"
                         else opener(url, keys=keys))
    return store


def open_service(config: VaultConfig) -> TokenService:
    scheme = scheme_of(config.url)
    if scheme in _SERVICES:
        service: TokenService = _load(_SERVICES[scheme])(config)
        return service
    return VaultTokenService(open_store(config.url, keys=config.keys),
                             cache_size=config.cache_size,
                             detokenize_cache_size=config.detokenize_cache_size)


__all__ = ["DEFAULT_VAULT", "VaultConfig", "anchored", "open_service", "open_store", "scheme_of",
           "sqlite_path"]
