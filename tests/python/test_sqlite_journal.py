"""The SQLite vault's journal: new records are appended (cheap commits), indexed in memory by
each process, and merged in token order into `recent`, which merges into `tokens` when full.
Every store below stands for another process: it has its own connection and its own index of
the journal."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from deid.errors import ConfigError, ErasedTokenError, VaultUnavailableError
from deid.service import VaultTokenService
from deid.stores.sqlite import SQLiteStore, _JournalIndex, journal_file_for

VALUES = [f"person{i}@example.com" for i in range(300)]


def _service(path: Path, journal_rows: int = 1_000_000, recent_rows: int | None = None,
             background_merge: bool = False) -> VaultTokenService:
    """Merges run on the writer's thread unless `background_merge` (the default elsewhere):
    the counts after each batch are then known."""
    return VaultTokenService(SQLiteStore(path, create=True, journal_rows=journal_rows,
                                         recent_rows=recent_rows,
                                         background_merge=background_merge),
                             cache_size=0, detokenize_cache_size=0)


def _counts(path: Path) -> tuple[int, int, int]:
    """Records in tokens, recent, and the journal (not yet copied by a merge)."""
    db = sqlite3.connect(path)
    db.execute("attach database ? as j", (str(journal_file_for(path)),))
    try:
        merged = db.execute("select coalesce(max(cast(value as integer)), 0) from meta "
                            "where key = 'merged_through'").fetchone()[0]
        return (db.execute("select count(*) from tokens").fetchone()[0],
                db.execute("select count(*) from recent").fetchone()[0],
                db.execute("select count(*) from j.journal where seq > ?",
                           (merged,)).fetchone()[0])
    finally:
        db.close()


def test_a_writer_whose_index_is_behind_still_converges(vault_path: Path) -> None:
    """Attack on the design: a second process indexed the journal before the first appended,
    so its in-memory index does not know the value; it must not mint a second token."""
    a, b = _service(vault_path), _service(vault_path)
    assert b.tokenize("email", ["someone.else@example.com"])  # b's index is now built
    token = a.tokenize("email", ["shared@example.com"])[0]
    assert b.tokenize("email", ["shared@example.com"]) == [token]
    # The same across merges, which empty the journal under b's index.
    a.store.merge_journal()  # type: ignore[attr-defined]
    assert b.tokenize("email", ["shared@example.com"]) == [token]
    a.store.merge_journal(down=True)  # type: ignore[attr-defined]
    assert b.tokenize("email", ["shared@example.com"]) == [token]
    b.store.grant("p", "test")
    assert b.detokenize([token], principal="p") == ["shared@example.com"]


def test_a_writer_looks_again_when_a_merge_ran_since_its_lookup(vault_path: Path) -> None:
    """Attack on the writer's shortcut: a writer skips the second look in the indexed levels
    for values its own lookup just found absent there. Between that lookup and its insert,
    another process mints the value and merges it out of the journal: only the merge's new
    epoch tells the writer to look again, or it mints a second token."""
    a, b = _service(vault_path), _service(vault_path)
    assert b.tokenize("email", ["someone.else@example.com"])  # keys, and b's index
    a_insert = a.store.insert_tokens

    def rival_first(records, **kw):  # type: ignore[no-untyped-def]
        # a has looked the value up (absent); b mints it and merges before a inserts.
        token = b.tokenize("email", ["shared@example.com"])[0]
        b.store.merge_journal()  # type: ignore[attr-defined]
        rival_first.token = token  # type: ignore[attr-defined]
        return a_insert(records, **kw)

    a.store.insert_tokens = rival_first  # type: ignore[method-assign]
    token = a.tokenize("email", ["shared@example.com"])[0]
    assert token == rival_first.token  # type: ignore[attr-defined]
    assert _counts(vault_path) == (0, 2, 0)


def test_tokens_and_values_survive_merges(vault_path: Path) -> None:
    svc = _service(vault_path, journal_rows=64, recent_rows=128)
    tokens = [t for i in range(0, 300, 50) for t in svc.tokenize("email", VALUES[i : i + 50])]
    in_tokens, in_recent, in_journal = _counts(vault_path)
    # 50 per batch: the journal merges at 100, 200, 300; recent reaches 128 at 200.
    assert (in_tokens, in_recent, in_journal) == (200, 100, 0)
    other = _service(vault_path, journal_rows=64)
    assert other.tokenize("email", VALUES) == tokens
    other.store.grant("p", "test")
    assert other.detokenize(tokens, principal="p") == VALUES
    assert other.store.stats()["tokens"] == {"email (email)": 300}


@pytest.mark.parametrize("background", [False, True], ids=["inline", "merge-threads"])
def test_threads_with_their_own_stores_converge_across_merges(vault_path: Path,
                                                              background: bool) -> None:
    _service(vault_path)  # keys once
    results: list[list[str | None]] = []
    barrier = threading.Barrier(4)

    def work(offset: int) -> None:
        svc = _service(vault_path, journal_rows=97, recent_rows=150,
                       background_merge=background)
        barrier.wait()
        # Overlapping, differently ordered batches: every value is raced for.
        mine = VALUES[offset:] + VALUES[:offset]
        got = [t for i in range(0, 300, 40) for t in svc.tokenize("email", mine[i : i + 40])]
        results.append(got[300 - offset :] + got[: 300 - offset])

    threads = [threading.Thread(target=work, args=(k * 75,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert len(set(results[0])) == 300
    counts = _counts(vault_path)
    assert sum(counts) == 300
    assert counts[0] > 0 or background  # every level was used (merge threads may lag)


def _mint(args: tuple[str, int, bool]) -> list[str | None]:
    path, offset, background = args
    svc = _service(Path(path), journal_rows=101, recent_rows=150, background_merge=background)
    mine = VALUES[offset:] + VALUES[:offset]
    got = [t for i in range(0, 300, 30) for t in svc.tokenize("email", mine[i : i + 30])]
    return got[300 - offset :] + got[: 300 - offset]


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("background", [False, True], ids=["inline", "merge-threads"])
def test_processes_converge_across_merges(vault_path: Path, background: bool) -> None:
    _service(vault_path)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_mint, [(str(vault_path), k * 100, background) for k in range(3)])
    assert all(r == results[0] for r in results) and len(set(results[0])) == 300
    counts = _counts(vault_path)
    assert sum(counts) == 300
    assert counts[0] > 0 or background


def test_an_erasure_in_the_journal_reaches_every_index(vault_path: Path) -> None:
    a, b = _service(vault_path), _service(vault_path)
    token = a.tokenize("email", ["gone@example.com"])[0]
    assert token is not None
    b.store.grant("p", "test")
    assert b.detokenize([token], principal="p") == ["gone@example.com"]  # b indexed it
    a.forget("email", values=["gone@example.com"], principal="dpo")
    with pytest.raises(ErasedTokenError):
        b.detokenize([token], principal="p")
    again = b.tokenize("email", ["gone@example.com"])[0]
    assert again != token  # a new token: the erased one is never issued again


def test_a_snapshot_older_than_the_index_reads_the_journal_itself(vault_path: Path) -> None:
    """A thread whose read snapshot predates a merge another thread already indexed must
    neither miss a value (a second token) nor call a token unknown."""
    svc = _service(vault_path)
    token = svc.tokenize("email", ["kept@example.com"])[0]
    store = svc.store
    assert isinstance(store, SQLiteStore)
    store._journal = _JournalIndex(epoch=10**6)  # an index from a later epoch
    fp = store.keyring().fingerprints("email", ["kept@example.com"])[0]
    assert store.find_tokens("email", [fp]) == {fp: token}
    assert token is not None and token in store.fetch_values([token])


def test_rewrap_reaches_records_at_every_level(vault_path: Path) -> None:
    svc = _service(vault_path)
    old = svc.tokenize("email", VALUES[:60])
    svc.store.merge_journal(down=True)  # type: ignore[attr-defined]
    old += svc.tokenize("email", VALUES[60:100])
    svc.store.merge_journal()  # type: ignore[attr-defined]
    new = svc.tokenize("email", VALUES[100:200])
    assert _counts(vault_path) == (60, 40, 100)
    ring, _made = svc.store.rotate_keyring(svc.keyring.current)
    moved = 0
    for batch in svc.store.iter_values(37):
        moved += svc.store.update_values([
            (t, v, type(v)(*ring.encrypt(t, ring.decrypt(t, v.key_version, v.ciphertext))))
            for t, v in batch])
    assert moved == 200
    assert svc.store.key_version_counts() == {ring.current: 200}
    svc.store.retire_key_version(ring.current - 1)
    reader = _service(vault_path)
    reader.store.grant("p", "test")
    assert reader.detokenize(old + new, principal="p") == VALUES[:200]


def test_one_commit_of_new_values_writes_pages_for_the_journal_only(vault_path: Path) -> None:
    """What makes the vector path fast, checked by volume rather than time: appending 2,048
    new values to a vault of 20,000 writes a few dozen pages to the log, where inserting
    them at random keys in the two indexes wrote about two pages per value."""
    svc = _service(vault_path)
    for i in range(0, 20_000, 5_000):
        svc.tokenize("email", [f"old{j}@example.com" for j in range(i, i + 5_000)])
    svc.store.merge_journal()  # type: ignore[attr-defined]
    db = sqlite3.connect(vault_path)
    db.execute("attach database ? as j", (str(journal_file_for(vault_path)),))
    db.execute("pragma main.wal_checkpoint(truncate)")
    db.execute("pragma j.wal_checkpoint(truncate)")
    wals = [p.with_name(p.name + "-wal") for p in (vault_path, journal_file_for(vault_path))]
    svc.tokenize("email", [f"new{j}@example.com" for j in range(2048)])
    pages = sum(wal.stat().st_size for wal in wals) / 4096
    assert pages < 0.1 * 2048, pages
    db.close()


def test_a_vault_from_a_newer_deid_is_refused(vault_path: Path) -> None:
    SQLiteStore(vault_path, create=True).close()
    db = sqlite3.connect(vault_path)
    db.execute("update meta set value = '99' where key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=r"schema version 99.*upgrade deid"):
        SQLiteStore(vault_path)


def test_a_vault_of_the_previous_schema_keeps_its_tokens(vault_path: Path) -> None:
    """A vault written before the journal: every record in `tokens`, no journal tables."""
    svc = _service(vault_path)
    tokens = svc.tokenize("email", VALUES[:50])
    svc.store.merge_journal(down=True)  # type: ignore[attr-defined]
    svc.store.close()
    _drop_journal_file(vault_path)
    db = sqlite3.connect(vault_path)
    db.executescript("drop table recent; "
                     "update meta set value = '1' where key = 'schema_version';")
    db.close()
    upgraded = _service(vault_path)
    assert upgraded.tokenize("email", VALUES[:60])[:50] == tokens
    assert _counts(vault_path) == (50, 0, 10)
    db = sqlite3.connect(vault_path)
    assert db.execute("select value from meta where key = 'schema_version'").fetchone() == ("3",)
    db.close()


def _drop_journal_file(vault_path: Path) -> None:
    """Back to a vault of before the journal file (schema 1 or 2)."""
    for suffix in ("", "-wal", "-shm"):
        journal_file_for(vault_path).with_name(journal_file_for(vault_path).name + suffix
                                               ).unlink(missing_ok=True)
    db = sqlite3.connect(vault_path)
    db.executescript("delete from meta where key in ('journal_id', 'merged_through');")
    db.close()


def test_a_vault_of_schema_2_moves_its_journal_table_into_recent(vault_path: Path) -> None:
    """Schema 2 kept the journal as a table in the vault file: its records (some merged,
    some not) keep their tokens and values."""
    svc = _service(vault_path)
    merged = svc.tokenize("email", VALUES[:40])
    svc.store.merge_journal()  # type: ignore[attr-defined]
    journaled = svc.tokenize("email", VALUES[40:70])
    svc.store.close()
    db = sqlite3.connect(vault_path)
    db.execute("attach database ? as j", (str(journal_file_for(vault_path)),))
    db.executescript("create table main.journal as select * from j.journal; "
                     "update main.meta set value = '2' where key = 'schema_version';")
    db.close()
    _drop_journal_file(vault_path)
    upgraded = _service(vault_path)
    assert _counts(vault_path) == (0, 70, 0)
    assert upgraded.tokenize("email", VALUES[:70]) == merged + journaled
    upgraded.store.grant("p", "test")
    assert upgraded.detokenize(merged + journaled, principal="p") == VALUES[:70]


# -- the journal file -----------------------------------------------------------------------


def _copy_vault(src: Path, dst: Path, *, with_journal: bool) -> None:
    """Copy a closed vault's files (its logs checkpointed) as a backup would."""
    dst.mkdir()
    names = [src.name, src.name + ".keys", src.name + ".audit-key"]
    if with_journal:
        names.append(journal_file_for(src).name)
    for name in names:
        (dst / name).write_bytes((src.parent / name).read_bytes())
        (dst / name).chmod(0o600)


