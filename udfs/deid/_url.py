"""Vault URL helpers shared by ``deid.vault`` and the backends (a leaf module: no cycle)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError


def scheme_of(url: str) -> str:
    """The vault URL's scheme; a bare path is an SQLite vault."""
    return urlsplit(url).scheme.lower() if "://" in url else "sqlite"


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel`` → rel, ``sqlite:////abs`` → /abs; a bare path is taken as is."""
    if "://" not in url:
        return Path(url)
    parts = urlsplit(url)  # the query (vault parameters) is not part of the path
    if parts.netloc or not parts.path.startswith("/"):
        raise ConfigError("deid vault: an SQLite URL is sqlite:///relative/path or "
                          "sqlite:////absolute/path")
    path = parts.path[1:]
    if not path:
        raise ConfigError("deid vault: the SQLite URL names no file")
    return Path(path)
