"""The SQLite vault's failures reach the user as deid errors that say what to do, never as a
raw sqlite3 exception and never with a value in the text."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deid.errors import DeidError, VaultUnavailableError
from deid.service import VaultTokenService
from deid.stores import sqlite as sqlite_store

SECRET = "read.only.secret@example.com"


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make every later SQLite connection of the store read-only, the vault file and the
    journal file it attaches, as on a read-only mount (file permissions do not stop root,
    who runs CI)."""
    real = sqlite3.connect

    def connect(path: Any, **kwargs: Any) -> sqlite3.Connection:
        db = real(path, **kwargs)
        db.execute("pragma query_only = 1")
        return db

    def switch() -> None:
        monkeypatch.setattr(sqlite_store.sqlite3, "connect", connect)

    return switch


def _assert_actionable(exc: BaseException) -> None:
    text = str(exc)
    assert isinstance(exc, VaultUnavailableError), type(exc)
    assert "read-only" in text and "write access" in text, text
    assert SECRET not in text


def test_opening_a_read_only_vault_is_a_deid_error_with_the_fix(
        vault_path: Path, read_only: Callable[[], None]) -> None:
    sqlite_store.SQLiteStore(vault_path, create=True).close()
    read_only()
    with pytest.raises(DeidError) as exc:
        VaultTokenService(sqlite_store.SQLiteStore(vault_path))
    _assert_actionable(exc.value)


def test_minting_and_auditing_in_a_read_only_vault_are_deid_errors(
        vault_path: Path, read_only: Callable[[], None]) -> None:
    service = VaultTokenService(sqlite_store.SQLiteStore(vault_path, create=True), cache_size=0,
                                detokenize_cache_size=0)
    token = service.tokenize("email", ["known@example.com"])[0]
    service.store.grant("reader", "test")
    service.store.close()  # the next statement opens a new (read-only) connection
    read_only()
    # Looking up a known value writes nothing, so it still works.
    assert service.tokenize("email", ["known@example.com"]) == [token]
    with pytest.raises(DeidError) as exc:
        service.tokenize("email", [SECRET])
    _assert_actionable(exc.value)
    with pytest.raises(DeidError) as exc:  # the audit record cannot be written: fail closed
        service.detokenize([token], principal="reader")
    _assert_actionable(exc.value)


def test_a_file_that_is_not_a_vault_is_a_deid_error(vault_path: Path) -> None:
    vault_path.parent.mkdir(parents=True)
    vault_path.write_bytes(b"this is not an SQLite database, just some bytes " * 100)
    with pytest.raises(VaultUnavailableError, match="not an SQLite database"):
        sqlite_store.SQLiteStore(vault_path)


def test_an_unreadable_key_file_is_a_deid_error_naming_it(vault_path: Path) -> None:
    from deid.errors import VaultKeyError
    from deid.keys import key_file_for

    key_file_for(vault_path).mkdir(parents=True, mode=0o700)  # a directory, not a key file
    with pytest.raises(VaultKeyError) as exc:
        VaultTokenService(sqlite_store.SQLiteStore(vault_path, create=True))
    assert str(key_file_for(vault_path)) in str(exc.value)
    assert "cannot be read" in str(exc.value)