def test_a_vault_copied_without_its_journal_file_is_refused(vault_path: Path,
                                                           tmp_path: Path) -> None:
    """Attack: a backup of the vault file alone. Opened without its journal, it would know
    none of the newest tokens and mint second ones for their values; deid refuses it, and a
    journal file of another vault, by name."""
    svc = _service(vault_path)
    token = svc.tokenize("email", ["newest@example.com"])[0]
    svc.store.close()
    _copy_vault(vault_path, tmp_path / "alone", with_journal=False)
    with pytest.raises(VaultUnavailableError, match=r"journal file .* is missing.*restore it"):
        SQLiteStore(tmp_path / "alone" / vault_path.name)
    other = tmp_path / "other" / vault_path.name
    SQLiteStore(other, create=True).close()
    journal_file_for(other).write_bytes(journal_file_for(vault_path).read_bytes())
    with pytest.raises(VaultUnavailableError, match="belongs to another vault"):
        SQLiteStore(other)
    _copy_vault(vault_path, tmp_path / "both", with_journal=True)
    whole = _service(tmp_path / "both" / vault_path.name)
    assert whole.tokenize("email", ["newest@example.com"]) == [token]


def test_writers_append_while_a_merge_holds_the_vault_file(vault_path: Path) -> None:
    """What the journal file is for: a merge holds the vault file's write lock for a second
    or more, and new values are still appended (and on disk) meanwhile."""
    writer = VaultTokenService(SQLiteStore(vault_path, create=True, busy_timeout_s=0.5),
                               cache_size=0, detokenize_cache_size=0)
    writer.tokenize("email", ["first@example.com"])  # records the current key version
    merge = sqlite3.connect(vault_path, isolation_level=None)
    merge.execute("begin immediate")  # the vault file's write lock, as a merge holds it
    try:
        tokens = writer.tokenize("email", VALUES[:50])
        on_disk = sqlite3.connect(journal_file_for(vault_path))
        assert set(tokens) <= {t for (t,) in on_disk.execute("select token from journal")}
        on_disk.close()
    finally:
        merge.execute("rollback")
        merge.close()


