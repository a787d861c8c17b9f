"""Shared fixtures: a throwaway SQLite vault per test, keys beside it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deid.service import VaultTokenService
from deid.stores.sqlite import SQLiteStore


@pytest.fixture(autouse=True)
def _no_ambient_vault(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's DEID_* environment."""
    for name in ("DEID_VAULT", "DEID_KEYS", "DEID_PRINCIPAL", "DEID_CACHE_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def vault_path(tmp_path: Path) -> Path:
    return tmp_path / "vault" / "vault.db"


@pytest.fixture
def service(vault_path: Path) -> Iterator[VaultTokenService]:
    svc = VaultTokenService(SQLiteStore(vault_path, create=True))
    yield svc
    svc.store.close()


def open_service_at(vault_path: Path, **kwargs: int) -> VaultTokenService:
    """An independent service over the vault at `vault_path` (as another process would have)."""
    return VaultTokenService(SQLiteStore(vault_path, create=True), **kwargs)


@pytest.fixture
def fresh_service() -> Callable[..., VaultTokenService]:
    return open_service_at
