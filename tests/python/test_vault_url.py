"""One vault-URL grammar for every backend: a repeated parameter, an unknown one and a bad
number are refused the same way, with a ConfigError that names the parameter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from deid import skyflow
from deid.errors import ConfigError
from deid.stores import dynamodb, postgres, sqlite
from deid.vault import VaultConfig

OPEN: dict[str, tuple[Callable[[str], Any], str, str]] = {
    # backend: (opener, a valid URL without parameters, a numeric parameter it takes)
    "sqlite": (sqlite.open_store, "sqlite:///{tmp}/v.db?", "cache_mib"),
    "postgresql": (postgres.open_store, "postgresql://u@127.0.0.1:1/db?", "connect_timeout"),
    "dynamodb": (dynamodb.open_store, "dynamodb://t?kms_key=k&region=us-east-1&", "workers"),
    "skyflow": (skyflow.parse_url, "skyflow://h.vault.skyflowapis.com/v1?credentials=c&",
                "batch_size"),
}


def _url(backend: str, tmp: str, query: str) -> tuple[Callable[[str], Any], str]:
    opener, base, _ = OPEN[backend]
    return opener, base.format(tmp=tmp) + query


@pytest.mark.parametrize("backend", OPEN)
def test_a_repeated_parameter_is_refused(backend: str, tmp_path: Any) -> None:
    param = "schema" if backend == "postgresql" else OPEN[backend][2]
    opener, url = _url(backend, str(tmp_path), f"{param}=2&{param}=3")
    with pytest.raises(ConfigError, match=f"'{param}' is given more than once"):
        opener(url)


@pytest.mark.parametrize("backend", [b for b in OPEN if b != "postgresql"])  # libpq's own
@pytest.mark.parametrize("bad", ["many", "-1", "1e99", ""])
def test_a_bad_number_names_the_parameter(backend: str, bad: str, tmp_path: Any) -> None:
    param = OPEN[backend][2]
    opener, url = _url(backend, str(tmp_path), f"{param}={bad}")
    if bad == "":  # empty means "the default"
        if backend == "sqlite":  # deid init: opening never creates a vault
            sqlite.open_store(url, create=True).close()
        opener(url)
        return
    with pytest.raises(ConfigError, match=f"URL parameter '{param}' must be an integer"):
        opener(url)


@pytest.mark.parametrize("backend", [b for b in OPEN if b != "postgresql"])
def test_an_unknown_parameter_is_refused_with_the_known_ones(backend: str,
                                                            tmp_path: Any) -> None:
    opener, url = _url(backend, str(tmp_path), "colour=red")
    with pytest.raises(ConfigError, match=rf"parameter\(s\) colour; expected some of .*"
                                          f"{OPEN[backend][2]}"):
        opener(url)


@pytest.mark.parametrize("setting", ["cache_size", "detokenize_cache_size"])
@pytest.mark.parametrize("bad", ["lots", "-5", True])
def test_bad_cache_sizes_are_config_errors_naming_the_setting(setting: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match=setting):
        VaultConfig.from_env({setting: bad})


def test_cache_size_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_CACHE_SIZE", "12")
    assert VaultConfig.from_env().cache_size == 12
    monkeypatch.setenv("DEID_CACHE_SIZE", "twelve")
    with pytest.raises(ConfigError, match="DEID_CACHE_SIZE"):
        VaultConfig.from_env()