def test_a_merge_stopped_between_its_two_files_loses_and_duplicates_nothing(
        vault_path: Path) -> None:
    """A merge commits the copy into `recent`, then the journal's delete; a crash between
    leaves each record in both files. Lookups, counts, a rewrap and an erasure in that state
    each see one record, and the next merge finishes the delete."""
    svc = _service(vault_path)
    tokens = svc.tokenize("email", VALUES[:40])
    store = svc.store
    assert isinstance(store, SQLiteStore)
    drops = [0]
    real_drop = store._drop_merged

    def crash_after_the_copy() -> None:
        drops[0] += 1
        if drops[0] == 2:  # the delete that follows the copy
            raise OSError("the process stopped here")
        real_drop()

    store._drop_merged = crash_after_the_copy  # type: ignore[method-assign]
    with pytest.raises(OSError):
        store.merge_journal()
    store._drop_merged = real_drop  # type: ignore[method-assign]
    raw = sqlite3.connect(journal_file_for(vault_path))
    assert raw.execute("select count(*) from journal").fetchone() == (40,)  # both files
    assert _counts(vault_path) == (0, 40, 0)
    assert store.stats()["tokens"] == {"email (email)": 40}

    other = _service(vault_path)
    assert other.tokenize("email", VALUES[:40]) == tokens
    other.store.grant("p", "test")
    assert other.detokenize(tokens, principal="p") == VALUES[:40]

    ring, _made = store.rotate_keyring(svc.keyring.current)
    moved = sum(store.update_values([
        (t, v, type(v)(*ring.encrypt(t, ring.decrypt(t, v.key_version, v.ciphertext))))
        for t, v in batch]) for batch in store.iter_values(1000))
    # iter_values reads both copies; each record is rewrapped and counted once.
    assert moved == 40
    assert store.key_version_counts() == {ring.current: 40}

    svc.forget("email", values=[VALUES[7]], principal="dpo")
    with pytest.raises(ErasedTokenError):
        _service(vault_path).detokenize([tokens[7]], principal="p")

    assert store.merge_journal() == 0  # nothing new to copy: it finishes the delete
    assert raw.execute("select count(*) from journal").fetchone() == (0,)
    raw.close()
    store.retire_key_version(ring.current - 1)
    assert _service(vault_path).detokenize(tokens[:7], principal="p") == VALUES[:7]


