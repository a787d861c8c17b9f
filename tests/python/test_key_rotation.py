"""Key rotation under concurrency: rotations, a minting process and rewrap at once lose nothing.

The attack this pins: two `deid keys rotate` processes each read the key file, each added
"version 2" with a different key and replaced the file; the last writer won. A process that
minted under the losing version 2 meanwhile left a value nobody could decrypt, and
`deid keys rewrap` reported success while processes that loaded keys earlier went on
encrypting under version 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import open_service_at
from deid.errors import VaultKeyError
from deid.service import VaultTokenService
from deid.stores.sqlite import SQLiteStore

_MINTER = textwrap.dedent("""
    import json, sys, os, secrets
    from deid.service import VaultTokenService
    from deid.stores.sqlite import SQLiteStore
    vault, stop, out = sys.argv[1:]
    svc = VaultTokenService(SQLiteStore(vault), cache_size=0)
    pairs = []
    while not os.path.exists(stop):
        values = [secrets.token_hex(8) for _ in range(50)]
        pairs += zip(values, svc.tokenize("string", values))
    with open(out, "w") as fh:
        json.dump(pairs, fh)
""")


def _deid(vault_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from deid.cli import run; run()", *args[:2],
         "--vault", f"sqlite:///{vault_path}", *args[2:]],
        capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow  # rotating and minting processes, repeated until the race shows
def test_concurrent_rotations_with_a_minting_process_lose_nothing(vault_path: Path,
                                                                  tmp_path: Path) -> None:
    svc = open_service_at(vault_path)
    before = [f"before-{i}" for i in range(200)]
    before_tokens = svc.tokenize("string", before)
    stop, out = tmp_path / "stop", tmp_path / "minted.json"
    minter = subprocess.Popen([sys.executable, "-c", _MINTER, str(vault_path), str(stop),
                               str(out)])
    try:
        time.sleep(0.5)  # the minter has loaded version 1 and is inserting under it
        outcomes = []
        with ThreadPoolExecutor(2) as pool:
            for _ in range(4):  # pairs of rotations started together
                pair = list(pool.map(lambda _: _deid(vault_path, "keys", "rotate"), range(2)))
                assert all(r.returncode == 0 for r in pair), [r.stderr for r in pair]
                outcomes.append(sorted(r.stdout.split(":")[0] for r in pair))
        time.sleep(0.3)  # the minter inserts after the last rotation too
    finally:
        stop.touch()
        assert minter.wait(timeout=60) == 0
    minted = json.loads(out.read_text())
    assert len(minted) > 0

    # A rotation that saw a version another made meanwhile stops; either way every version
    # was made once, by one process: consecutive, and as many as rotations reported.
    made = sum(o.count("rotated") for o in outcomes)
    assert 4 <= made <= 8
    ring = open_service_at(vault_path).store.reload_keyring()
    last = made + 1
    assert ring.versions == list(range(1, last + 1)) and ring.current == last

    rewrap = _deid(vault_path, "keys", "rewrap")
    assert rewrap.returncode == 0, rewrap.stderr
    assert "no record uses an older version" in rewrap.stdout
    reader = open_service_at(vault_path)
    assert set(reader.store.key_version_counts()) == {last}
    reader.store.grant("auditor", "test")
    values = [v for v, _ in minted] + before
    tokens = [t for _, t in minted] + before_tokens
    assert reader.detokenize(tokens, principal="auditor") == values  # every value readable
    for version in range(1, last):
        retired = _deid(vault_path, "keys", "retire", str(version))
        assert retired.returncode == 0, retired.stderr
    fresh = open_service_at(vault_path)
    fresh.store.grant("auditor", "test")
    assert fresh.detokenize(tokens, principal="auditor") == values
    assert fresh.keyring.versions == [last]


def test_two_rotations_that_saw_the_same_version_make_one(vault_path: Path) -> None:
    """The compare-and-swap itself: both loaded version 1; the second finds version 2
    already made and makes no other (before: two different keys, both called version 2)."""
    a, b = open_service_at(vault_path), open_service_at(vault_path)
    a.tokenize("email", ["a@example.com"])
    assert a.keyring.current == b.keyring.current == 1
    ring_a, made_a = a.store.rotate_keyring(seen_current=1)
    ring_b, made_b = b.store.rotate_keyring(seen_current=1)
    assert (made_a, made_b) == (True, False)
    assert ring_a.keys == ring_b.keys and ring_b.current == 2


def test_a_writer_with_old_keys_is_refused_and_reloads(vault_path: Path) -> None:
    """A process that loaded version 1 before a rotation encrypts under version 2 after it:
    the vault refuses version 1 inside the insert transaction and the service reloads."""
    early = open_service_at(vault_path)
    early.tokenize("email", ["a@example.com"])
    assert early.keyring.current == 1
    rotator = open_service_at(vault_path)
    rotator.store.rotate_keyring(seen_current=1)
    early.tokenize("email", ["b@example.com"])
    assert early.keyring.current == 2
    assert early.store.key_version_counts() == {1: 1, 2: 1}


def test_a_writer_keeps_up_with_rotations_that_follow_each_other(vault_path: Path) -> None:
    """Attack on the retry: two rotations a few milliseconds apart. The writer's insert is
    refused under version 1, it reloads version 2, and version 3 is recorded before its
    retry: one retry was not enough (seen in the concurrent test above, about one run in
    two). It reloads as long as a reload brings a newer version."""
    early = open_service_at(vault_path)
    early.tokenize("email", ["a@example.com"])
    rotator = open_service_at(vault_path)
    rotator.store.rotate_keyring(seen_current=1)
    real = early.store.reload_keyring

    def reload_then_another_rotation():  # type: ignore[no-untyped-def]
        ring = real()
        if ring.current == 2:
            rotator.store.rotate_keyring(seen_current=2)
        return ring

    early.store.reload_keyring = reload_then_another_rotation  # type: ignore[method-assign]
    early.tokenize("email", ["b@example.com"])
    assert early.keyring.current == 3
    assert early.store.key_version_counts() == {1: 1, 3: 1}


def test_a_writer_that_cannot_load_the_current_key_is_told_so(vault_path: Path) -> None:
    """A host whose DEID_KEYS still holds the old key set: reloading brings nothing newer, so
    it stops with the fix instead of retrying."""
    from deid.keys import key_file_for

    svc = open_service_at(vault_path)
    svc.tokenize("email", ["a@example.com"])
    old_keys = key_file_for(vault_path).read_text()
    svc.store.rotate_keyring(seen_current=1)
    pinned = VaultTokenService(SQLiteStore(vault_path, keys=old_keys))
    with pytest.raises(VaultKeyError, match="newer than any key this host can load"):
        pinned.tokenize("email", ["b@example.com"])


def test_retire_is_refused_while_records_use_the_version(vault_path: Path) -> None:
    svc = open_service_at(vault_path)
    svc.tokenize("email", ["a@example.com"])
    svc.store.rotate_keyring(seen_current=1)
    with pytest.raises(VaultKeyError, match="1 records are still encrypted under key version 1"):
        svc.store.retire_key_version(1)
    with pytest.raises(VaultKeyError, match="current key"):
        svc.store.retire_key_version(2)
    result = _deid(vault_path, "keys", "retire", "1")
    assert result.returncode != 0 and "rewrap first" in result.stderr
    assert sorted(open_service_at(vault_path).store.reload_keyring().versions) == [1, 2]


def test_the_key_file_lock_file_is_private(vault_path: Path) -> None:
    svc = open_service_at(vault_path)
    svc.tokenize("email", ["a@example.com"])
    svc.store.rotate_keyring(seen_current=1)
    lock = vault_path.with_name(vault_path.name + ".keys.lock")
    assert lock.exists() and lock.stat().st_mode & 0o777 == 0o600
    assert os.stat(vault_path.with_name(vault_path.name + ".keys")).st_mode & 0o777 == 0o600
