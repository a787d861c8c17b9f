"""The vault URL, parsed by one set of rules for every backend (a leaf module: no cycle).

Every backend (``sqlite``, ``postgresql``, ``dynamodb``, ``skyflow``) reads its URL through
`parse_vault_url`, so the rules are the same everywhere: a parameter given twice is refused
(which one would win is a guess), an unknown one is refused with the list of known ones, and
a number that does not parse or is out of range is a `ConfigError` naming the parameter.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, urlsplit

from .errors import ConfigError


def scheme_of(url: str) -> str:
    """The vault URL's scheme; a bare path is an SQLite vault."""
    return urlsplit(url).scheme.lower() if "://" in url else "sqlite"


@dataclass(frozen=True)
class VaultURL:
    """A parsed vault URL: its parts and its query parameters, each given at most once."""

    backend: str  # for messages: "SQLite", "PostgreSQL", "DynamoDB", "Skyflow"
    parts: SplitResult
    params: dict[str, str]

    def _bad(self, name: str, expected: str) -> ConfigError:
        return ConfigError(f"deid vault: {self.backend} URL parameter {name!r} must be "
                           f"{expected}")

    def text(self, name: str, default: str | None = None) -> str | None:
        """The parameter as given; `default` when absent or empty."""
        return self.params.get(name) or default

    def integer(self, name: str, default: int, *, lo: int, hi: int) -> int:
        raw = self.params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._bad(name, f"an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise self._bad(name, f"an integer from {lo} to {hi}")
        return value

    def number(self, name: str, default: float, *, lo: float, hi: float) -> float:
        raw = self.params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._bad(name, f"a number from {lo:g} to {hi:g}") from None
        if not lo <= value <= hi:  # also refuses nan
            raise self._bad(name, f"a number from {lo:g} to {hi:g}")
        return value

    def choice(self, name: str, options: Collection[str], default: str) -> str:
        value = (self.params.get(name) or default).lower()
        if value not in options:
            raise self._bad(name, "one of " + ", ".join(options))
        return value


def parse_vault_url(url: str, backend: str, *, known: Collection[str] | None) -> VaultURL:
    """Split `url` and check its parameters: none repeated, and (when `known` is given) none
    outside `known`. ``known=None`` lets unknown ones through (libpq's, for PostgreSQL)."""
    parts = urlsplit(url)
    params: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in params:
            raise ConfigError(f"deid vault: {backend} URL parameter {name!r} is given more "
                              "than once; give it once")
        params[name] = value
    if known is not None:
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"deid vault: unknown {backend} vault parameter(s) "
                              f"{', '.join(unknown)}; expected some of "
                              f"{', '.join(sorted(known))}")
    return VaultURL(backend, parts, params)


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


def anchored(url: str, base: Path | None) -> str:
    """The URL with a relative SQLite path made absolute against `base` (the dbt project
    directory), so every host and the CLI open one vault whatever their working directory.

    A relative path with no `base` is refused: resolving it against the working directory is
    how a second, empty vault gets created beside the first.
    """
    if scheme_of(url) != "sqlite":
        return url
    path = sqlite_path(url)
    if path.is_absolute():
        return url
    if base is None:
        raise ConfigError(
            f"deid vault: the SQLite path {path} is relative and no dbt project directory is "
            "known to resolve it against; run from the dbt project (or pass --project-dir / "
            "set DBT_PROJECT_DIR), or give an absolute path (sqlite:////abs/path/vault.db)")
    query = urlsplit(url).query if "://" in url else ""
    return f"sqlite:///{(Path(base) / path).resolve()}" + (f"?{query}" if query else "")