def test_merges_on_their_own_thread_keep_every_token(vault_path: Path) -> None:
    """The default: a writer that fills the journal wakes its process's merge thread and goes
    on appending; two processes' stores race across those merges."""
    a = _service(vault_path, journal_rows=64, recent_rows=256, background_merge=True)
    b = _service(vault_path, journal_rows=64, recent_rows=256, background_merge=True)
    threads: list[str] = []
    nices: list[int] = []
    for store in (a.store, b.store):
        assert isinstance(store, SQLiteStore)
        store.merger_idle_s = 0.2
        real = store.merge_journal

        def seen(real=real, **kw):  # type: ignore[no-untyped-def]
            me = threading.current_thread()
            threads.append(me.name)
            if me.name == "deid-vault-merge":  # maintenance yields the cores (Linux)
                nices.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return real(**kw)

        store.merge_journal = seen  # type: ignore[method-assign]
    got_a = [t for i in range(0, 300, 20) for t in a.tokenize("email", VALUES[i : i + 20])]
    got_b = [t for i in range(0, 300, 30) for t in b.tokenize("email", VALUES[i : i + 30])]
    assert got_a == got_b and len(set(got_a)) == 300
    for store in (a.store, b.store):
        assert isinstance(store, SQLiteStore)
        merger = store._merger
        if merger is not None:
            merger.join(timeout=30)  # an idle merge thread ends
    assert "deid-vault-merge" in threads  # merged on the merge thread, not the writer
    assert set(nices) == {min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)}
    in_tokens, in_recent, in_journal = _counts(vault_path)
    assert in_tokens + in_recent + in_journal == 300 and in_journal < 300
    reader = _service(vault_path)
    reader.store.grant("p", "test")
    assert reader.detokenize(got_a, principal="p") == VALUES


_EXIT_DURING_A_MERGE = """
import sys, time
from pathlib import Path
from deid.service import VaultTokenService
from deid.stores.sqlite import SQLiteStore

store = SQLiteStore(Path(sys.argv[1]), journal_rows=64)
real = store.merge_journal

def slow(**kw):
    time.sleep(0.5)  # a merge that takes a while, as one of 262,144 rows does
    return real(**kw)

store.merge_journal = slow
svc = VaultTokenService(store, cache_size=0)
svc.tokenize("email", [f"p{i}@example.com" for i in range(100)])  # wakes the merge thread
time.sleep(0.1)  # the merge is under way; the process exits now
"""


def test_a_process_that_exits_during_a_merge_lets_it_finish(vault_path: Path) -> None:
    """A merge thread cut off by the process's exit would leave the journal full: every
    later process reads it all into its index, and the next writer merges it again."""
    import os
    import subprocess
    import sys

    _service(vault_path).store.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", _EXIT_DURING_A_MERGE, str(vault_path)], check=True,
                   env=env, timeout=60)
    assert _counts(vault_path) == (0, 100, 0)


@pytest.mark.parametrize("keep_order", [True, False])
def test_the_one_string_lookup_agrees_with_the_row_by_row_one(
        vault_path: Path, monkeypatch: pytest.MonkeyPatch, keep_order: bool) -> None:
    """Tokens found by fingerprint come back as one string per chunk in the keys' order;
    were SQLite to scan the keys in another order, the chunk is looked up row by row."""
    from deid.stores import sqlite as sqlite_store

    svc = _service(vault_path)
    svc.tokenize("email", VALUES[:100])
    svc.store.merge_journal(down=True)  # type: ignore[attr-defined]
    svc.tokenize("email", VALUES[100:200])
    svc.store.merge_journal()  # type: ignore[attr-defined]
    store = svc.store
    assert isinstance(store, SQLiteStore)
    fps = store.keyring().fingerprints("email", [*VALUES[::-1], "absent@example.com"])
    if not keep_order:
        monkeypatch.setattr(sqlite_store, "_positions", lambda n: "another order")
    db = store._db()
    found = store._tokens_by_fingerprint(db, fps * 15, "email")  # 4,515 keys: three chunks
    assert found == dict(store._probe(db, fps, ("recent", "tokens"), "fingerprint", "email"))
    assert len(found) == 200


def test_the_journal_index_keeps_domains_apart(vault_path: Path) -> None:
    """One value in two domains is two records: another process's index, caught up on both
    at once, gives each domain its own token."""
    writer = _service(vault_path)
    plain = writer.tokenize("email", ["same@example.com"])[0]
    other = writer.tokenize("email:crm", ["same@example.com"])[0]
    assert plain != other
    reader = _service(vault_path)  # indexes both rows in one catch-up
    assert reader.tokenize("email", ["same@example.com"]) == [plain]
    assert reader.tokenize("email:crm", ["same@example.com"]) == [other]
    index = reader.store._journal  # type: ignore[attr-defined]
    assert set(index.by_fingerprint) == {"email", "crm"} and len(index.by_token) == 2


def test_a_merge_leaves_the_vault_files_log_empty(vault_path: Path) -> None:
    """A merge writes a level's worth of pages to the vault file's log; left there, every
    later commit to the vault file (each detokenize audit record) tries to checkpoint it
    again. The merge empties it."""
    svc = _service(vault_path)
    svc.tokenize("email", VALUES)
    wal = vault_path.with_name(vault_path.name + "-wal")
    svc.store.grant("p", "test")  # a commit to the vault file: its log is not empty
    assert wal.stat().st_size > 0
    svc.store.merge_journal()  # type: ignore[attr-defined]
    assert wal.stat().st_size == 0


def test_a_merge_of_an_empty_journal_keeps_the_mark(vault_path: Path) -> None:
    """The mark only moves forward: an empty journal's highest row is 0, and a mark moved
    back to it would call rows deleted long ago unmerged."""
    svc = _service(vault_path)
    svc.tokenize("email", VALUES[:10])
    store = svc.store
    assert isinstance(store, SQLiteStore)

    def mark() -> int:
        return int(store._read("select value from meta where key = 'merged_through'")[0][0])

    store.merge_journal()
    assert mark() == 10
    store.merge_journal(down=True)  # nothing new in the journal; recent moves down
    assert mark() == 10 and _counts(vault_path) == (10, 0, 0)
    svc.tokenize("email", VALUES[10:15])
    assert _counts(vault_path) == (10, 0, 5)


def test_a_process_starts_and_looks_up_while_a_merge_holds_both_files(vault_path: Path) -> None:
    """Opening a vault that needs nothing written (schema, journal pairing, audit log, keys
    all in place) takes no write lock: a dbt run that starts during another process's merge
    (or a key rotation's record) looks tokens up at once instead of waiting."""
    token = _service(vault_path).tokenize("email", ["known@example.com"])[0]
    merge = sqlite3.connect(vault_path, isolation_level=None)
    merge.execute("attach database ? as j", (str(journal_file_for(vault_path)),))
    merge.execute("begin immediate")  # both files' write locks
    try:
        late = VaultTokenService(SQLiteStore(vault_path, busy_timeout_s=0.2), cache_size=0)
        assert late.tokenize("email", ["known@example.com"]) == [token]
    finally:
        merge.execute("rollback")
        merge.close()


@pytest.mark.parametrize("tokens", ["one width", "several widths"])
def test_a_vector_is_appended_whole_and_in_order(vault_path: Path, tokens: str) -> None:
    """A vector's records go into the journal in one statement that cuts them out of bound
    blobs (row by row when its tokens differ in width): each row must hold its own record,
    typed as a row-by-row insert types it, in the vector's order (the in-memory index maps
    each token to its row by that order)."""
    from deid.stores.base import NewRecord

    store = SQLiteStore(vault_path, create=True, background_merge=False)
    version = store.keyring().current
    records = [NewRecord("email", os.urandom(32),
                         f"tok{i:05d}" if tokens == "one width" else f"tok{i}", "email",
                         version, os.urandom(28 + i % 300))
               for i in range(3000)]
    winners = store.insert_tokens(records, random_tokens=True)
    assert winners == {r.fingerprint: r.token for r in records}
    db = sqlite3.connect(journal_file_for(vault_path))
    rows = db.execute("select token, domain, fingerprint, kind, key_version, ciphertext, "
                      "typeof(token) || typeof(fingerprint) || typeof(ciphertext) "
                      "from journal order by seq").fetchall()
    db.close()
    assert [r[:6] for r in rows] == [(r.token, r.domain, r.fingerprint, r.kind, r.key_version,
                                      r.ciphertext) for r in records]
    assert {r[6] for r in rows} == {"textblobblob"}
    # The index agrees: another store finds each record by its token's row.
    other = SQLiteStore(vault_path)
    assert other.find_tokens("email", [r.fingerprint for r in records[::500]]) == {
        r.fingerprint: r.token for r in records[::500]}
    found = other.fetch_values([r.token for r in records[::500]])
    assert {t: v.ciphertext for t, v in found.items()} == {
        r.token: r.ciphertext for r in records[::500]}


def test_a_batch_of_new_records_is_the_same_as_column_or_as_rows() -> None:
    """Stores read a batch column by column or record by record: both read the same."""
    from deid.stores.base import NewRecord, NewRecords

    rows = [NewRecord("email", bytes([i]) * 32, f"tok{i}", "email", 1 + i % 2, bytes([i]))
            for i in range(5)]
    batch = NewRecords.of(rows)
    assert NewRecords.of(batch) is batch
    assert list(batch) == rows and batch[3] == rows[3] and len(batch) == 5
    assert list(batch[1:4]) == rows[1:4]
    assert list(batch.where([True, False, True, False, False])) == [rows[0], rows[2]]
    assert batch.key_versions == [1, 2, 1, 2, 1] and len(NewRecords.of([])) == 0
    with pytest.raises(ValueError, match="differ in length"):
        NewRecords(["email"], [], ["tok"], ["email"], [1], [b""])


def test_a_fresh_index_reads_the_journal_as_rows_would(vault_path: Path) -> None:
    """A new process reads the journal column by column in one row of joined strings; a
    value that holds the separator sends it back to reading row by row, with the same
    result either way."""
    from deid.stores.base import NewRecord

    svc = _service(vault_path)
    svc.tokenize("email", VALUES[:50])
    store = svc.store
    assert isinstance(store, SQLiteStore)
    db = store._db()
    rows = db.execute("select seq, domain, fingerprint, token from j.journal order by seq"
                      ).fetchall()
    assert list(zip(*store._journal_rows_after(db, 0), strict=True)) == rows
    assert list(zip(*store._journal_rows_after(db, rows[9][0]), strict=True)) == rows[10:]
    assert store._journal_rows_after(db, rows[-1][0]) == ([], [], [], [])
    odd = NewRecord("a\nb", os.urandom(32), "tok_with_a_newline_domain", "email",
                    store.keyring().current, os.urandom(40))
    store.insert_tokens([odd], random_tokens=True)
    other = SQLiteStore(vault_path)
    index = other._catch_up(other._db())
    assert index is not None
    assert index.by_fingerprint["a\nb"] == {odd.fingerprint: odd.token}
    assert len(index.by_token) == 51
