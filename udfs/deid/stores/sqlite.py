"""The embedded vault: an SQLite file and its journal file (WAL), safe under concurrent
threads and processes.

Convergence under concurrency: new tokens are appended inside a transaction that holds the
journal file's write lock (one appender at a time across processes) after looking every
fingerprint and token up in that same transaction, so two writers that see one new value
return one token.

New records land in an append-only journal, not in the indexed ``tokens`` table. A record in
``tokens`` sits at a random key in two B-trees (token, fingerprint), so each new value dirtied
about two pages that the commit wrote to the log and synced: a DuckDB vector of 2,048 new
values cost ~40 ms of commit, capping new values at ~45k/s. Journal rows are appended at
the end of one B-tree (a few pages per vector) and the commit stays synced: a token is on
disk before it is returned, as before. Each process indexes the journal in memory (catching
up on the rows appended since its last look, inside its own read snapshot), and once the
journal holds `journal_rows` records the process's merge thread copies them in token order
(sorted inserts dirty each page once) into ``recent``, and ``recent`` into ``tokens`` when it
is full (docs/decisions/007-sqlite-journal.md). The journal is a file of its own,
``<vault>.journal``, attached to every connection as ``j``: a merge holds the vault file's
write lock, not the journal's, so writers keep appending while it runs, and SQLite's C code
runs it on the second core (docs/decisions/008-journal-file.md). Rows leave the journal by a
merge (which records ``dropped_through``: indexes forget those rows) or by an erasure (which
bumps ``journal_epoch``: indexes are rebuilt).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import functools
import os
import secrets
import sqlite3
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import accumulate, chain, compress
from pathlib import Path
from typing import Any

from .. import _audit
from .. import keys as _keys
from .._policy import strongest
from .._url import parse_vault_url, sqlite_path
from ..errors import (
    AuditChainError,
    ConfigError,
    VaultKeyError,
    VaultNotFoundError,
    VaultUnavailableError,
)
from .base import (
    GENESIS,
    Erasure,
    NewRecord,
    NewRecords,
    Sealer,
    StoredValue,
    VaultStore,
    check_key_versions,
)

# 2: new records go to the journal first. Older deid versions read only `tokens` and would
# mint second tokens for values still in the journal, so they must not open such a vault.
# 3: the journal is a file of its own beside the vault (`<vault>.journal`), so a merge into
# the indexed levels (a write to the vault file) runs while writers append to the journal.
_SCHEMA_VERSION = 3
# Keep well under SQLITE_MAX_VARIABLE_NUMBER (32766 since 3.32).
_CHUNK = 2000
# Journal records before a process's merge thread moves them into `recent`: each process's
# index of the journal holds about this many entries (~300 bytes each), and a merge copies
# them in token order in one transaction (~1 s at this size into an empty level).
DEFAULT_JOURNAL_ROWS = 262_144
# The last journal row a merge has copied into the levels. The copy and the journal's
# delete are two files' transactions: rows up to the mark may still sit in the journal (same
# token, same value) until the delete commits.
_MERGED_THROUGH = ("(select coalesce(max(cast(value as integer)), 0) from main.meta "
                   "where key = 'merged_through')")
# Every record, wherever it is now, once (for counts, not for the hot paths).
_ALL_TOKENS = ("(select domain, kind, key_version from tokens union all "
               "select domain, kind, key_version from recent union all "
               "select domain, kind, key_version from j.journal where seq > "
               f"{_MERGED_THROUGH})")
# The indexed levels, newest first: the journal merges into `recent`, which merges into
# `tokens` once it holds RECENT_PER_JOURNAL journals' worth. A merge rewrites about every
# leaf page of the level it merges into (random keys), so a bounded `recent` keeps the
# frequent merge's cost bounded however large `tokens` grows.
_LEVELS = ("recent", "tokens")
RECENT_PER_JOURNAL = 8
# A merge inserts at random keys in one of each level's two B-trees; a page cache of this
# size during the merge (then given back) keeps more of those pages in memory: moving 4 M
# records took 37 s on the default 64 MiB, 30 s on this, 23 s on 1 GiB.
_MERGE_CACHE_KIB = 256 * 1024


class _JournalIndex:
    """One process's index of the journal at `epoch`: rows after `dropped` up to `seq`, by
    domain and fingerprint (for tokenize) and by token (for detokenize and the uniqueness
    check)."""

    __slots__ = ("by_fingerprint", "by_token", "dropped", "epoch", "seq")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seq = 0
        self.dropped = 0
        self.by_fingerprint: dict[str, dict[bytes, str]] = {}
        self.by_token: dict[str, int] = {}

    def drop(self, through: int) -> None:
        """Forget rows up to `through`, which a merge copied into a level and deleted. New
        dicts, not deletions: a thread reading the old ones meanwhile still sees a whole
        index (its rows are in the journal or, copied, in its later snapshot of a level)."""
        by_token = self.by_token
        self.by_token = {t: s for t, s in by_token.items() if s > through}
        self.by_fingerprint = {
            domain: {fp: t for fp, t in by_fp.items() if by_token[t] > through}
            for domain, by_fp in self.by_fingerprint.items()}
        self.dropped = through

    def tokens_of(self, domain: str, fingerprints: Sequence[bytes]) -> dict[bytes, str]:
        """fingerprint -> token for those of `fingerprints` the journal holds in `domain`."""
        journaled = self.by_fingerprint.get(domain, {})
        return {fp: journaled[fp] for fp in journaled.keys() & fingerprints}

    def add(self, seqs: Sequence[int], domains: Sequence[str],
            fingerprints: Sequence[bytes], tokens: Sequence[str]) -> None:
        """Index journal rows, given column by column in seq order: per domain, in C-level
        passes (a row at a time cost ~0.7 µs, on the path of every new value)."""
        if not seqs:
            return
        distinct = set(domains)
        for domain in distinct:
            fps, toks, sqs = fingerprints, tokens, seqs
            if len(distinct) > 1:
                pick = [i for i, d in enumerate(domains) if d == domain]
                fps = [fingerprints[i] for i in pick]
                toks = [tokens[i] for i in pick]
                sqs = [seqs[i] for i in pick]
            by_fp = self.by_fingerprint.get(domain)
            if by_fp is None:
                by_fp = self.by_fingerprint[domain] = {}
            by_fp.update(zip(fps, toks, strict=True))
            self.by_token.update(zip(toks, sqs, strict=True))
        self.seq = seqs[-1]


# The journal file, attached to every connection as `j`.
_JOURNAL_SCHEMA = """
create table if not exists j.journal_meta (key text primary key, value text not null);
create table if not exists j.journal (
    seq integer primary key autoincrement,
    token text not null,
    domain text not null,
    fingerprint blob not null,
    kind text not null,
    key_version integer not null,
    ciphertext blob not null
);
"""
_SCHEMA = """
create table if not exists meta (key text primary key, value text not null);
create table if not exists erased (
    token text primary key,
    domain text not null,
    kind text not null,
    erased_at text not null
) without rowid;
create index if not exists erased_by_time on erased (erased_at);
create table if not exists principals (
    principal text primary key,
    granted_at text not null,
    granted_by text not null
);
create table if not exists tokenize_grants (
    principal text not null,
    domain text not null,
    mode text not null check (mode in ('tokenize', 'lookup')),
    granted_at text not null,
    granted_by text not null,
    primary key (principal, domain)
);
create table if not exists audit (
    seq integer primary key,
    record text not null,
    prev text not null,
    hash text not null
);
"""
# Each indexed level (created after `erased`, which its trigger reads).
_LEVEL_SCHEMA = """
create table if not exists {level} (
    token text primary key,
    domain text not null,
    fingerprint blob not null,
    kind text not null,
    key_version integer not null,
    ciphertext blob not null
) without rowid;
create unique index if not exists {level}_by_fingerprint on {level} (domain, fingerprint);
create trigger if not exists {level}_never_reissue_erased before insert on {level}
    when exists (select 1 from erased where token = new.token)
    begin select raise(ignore); end;
"""
# A record's columns, in every level's order (the journal adds its seq in front).
_COLUMNS = "token, domain, fingerprint, kind, key_version, ciphertext"


# Appending a vector's records in one statement: SQLite cuts them out of four bound blobs
# (tokens of one width, 32-byte fingerprints, ciphertexts, and where each ciphertext ends as
# 8-digit numbers), in order. `executemany` binds six values and runs the statement once per
# row, and with `autoincrement` updates the sequence table once per row: 1.9 µs a record
# against 0.75 µs here (bench/bench.py measures the whole path). Records that do not fit
# (tokens of several widths, one call over several domains, kinds or key versions: rare) go
# row by row.
_APPEND_PACKED = f"""
with recursive r(i, s, e) as (
    select 0, 1, cast(substr(?5, 1, 8) as integer)
    union all
    select i + 1, e, cast(substr(?5, 8 * i + 9, 8) as integer) from r where i < ?1 - 1
)
insert into j.journal ({_COLUMNS})
select cast(substr(?2, ?6 * i + 1, ?6) as text), ?7, substr(?3, 32 * i + 1, 32), ?8, ?9,
       substr(?4, s, e - s)
from r order by i
"""
_OFFSET_LIMIT = 10**8  # 8 digits


def _append(db: sqlite3.Connection, records: NewRecords) -> int:
    """Append `records` to the journal in their order (seqs up to the one returned)."""
    tokens = list(map(str.encode, records.tokens))
    fingerprints, ciphertexts = records.fingerprints, records.ciphertexts
    ends = tuple(accumulate(map(len, ciphertexts), initial=1))[1:]
    widths = set(map(len, tokens))
    shared = set(zip(records.domains, records.kinds, records.key_versions, strict=True))
    if (len(widths) == 1 and ends[-1] < _OFFSET_LIMIT and set(map(len, fingerprints)) == {32}
            and len(shared) == 1):
        db.execute(_APPEND_PACKED, (len(records), b"".join(tokens), b"".join(fingerprints),
                                    b"".join(ciphertexts), (b"%08d" * len(ends)) % ends,
                                    widths.pop(), *shared.pop()))
    else:
        db.executemany(f"insert into j.journal ({_COLUMNS}) values (?, ?, ?, ?, ?, ?)",
                       zip(records.tokens, records.domains, fingerprints, records.kinds,
                           records.key_versions, ciphertexts, strict=True))
    return int(db.execute("select last_insert_rowid()").fetchone()[0])


@functools.lru_cache(maxsize=8)
def _positions(n: int) -> str:
    """'0,1,…,n-1': group_concat of a chunk's positions when SQLite kept the keys' order."""
    return ",".join(map(str, range(n)))


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def audit_key_file_for(vault_path: Path) -> Path:
    return vault_path.with_name(vault_path.name + ".audit-key")


def journal_file_for(vault_path: Path) -> Path:
    """The file new records are appended to: part of the vault (it holds the newest tokens)."""
    return vault_path.with_name(vault_path.name + ".journal")


# SQLite's error families (the prefix of sqlite3.Error.sqlite_errorname) → (what, the fix).
# SQLite's own message is never shown: a constraint message can name a column's content.
_FIXES = {
    "SQLITE_READONLY": ("the vault is read-only",
                        "give this process write access to the vault file and its directory "
                        "(SQLite writes -wal and -shm files beside it); a reader that only "
                        "looks tokens up still needs them"),
    "SQLITE_BUSY": ("the vault stayed locked by another writer past the busy timeout",
                    "retry; if it persists, look for a process holding a long write "
                    "transaction on the vault"),
    "SQLITE_LOCKED": ("the vault stayed locked by another writer past the busy timeout",
                      "retry; if it persists, look for a process holding a long write "
                      "transaction on the vault"),
    "SQLITE_CANTOPEN": ("the vault file cannot be opened",
                        "check that the path exists and this process may read and write it"),
    "SQLITE_PERM": ("the operating system refused access to the vault",
                    "give this process read and write access to the vault file"),
    "SQLITE_NOTADB": ("the file is not an SQLite database",
                      "point DEID_VAULT at the vault's .db file (not its .keys file)"),
    "SQLITE_CORRUPT": ("the vault file is corrupt",
                       "restore the vault and its key file from a backup"),
    "SQLITE_FULL": ("the disk holding the vault is full", "free space, then retry"),
    "SQLITE_IOERR": ("the disk holding the vault failed to read or write",
                     "check the disk and the mount, then retry"),
}


def _store_error(path: Path, doing: str, exc: sqlite3.Error) -> VaultUnavailableError:
    """A deid error for a sqlite3 failure: what failed and the fix, never SQLite's text."""
    code = str(getattr(exc, "sqlite_errorname", "") or type(exc).__name__)
    family = next((k for k in _FIXES if code.startswith(k)), None)
    if family is None:
        return VaultUnavailableError(f"deid vault: {doing} {path} failed ({code})")
    what, fix = _FIXES[family]
    return VaultUnavailableError(f"deid vault: {doing} {path} failed: {what} ({code}); {fix}")


class SQLiteStore(VaultStore):
    """The embedded vault. It must exist unless `create` is set (`deid init`): opening a
    missing vault would otherwise start a second, empty token space without a word.

    Its audit log is forward-secure (deid._audit): every process that appends holds only the
    current signing state, kept in the vault; K_1, which verifies the log, is written once to
    ``<vault>.audit-key`` when the log starts, for the auditor to take away. A reader who holds
    the key file (to detokenize) can still append, but cannot re-seal, drop or cut off
    records already written. Vaults whose log started before this are verified with the key
    file's audit key, as before (`forward_audit=False` keeps a new vault that way too).
    """

    merger_idle_s = 5.0  # a merge thread ends after this long without work

    def __init__(self, path: Path, *, create: bool = False, busy_timeout_s: float = 60.0,
                 synchronous: str = "full", cache_mib: int = 64, mmap_mib: int = 1024,
                 forward_audit: bool = True, keys: str | None = None,
                 journal_rows: int = DEFAULT_JOURNAL_ROWS,
                 recent_rows: int | None = None, background_merge: bool = True) -> None:
        if synchronous not in ("full", "normal"):
            raise ConfigError("deid vault: synchronous must be 'full' (every commit reaches the "
                              "disk) or 'normal' (survives a process crash, not a power loss)")
        self.path = Path(path)
        self.journal_path = journal_file_for(self.path)
        self.url = f"sqlite:///{self.path}"
        self._keys_json = keys  # DEID_KEYS, as the host read it; None: the key file
        self._timeout = busy_timeout_s
        self._synchronous = synchronous
        self._cache_kib = int(cache_mib) * 1024
        self._mmap_bytes = int(mmap_mib) * 1024 * 1024
        self._local = threading.local()
        self._journal_rows = journal_rows
        self._recent_rows = recent_rows or RECENT_PER_JOURNAL * journal_rows
        self._background_merge = background_merge
        self._journal = _JournalIndex(-1)
        self._journal_lock = threading.Lock()
        # Threads of this process queue here for each file's write lock (journal first when
        # a transaction writes both), woken as soon as the writer ahead commits, where
        # SQLite's busy handler would have them sleep and poll (sleeps of up to 100 ms).
        # Other processes still wait through the busy timeout.
        self._append_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._merger: threading.Thread | None = None
        self._exiting = False
        self._merger_lock = threading.Lock()
        self._merge_wanted = threading.Event()
        if create:
            _create_directory(self.path)
        elif not self.path.is_file():
            raise VaultNotFoundError(
                f"deid vault: no vault at {self.path.absolute()}; create it once with "
                f"`deid init --vault sqlite:///{self.path.absolute()}` (or `deid init` in the dbt "
                "project), or point DEID_VAULT / the plugin's `vault` at the existing vault. "
                "deid never creates a vault while building or querying")
        journal_existed = self.journal_path.is_file()
        with self._tx(write=False) as db:
            ready = self._ready(db, forward_audit)
        if not ready:
            self._prepare(db, journal_existed, forward_audit)
        for made in (self.path, self.journal_path):
            with contextlib.suppress(OSError):  # e.g. a mount owned by someone else
                made.chmod(0o600)

    def _ready(self, db: sqlite3.Connection, forward_audit: bool) -> bool:
        """Whether the vault needs no write to be opened: this schema, its own journal file,
        its audit log started. Opening then takes no lock, so a process starting while a
        merge writes the vault file does not wait for it."""
        if not db.execute("select 1 from main.sqlite_master where name = 'meta'").fetchone():
            return False
        row = db.execute("select value from main.meta where key = 'schema_version'").fetchone()
        if row is not None and int(row[0]) > _SCHEMA_VERSION:
            raise ConfigError(
                f"deid vault: {self.path} has schema version {row[0]}, newer than this "
                f"deid understands ({_SCHEMA_VERSION}); upgrade deid on this host")
        if row is None or int(row[0]) != _SCHEMA_VERSION or not db.execute(
                "select 1 from j.sqlite_master where name = 'journal_meta'").fetchone():
            return False
        ours = db.execute("select value from main.meta where key = 'journal_id'").fetchone()
        theirs = db.execute("select value from j.journal_meta where key = 'journal_id'"
                            ).fetchone()
        return ours is not None and ours == theirs and (self._audit_started(db)
                                                         or not forward_audit)

    @staticmethod
    def _audit_started(db: sqlite3.Connection) -> bool:
        return bool(db.execute("select 1 from main.meta where key = 'audit_state'").fetchone()
                    or db.execute("select 1 from main.audit limit 1").fetchone())

    def _prepare(self, db: sqlite3.Connection, journal_existed: bool,
                 forward_audit: bool) -> None:
        """Create what the vault lacks, pair its journal file, start its audit log."""
        # Tables first, one autocommit statement each (the trigger's body holds a ';' of its
        # own): a transaction below takes each file's lock through its meta table.
        schema = (_JOURNAL_SCHEMA + _SCHEMA
                  + "".join(_LEVEL_SCHEMA.format(level=lv) for lv in _LEVELS))
        try:
            for statement in schema.split(";\n"):
                if statement.strip():
                    db.execute(statement)
        except sqlite3.Error as exc:
            raise _store_error(self.path, "creating the tables of", exc) from None
        with self._tx(journal=True) as db:
            self._pair_journal(db, journal_existed)
            db.execute("insert or replace into meta values ('schema_version', ?)",
                       (str(_SCHEMA_VERSION),))
            if forward_audit and not self._audit_started(db):
                first = _audit.create_audit_key_file(audit_key_file_for(self.path))
                self._put_state(db, 1, first)

    def _pair_journal(self, db: sqlite3.Connection, journal_existed: bool) -> None:
        """Check that the journal file is this vault's (a random id in both files), or make
        it so for a new vault, moving a schema-2 journal table into `recent` on the way."""
        ours = db.execute("select value from main.meta where key = 'journal_id'").fetchone()
        theirs = db.execute("select value from j.journal_meta where key = 'journal_id'"
                            ).fetchone()
        if ours is None and theirs is None:
            if db.execute("select 1 from main.sqlite_master where type = 'table' and "
                          "name = 'journal'").fetchone():
                db.execute(f"insert into main.recent select {_COLUMNS} from main.journal "
                           "order by token")
                db.execute("drop table main.journal")
            made = secrets.token_hex(16)
            db.execute("insert into main.meta values ('journal_id', ?)", (made,))
            db.execute("insert into j.journal_meta values ('journal_id', ?)", (made,))
            return
        if ours is None or theirs is None or ours[0] != theirs[0]:
            what = ("is missing" if not journal_existed or theirs is None
                    else "belongs to another vault")
            raise VaultUnavailableError(
                f"deid vault: the journal file {self.journal_path} {what}; it holds the "
                f"vault's newest tokens and values: restore it together with {self.path} "
                "(copy the vault's files together, with their -wal files)")

    # -- connections ------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                                     check_same_thread=True)
                db.execute("attach database ? as j", (str(self.journal_path),))
                for schema in ("main", "j"):
                    db.execute(f"pragma {schema}.journal_mode=wal")
                    # FULL (default): a token that reached a mart must never be lost from the
                    # vault, and an audit record is on disk before the values it covers leave.
                    db.execute(f"pragma {schema}.synchronous={self._synchronous}")
                    # The page cache is part of the memory bound: fixed, not grown with the
                    # vault.
                    db.execute(f"pragma {schema}.cache_size=-{self._cache_kib}")
                    # Reads through a memory map: a fresh process looks tokens up without a
                    # system call per page (bounded, and the kernel may reclaim these pages).
                    db.execute(f"pragma {schema}.mmap_size={self._mmap_bytes}")
                    db.execute(f"pragma {schema}.secure_delete=on")  # see Erasure below
                    db.execute(f"pragma {schema}.journal_size_limit=67108864")
                db.execute("pragma foreign_keys=on")
                # A merge writes a quarter of a million records at once: checkpoint every 64
                # MiB of log, not SQLite's 4 MiB, and cut the log back afterwards (above).
                db.execute("pragma wal_autocheckpoint=16384")
            except sqlite3.Error as exc:
                if db is not None:
                    db.close()
                raise _store_error(self.path, "opening", exc) from None
            self._local.db = db
        return db

    @contextmanager
    def _tx(self, write: bool = True, *, journal: bool = False
            ) -> Iterator[sqlite3.Connection]:
        """A transaction that writes the vault file (`write`), the journal file (`journal`),
        both, or neither (a read). Its write locks are taken when it begins, the journal's
        first: no lock is ever upgraded, and two transactions never wait for each other's."""
        with contextlib.ExitStack() as held:
            locks = []
            if journal:
                held.enter_context(self._append_lock)
                locks.append("j.journal_meta")
            if write:
                held.enter_context(self._write_lock)
                locks.append("main.meta")
            with self._begun(locks) as db:
                yield db

    @contextmanager
    def _begun(self, locks: Sequence[str]) -> Iterator[sqlite3.Connection]:
        db = self._db()
        try:
            db.execute("begin")
            for table in locks:  # a write that changes nothing takes that file's lock
                db.execute(f"update {table} set value = value where 0")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("rollback")
            raise _store_error(self.path, "a transaction on", exc) from None
        try:
            yield db
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                db.execute("rollback")
            if isinstance(exc, sqlite3.Error):
                raise _store_error(self.path, "writing to", exc) from None
            raise
        try:
            db.execute("commit")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("rollback")
            raise _store_error(self.path, "committing to", exc) from None

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise _store_error(self.path, "reading", exc) from None

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- keys -----------------------------------------------------------------------------

    def rotate_keyring(self, seen_current: int) -> tuple[_keys.FileKeyring, bool]:
        key_file = _keys.require_file_source(self.keyring())
        with _keys.key_file_lock(key_file):
            on_disk = self._own(_keys.read_key_file(key_file))
            made = on_disk.current == seen_current
            ring = on_disk.rotated() if made else on_disk
            if made:
                # The key file first: a version is recorded as current only once its key
                # exists, so a writer told to reload always finds it.
                _keys.write_key_file(key_file, ring, exclusive=False)
            # Both files' locks: a writer appending under the old version holds the
            # journal's, and finishes first or sees the new current version.
            with self._tx(journal=True) as db:
                self._record_current(db, ring.current)
        self.reload_keyring()
        return ring, made

    def retire_key_version(self, version: int) -> _keys.FileKeyring:
        key_file = _keys.require_file_source(self.keyring())
        with _keys.key_file_lock(key_file):
            ring = self._own(_keys.read_key_file(key_file)).without(version)
            # Counted under the lock and after the rotation recorded a newer current version,
            # so no writer can add a record under `version` any more.
            left = self._read(f"select count(*) from {_ALL_TOKENS} where key_version = ?",
                              (version,))[0][0]
            if left:
                raise VaultKeyError(f"deid keys: {left} records are still encrypted under key "
                                    f"version {version}; run deid keys rewrap first")
            _keys.write_key_file(key_file, ring, exclusive=False)
        self.reload_keyring()
        return ring

    def _own(self, ring: _keys.FileKeyring) -> _keys.FileKeyring:
        if ring.check_value() != self.keyring().check_value():
            raise VaultKeyError("deid keys: the key file now holds a different fingerprint key "
                                "(every token would change); restore the vault's own key file")
        return ring

    @staticmethod
    def _record_current(db: sqlite3.Connection, version: int) -> None:
        db.execute("insert into meta values ('key_current', ?) on conflict (key) do update "
                   "set value = excluded.value where cast(value as integer) < "
                   "cast(excluded.value as integer)", (str(version),))

    def _load_keyring(self) -> _keys.FileKeyring:
        empty = not self._read(f"select 1 from {_ALL_TOKENS} limit 1") and not self._read(
            "select 1 from meta where key = 'key_check'")
        ring = _keys.load_or_create(_keys.key_file_for(self.path), create=empty,
                                    keys=self._keys_json)
        check = ring.check_value()
        stored = self._read("select value from meta where key = 'key_check'")
        if not stored:  # the first keys of this vault: recorded once, by whoever is first
            with self._tx() as db:
                db.execute("insert or ignore into meta values ('key_check', ?)", (check,))
                stored = db.execute("select value from meta where key = 'key_check'").fetchall()
        if stored[0][0] != check:
            raise VaultKeyError(
                f"deid keys: {ring.source} does not belong to the vault {self.path} "
                "(its fingerprint key differs); use the vault's own key file")
        return ring

    # -- the journal ------------------------------------------------------------------------

    def _catch_up(self, db: sqlite3.Connection, *, writing: bool = False) -> _JournalIndex | None:
        """This process's journal index, brought up to `db`'s open transaction. None when
        that snapshot predates an erasure the index already reflects (another thread of this
        process saw it first): the caller then reads the journal itself. A writer's snapshot
        is the newest, so it always gets an index. Rows a merge deleted are dropped from the
        index, not read again: an index behind a merge costs no more than the merge's rows."""
        epoch, dropped = self._journal_marks(db)
        with self._journal_lock:
            index = self._journal
            if epoch < index.epoch and not writing:
                return None
            if epoch != index.epoch:
                index = _JournalIndex(epoch)
            if dropped > index.dropped:
                index.drop(dropped)
            index.add(*self._journal_rows_after(db, index.seq))
            self._journal = index
            return index

    @staticmethod
    def _journal_rows_after(db: sqlite3.Connection, seq: int
                            ) -> tuple[list[int], list[str], list[bytes], list[str]]:
        """The journal's rows after `seq`, column by column in seq order: one row of four
        strings, split in C (a fresh process indexes up to a quarter of a million rows, at
        ~2 µs a row as tuples). Each row adds to all four in the same step, so positions
        agree; the order is SQLite's scan order, not a promise: checked, as are the
        separators."""
        n, seqs, domains, fingerprints, tokens = db.execute(
            "select count(*), group_concat(seq), group_concat(domain, char(10)), "
            "group_concat(hex(fingerprint)), group_concat(token, char(10)) "
            "from j.journal where seq > ?", (seq,)).fetchone()
        if not n:
            return [], [], [], []
        columns = (list(map(int, seqs.split(","))), domains.split("\n"),
                   list(map(bytes.fromhex, fingerprints.split(","))), tokens.split("\n"))
        if any(len(column) != n for column in columns) or columns[0] != sorted(columns[0]):
            # Not in seq order, or a separator inside a value: row by row.
            rows = db.execute("select seq, domain, fingerprint, token from j.journal "
                              "where seq > ? order by seq", (seq,)).fetchall()
            columns = tuple(map(list, zip(*rows, strict=True)))  # type: ignore[assignment]
        return columns

    @staticmethod
    def _journal_marks(db: sqlite3.Connection) -> tuple[int, int]:
        """(epoch, dropped) in `db`'s open transaction: the epoch is bumped by every erasure
        (an index of an older one is rebuilt); `dropped` is the last row a merge deleted
        after copying it into a level (the only way a record enters one)."""
        marks = dict(db.execute("select key, cast(value as integer) from j.journal_meta "
                                "where key in ('journal_epoch', 'dropped_through')"))
        return marks.get("journal_epoch", 0), marks.get("dropped_through", 0)

    def _learn(self, epoch: int, after: int, last: int, records: NewRecords) -> None:
        """After a commit: add what this writer appended (seqs after+1..last) to the index,
        unless another thread moved the index on."""
        with self._journal_lock:
            index = self._journal
            if index.epoch != epoch or index.seq != after:
                return  # the next catch-up reads them
            index.add(range(last - len(records) + 1, last + 1), records.domains,
                      records.fingerprints, records.tokens)

    @staticmethod
    def _select_in(db: sqlite3.Connection, sql: str, head: tuple[Any, ...],
                   keys: Sequence[Any]) -> list[tuple[Any, ...]]:
        """`sql` ends with ``in``: run it over `keys` in chunks, after the `head` arguments."""
        out: list[tuple[Any, ...]] = []
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            out += db.execute(f"{sql} ({','.join('?' * len(chunk))})", (*head, *chunk)).fetchall()
        return out

    @staticmethod
    def _probe(db: sqlite3.Connection, keys: Sequence[Any], tables: Sequence[str],
               column: str, domain: str | None = None, select: str = "t.token"
               ) -> list[tuple[Any, ...]]:
        """(key, *`select`) for each of `keys` found in `tables` by `column` (within `domain`
        if given): the keys are bound once per chunk, as a VALUES table joined to every
        table's index, where one ``in (…)`` list per table bound and sorted them again for
        each (a third less time for two levels)."""
        out: list[tuple[Any, ...]] = []
        where = f"t.{column} = w.k" + (" and t.domain = ?" if domain is not None else "")
        union = " union all ".join(f"select w.k, {select} from w join {table} t on {where}"
                                   for table in tables)
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            args = (*chunk, *([domain] * len(tables) if domain is not None else ()))
            out += db.execute(f"with w(k) as (values {','.join(['(?)'] * len(chunk))}) {union}",
                              args).fetchall()
        return out

    @staticmethod
    def _holding(db: sqlite3.Connection, tables: Sequence[str]) -> tuple[str, ...]:
        """The `tables` that hold a row in this snapshot. Probing an empty level still costs
        ~0.45 µs a key, and a first build into a new vault looks every value up in two."""
        flags = db.execute("select " + ", ".join(f"exists (select 1 from {t})"
                                                  for t in tables)).fetchone()
        return tuple(compress(tables, flags))

    @staticmethod
    def _tokens_by_fingerprint(db: sqlite3.Connection, fingerprints: Sequence[bytes],
                               domain: str) -> dict[bytes, str]:
        """`_probe` of the levels by fingerprint, with the tokens returned as one string per
        chunk in the keys' order ('' for a miss; a token never holds a newline) instead of a
        row each: a third less time per value. The order of SQLite's group_concat is its scan
        order, not a promise, so the keys' positions come back beside the tokens and a chunk
        whose order differs is looked up again row by row. Empty levels are left out."""
        out: dict[bytes, str] = {}
        levels = SQLiteStore._holding(db, _LEVELS)
        if not levels:
            return out
        joins = " ".join(f"left join {lv} on {lv}.domain = ? and {lv}.fingerprint = w.k"
                         for lv in levels)
        found_in = ", ".join(f"{lv}.token" for lv in levels)
        for i in range(0, len(fingerprints), _CHUNK):
            chunk = fingerprints[i : i + _CHUNK]
            order, tokens = db.execute(
                f"with w(i, k) as (values {','.join(['(?, ?)'] * len(chunk))}) "
                f"select group_concat(w.i), group_concat(coalesce({found_in}, ''), char(10)) "
                f"from w {joins}",
                (*chain.from_iterable(enumerate(chunk)), *[domain] * len(levels))).fetchone()
            if order != _positions(len(chunk)):
                out.update(SQLiteStore._probe(db, chunk, levels, "fingerprint", domain))
                continue
            found = tokens.split("\n")
            out.update(compress(zip(chunk, found, strict=True), found))
        return out

    # -- tokens -----------------------------------------------------------------------------

    def find_tokens(self, domain: str, fingerprints: Sequence[bytes]) -> dict[bytes, str]:
        with self._tx(write=False) as db:
            index = self._catch_up(db)
            if index is not None:
                found = index.tokens_of(domain, fingerprints)
            else:
                found = dict(self._select_in(
                    db, "select fingerprint, token from j.journal where domain = ? and "
                    "fingerprint in", (domain,), fingerprints))
            rest = [fp for fp in fingerprints if fp not in found] if found else fingerprints
            if rest:
                found.update(self._tokens_by_fingerprint(db, rest, domain))
            # For this thread's next insert: the fingerprints the levels lacked in this
            # snapshot, and its epoch (see insert_tokens).
            self._local.absent = (self._journal_marks(db), domain,
                                  set(rest).difference(found))
            return found

    def insert_tokens(self, records: Sequence[NewRecord], *,
                      random_tokens: bool = False) -> dict[bytes, str]:
        """Append the records whose fingerprint and token are both new to the journal (in one
        synced commit) and return fingerprint -> token for every record: its own token, or
        the token another writer minted for the value first. A record whose proposed token
        is taken by another value (or was erased) is left out, for the caller to retry."""
        if not records:
            return {}
        records = NewRecords.of(records)
        # What this thread's last lookup found absent from the levels. Only a merge adds
        # records to a level, and they stay in the journal until it moves `dropped`: at the
        # same marks, a fingerprint absent then is absent from the levels now or in the
        # journal (whose index is caught up below). Saves looking each new value up twice.
        absent_marks, absent_domain, absent = self._local.__dict__.pop("absent",
                                                                       (None, None, set()))
        # The journal file's lock only: a merge may be writing the vault file meanwhile.
        # The levels are read in a snapshot taken after the lock (see _merge).
        with self._tx(write=False, journal=True) as db:
            row = db.execute("select value from meta where key = 'key_current'").fetchone()
            newer = check_key_versions(int(row[0]) if row else None, records)
            index = self._catch_up(db, writing=True)
            assert index is not None
            epoch, after = index.epoch, index.seq
            marks = (index.epoch, index.dropped)
            winners: dict[bytes, str] = {}
            domains = set(records.domains)
            for domain in domains:
                fps = records.fingerprints if len(domains) == 1 else list(compress(
                    records.fingerprints, [d == domain for d in records.domains]))
                winners.update(index.tokens_of(domain, fps))
                unseen = [fp for fp in fps if fp not in winners] if winners else fps
                if (absent_marks != marks or absent_domain != domain
                        or not absent.issuperset(unseen)):
                    winners.update(self._tokens_by_fingerprint(db, unseen, domain))
            fresh = records.where([fp not in winners for fp in records.fingerprints]) \
                if winners else records
            proposed = fresh.tokens
            holding = () if random_tokens else self._holding(db, (*_LEVELS, "erased"))
            taken = {t for t, _t in self._probe(db, proposed, holding, "token")} if holding \
                else set()
            taken.update(index.by_token.keys() & proposed)
            if (not taken and len(set(proposed)) == len(proposed)
                    and len(set(fresh.fingerprints)) == len(proposed)):
                new = fresh  # no collision, no repeated value: the common case
                winners.update(zip(fresh.fingerprints, proposed, strict=True))
            else:
                keep = []
                for fp, token in zip(fresh.fingerprints, proposed, strict=True):
                    # A collision (retried by the caller), or a repeated value: left out.
                    kept = token not in taken and fp not in winners
                    if kept:
                        taken.add(token)
                        winners[fp] = token
                    keep.append(kept)
                new = fresh.where(keep)
            last = _append(db, new) if new else after
            pending = len(index.by_token) + len(new)
        if newer is not None:
            # Records under a key version the vault has not recorded as current (a rotation
            # wrote the key file and stopped before recording it): record it, as a rotation
            # does, with both files locked; the records stand (the version's key exists).
            with self._tx(journal=True) as db:
                self._record_current(db, newer)
        self._learn(epoch, after, last, new)
        if pending >= self._journal_rows:
            self._merge_soon(pending)
        return winners

    # -- merges -----------------------------------------------------------------------------
    #
    # A merge copies journal rows into `recent` in one transaction on the vault file, with the
    # mark `merged_through`, then deletes them from the journal and records `dropped_through`
    # in one transaction on the journal file. Neither waits for the other file's lock, so
    # writers keep appending while a merge writes the vault file (on its own thread, and
    # SQLite runs without the interpreter lock: on another core). Readers and writers read
    # the journal before the levels: a row absent from their journal snapshot was deleted
    # after its copy committed, so their later snapshot of the vault file holds the copy.
    # Between the two commits (or after a crash there) a record is in both files, with the
    # same token and value; the next merge starts by finishing the delete.

    def _merge_soon(self, pending: int) -> None:
        """The journal holds `pending` rows, at least `journal_rows`: merge on this process's
        merge thread, or here if the journal has grown to four times that (the merges cannot
        keep up, or they fail: then this writer sees why)."""
        if not self._background_merge or pending >= 4 * self._journal_rows:
            self.merge_journal()
            return
        with self._merger_lock:
            self._merge_wanted.set()
            if self._merger is None or not self._merger.is_alive():
                self._merger = threading.Thread(target=self._merge_loop, daemon=True,
                                                name="deid-vault-merge")
                self._merger.start()
                _merging.add(self)

    def _merge_loop(self) -> None:
        """The merge thread: merges when woken, ends after a few idle seconds (or at once when
        the process exits, after the merge under way)."""
        if sys.platform == "linux":  # a thread's nice value is its own there
            with contextlib.suppress(OSError):
                # Maintenance: the cores go to the queries and the writers first.
                me = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, me,
                               min(19, os.getpriority(os.PRIO_PROCESS, me) + 10))
        try:
            while True:
                woken = self._merge_wanted.wait(timeout=self.merger_idle_s)
                with self._merger_lock:  # no writer can wake it between look and exit
                    if self._exiting or not (woken or self._merge_wanted.is_set()):
                        self._merger = None
                        return
                    self._merge_wanted.clear()
                try:
                    self.merge_journal(only_if_full=True)
                except Exception:
                    # The journal grows, and the writer that finds it at four times
                    # `journal_rows` merges itself: the error reaches it.
                    with self._merger_lock:
                        self._merger = None
                    return
        finally:
            self.close()  # this thread's connection

    def finish_merging(self) -> None:
        """Let the merge under way finish, and stop this process's merge thread (at exit: a
        merge cut off by the exit would be done again by the next process that fills the
        journal, and every process meanwhile reads the unmerged rows into its index). A merge
        wanted but not begun is left to the next process."""
        with self._merger_lock:
            self._exiting = True
            self._merge_wanted.set()
        merger = self._merger
        if merger is not None:
            merger.join()

    def merge_journal(self, *, down: bool = False, only_if_full: bool = False) -> int:
        """Merge the journal into `recent` now (and `recent` into `tokens` when it is full,
        or `down`); return how many journal records moved. `only_if_full`: unless another
        process merged meanwhile."""
        self._drop_merged()
        with self._tx() as db:  # the vault file
            mark = db.execute(f"select {_MERGED_THROUGH}").fetchone()[0]
            # The journal's snapshot is taken here, after the vault file's lock. An empty
            # journal leaves the mark where it is (sequence numbers are never reused).
            last = max(mark, db.execute("select coalesce(max(seq), 0) from j.journal"
                                        ).fetchone()[0])
            if only_if_full and last - mark < self._journal_rows:
                return 0
            db.execute(f"pragma main.cache_size=-{max(self._cache_kib, _MERGE_CACHE_KIB)}")
            try:
                moved = db.execute(f"insert into main.recent select {_COLUMNS} from j.journal "
                                   "where seq > ? and seq <= ? order by token",
                                   (mark, last)).rowcount
                db.execute("insert into main.meta values ('merged_through', ?) on conflict "
                           "(key) do update set value = excluded.value", (str(last),))
                full = db.execute("select count(*) from recent").fetchone()[0] \
                    >= self._recent_rows
                if down or full:
                    db.execute(f"insert into tokens select {_COLUMNS} from recent "
                               "order by token")
                    db.execute("delete from recent")
            finally:
                db.execute(f"pragma main.cache_size=-{self._cache_kib}")
        self._drop_merged()
        # The merge left ~100 MB in the vault file's log. Its commit's automatic checkpoint
        # stops at the first reader's snapshot, and every later commit to the vault file (a
        # detokenize audit record) tried again: 0.7 ms more per commit, measured. Empty the
        # log here, off the writers' threads, once readers have moved on. The checkpoint
        # holds the vault file's writers while it waits: a second at most (a reader that
        # stays longer leaves it to the next merge).
        db = self._db()
        try:
            db.execute("pragma busy_timeout = 1000")
            db.execute("pragma main.wal_checkpoint(truncate)")
            # The journal's delete logged its pages too: copy what readers allow, without
            # holding up the writers appending meanwhile.
            db.execute("pragma j.wal_checkpoint(passive)")
        except sqlite3.Error:
            pass
        finally:
            db.execute(f"pragma busy_timeout = {int(self._timeout * 1000)}")
        return int(moved)

    def _drop_merged(self) -> None:
        """Delete the journal rows a merge has copied (its second transaction)."""
        with self._tx(write=False, journal=True) as db:
            mark = db.execute(f"select {_MERGED_THROUGH}").fetchone()[0]
            if db.execute("delete from j.journal where seq <= ?", (mark,)).rowcount:
                db.execute("insert into j.journal_meta values ('dropped_through', ?) on "
                           "conflict (key) do update set value = excluded.value", (str(mark),))

    def fetch_values(self, tokens: Sequence[str]) -> dict[str, StoredValue]:
        out: dict[str, StoredValue] = {}
        with self._tx(write=False) as db:
            index = self._catch_up(db)
            rows: list[tuple[Any, ...]]
            if index is None:
                rows = self._select_in(db, "select token, key_version, ciphertext from "
                                       "j.journal where token in", (), tokens)
            else:
                seq_of = index.by_token
                rows = self._select_in(db, "select token, key_version, ciphertext from "
                                       "j.journal where seq in", (), [seq_of[t] for t in tokens
                                                                      if t in seq_of])
            for token, version, blob in rows:
                out[token] = StoredValue(version, blob)
            rest = [t for t in tokens if t not in out] if out else tokens
            for token, version, blob in self._probe(db, rest, _LEVELS, "token",
                                                    select="t.key_version, t.ciphertext"):
                out[token] = StoredValue(version, blob)
        return out

    def iter_values(self, batch_size: int = 10_000) -> Iterator[list[tuple[str, StoredValue]]]:
        # Each table in the order of its own key; a record merged meanwhile may be seen
        # twice or not at all, so callers loop until nothing is left to do (keys rewrap).
        # Journal rows up to the merge mark have their copy in a level: read there.
        for table, key, first in (("tokens", "token", ""), ("recent", "token", ""),
                                  ("j.journal", "seq", None)):
            last: Any = self._read(f"select {_MERGED_THROUGH}")[0][0] if first is None else first
            while True:
                rows = self._read(
                    f"select {key}, token, key_version, ciphertext from {table} "
                    f"where {key} > ? order by {key} limit ?", (last, batch_size))
                if not rows:
                    break
                yield [(t, StoredValue(v, b)) for _k, t, v, b in rows]
                last = rows[-1][0]

    def update_values(self, rows: Sequence[tuple[str, StoredValue, StoredValue]]) -> int:
        with self._tx(journal=True) as db:
            index = self._catch_up(db, writing=True)
            assert index is not None
            seq = index.by_token
            mark = db.execute(f"select {_MERGED_THROUGH}").fetchone()[0]

            def update(table: str, key: str, which: list[tuple[Any, ...]]) -> int:
                before = db.total_changes
                db.executemany(f"update {table} set key_version = ?, ciphertext = ? where "
                               f"{key} = ? and key_version = ? and ciphertext = ?", which)
                return db.total_changes - before

            def args(keyed: Iterable[tuple[Any, StoredValue, StoredValue]]
                     ) -> list[tuple[Any, ...]]:
                return [(new.key_version, new.ciphertext, k, old.key_version, old.ciphertext)
                        for k, old, new in keyed]

            journaled = args((seq[t], old, new) for t, old, new in rows if t in seq)
            leveled = args((t, old, new) for t, old, new in rows if t not in seq)
            # A journal row up to the merge mark has its copy in a level too: both change,
            # counted once.
            copied = args((t, old, new) for t, old, new in rows if t in seq and seq[t] <= mark)
            changed = update("j.journal", "seq", journaled)
            for level in _LEVELS:
                changed += update(level, "token", leveled)
                update(level, "token", copied)
            return changed

    # -- erasure ----------------------------------------------------------------------------
    #
    # secure_delete (on for every connection) overwrites the deleted rows' bytes in the
    # database file, and the bytes a B-tree moves when it splits or merges pages (a journal
    # merge deletes every journal row: without it, a copy of each merged ciphertext would stay
    # in free pages after the record's erasure), and a TRUNCATE
    # checkpoint empties the WAL that still holds the pages written when the record was
    # minted: the ciphertext must not outlive the erasure in the file (whoever holds the key
    # file could decrypt a leftover copy). The trigger on tokens keeps an erased token from
    # being issued again (random tokens of small formats do collide); writers are serialized
    # by BEGIN IMMEDIATE, so no insert can slip between an erasure's check and its delete.

    def _erase_where(self, domain: str, column: str,
                     keys: Sequence[bytes] | Sequence[str]) -> list[Erasure]:
        at = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        out: list[Erasure] = []
        journal_changed = False
        with self._tx(journal=True) as tx:
            for i in range(0, len(keys), _CHUNK):
                chunk = list(keys[i : i + _CHUNK])
                marks = ",".join("?" * len(chunk))
                rows = [(level, t, k) for level in _LEVELS for t, k in tx.execute(
                    f"select token, kind from {level} where domain = ? and {column} in "
                    f"({marks})", (domain, *chunk)).fetchall()]
                # The journal has no index but its rowid: a scan (erasures are rare).
                recent = tx.execute(
                    f"select token, kind, seq from j.journal where domain = ? and {column} "
                    f"in ({marks})", (domain, *chunk)).fetchall()
                if not rows and not recent:
                    continue
                # A record merged but not yet deleted from the journal is in both: once.
                found = [Erasure(t, domain, k, at) for t, k in dict(
                    [*((t, k) for _l, t, k in rows), *((t, k) for t, k, _s in recent)]).items()]
                tx.executemany("insert into erased values (?, ?, ?, ?)",
                               [(e.token, e.domain, e.kind, e.erased_at) for e in found])
                for level in _LEVELS:
                    tx.executemany(f"delete from {level} where token = ?",
                                   [(t,) for at_level, t, _k in rows if at_level == level])
                out.extend(found)
                if recent:
                    tx.executemany("delete from j.journal where seq = ?",
                                   [(seq,) for _t, _k, seq in recent])
                    journal_changed = True
            if journal_changed:
                # Processes drop their index of the journal (it names erased tokens).
                tx.execute("insert into j.journal_meta values ('journal_epoch', '1') on "
                           "conflict (key) do update set value = cast(value as integer) + 1")
            if out:
                tx.execute("insert into meta values ('erasure_epoch', '1') on conflict "
                           "(key) do update set value = cast(value as integer) + 1")
        return out

    def record_erasures(self, erasures: Sequence[Erasure]) -> None:
        with self._tx() as tx:
            tx.executemany("insert or ignore into erased values (?, ?, ?, ?)",
                           [(e.token, e.domain, e.kind, e.erased_at) for e in erasures])
            tx.execute("insert into meta values ('erasure_epoch', '1') on conflict "
                       "(key) do update set value = cast(value as integer) + 1")

    def erase(self, domain: str, fingerprints: Sequence[bytes]) -> list[Erasure]:
        return self._erase_where(domain, "fingerprint", fingerprints)

    def purge_erased(self) -> None:
        db = self._db()
        try:
            busy = sum(db.execute(f"pragma {schema}.wal_checkpoint(truncate)").fetchone()[0]
                       for schema in ("main", "j"))
        except sqlite3.Error:
            busy = 1
        if busy:
            raise VaultUnavailableError(
                f"deid forget: erased, but the write-ahead logs of {self.path} could not be "
                "emptied while other processes read the vault; it may still hold the erased "
                "ciphertext: run the same deid forget again when they are done")

    def erase_tokens(self, domain: str, tokens: Sequence[str]) -> list[Erasure]:
        return self._erase_where(domain, "token", tokens)

    def erased(self, tokens: Sequence[str]) -> dict[str, Erasure]:
        out: dict[str, Erasure] = {}
        for i in range(0, len(tokens), _CHUNK):
            chunk = tokens[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for row in self._read("select token, domain, kind, erased_at from erased "
                                  f"where token in ({marks})", chunk):
                out[row[0]] = Erasure(*row)
        return out

    def erasures(self, since: str | None = None) -> Iterator[Erasure]:
        last = ("", "")
        while True:
            rows = self._read(
                "select token, domain, kind, erased_at from erased where erased_at >= ? "
                "and (erased_at, token) > (?, ?) order by erased_at, token limit 5000",
                (since or "", *last))
            if not rows:
                return
            yield from (Erasure(*r) for r in rows)
            last = (rows[-1][3], rows[-1][0])

    def erasure_epoch(self) -> int:
        row = self._read("select value from meta where key = 'erasure_epoch'")
        return int(row[0][0]) if row else 0

    # -- policy -----------------------------------------------------------------------------

    def grant(self, principal: str, granted_by: str) -> bool:
        with self._tx() as db:
            cur = db.execute("insert or ignore into principals values (?, ?, ?)",
                             (principal, _now(), granted_by))
            return cur.rowcount == 1

    def revoke(self, principal: str) -> bool:
        with self._tx() as db:
            return db.execute("delete from principals where principal = ?",
                              (principal,)).rowcount == 1

    def principals(self) -> list[dict[str, str]]:
        return [{"principal": p, "granted_at": at, "granted_by": by} for p, at, by in
                self._read("select principal, granted_at, granted_by from principals "
                           "order by principal")]

    def is_allowed(self, principal: str) -> bool:
        return bool(self._read("select 1 from principals where principal = ?", (principal,)))

    def grant_tokenize(self, principal: str, domain: str, mode: str, granted_by: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "insert into tokenize_grants values (?, ?, ?, ?, ?) on conflict "
                "(principal, domain) do update set mode = excluded.mode, granted_at = "
                "excluded.granted_at, granted_by = excluded.granted_by "
                "where tokenize_grants.mode <> excluded.mode",
                (principal, domain, mode, _now(), granted_by))
            return cur.rowcount == 1

    def revoke_tokenize(self, principal: str, domain: str) -> bool:
        with self._tx() as db:
            return db.execute("delete from tokenize_grants where principal = ? and domain = ?",
                              (principal, domain)).rowcount == 1

    def tokenize_grants(self) -> list[dict[str, str]]:
        cols = ("principal", "domain", "mode", "granted_at", "granted_by")
        return [dict(zip(cols, row, strict=True)) for row in self._read(
            f"select {', '.join(cols)} from tokenize_grants order by principal, domain")]

    def tokenize_mode(self, principal: str, domain: str) -> str | None:
        return strongest([m for (m,) in self._read(
            "select mode from tokenize_grants where principal = ? and domain in (?, '*')",
            (principal, domain))])

    # -- audit ------------------------------------------------------------------------------

    @staticmethod
    def _put_state(db: sqlite3.Connection, seq: int, key: bytes) -> None:
        db.execute("insert or replace into meta values ('audit_state', ?)",
                   (_audit.encode({"key": key.hex(), "seq": seq}),))

    @staticmethod
    def _state(db: sqlite3.Connection) -> tuple[int, bytes] | None:
        row = db.execute("select value from meta where key = 'audit_state'").fetchone()
        if row is None:
            return None
        doc = _audit.decode(row[0], "the audit signing state")
        return int(doc["seq"]), bytes.fromhex(doc["key"])

    def append_audit(self, record: dict[str, Any], seal: Sealer) -> dict[str, Any]:
        """Append under the write lock. The first detokenize record of a query (by this
        thread) is synced before it returns; the query's later records (one per DuckDB
        vector) are written to the log without their own fsync, reaching the disk with the
        next synced commit: they survive a crash of the process, and the query's first record
        survives a power loss. An fsync per 2,048 values capped detokenize at ~450k values/s."""
        query = (record.get("action"), record.get("query_id"), record.get("principal"),
                 record.get("outcome"))
        relaxed = (self._synchronous == "full" and query[0] == "detokenize"
                   and query[1] is not None and query[3] == "allowed"
                   and getattr(self._local, "query", None) == query)
        db = self._db()
        if relaxed:
            db.execute("pragma main.synchronous=normal")
        try:
            with self._tx() as db:
                head = db.execute(
                    "select seq, hash from audit order by seq desc limit 1").fetchone()
                seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
                record = {**record, "seq": seq}
                state = self._state(db)
                if state is None:
                    digest = seal(prev, record)
                else:
                    if state[0] != seq:
                        raise AuditChainError(
                            f"deid audit: the vault's audit signing state is at record "
                            f"{state[0]} but the log's next record is {seq}: records were "
                            "removed or the state was replaced (run deid audit verify)")
                    digest = _audit.seal_with(state[1], prev, record)
                    self._put_state(db, seq + 1, _audit.evolve(state[1]))
                db.execute("insert into audit values (?, ?, ?, ?)",
                           (seq, _audit.encode(record), prev, digest))
        finally:
            if relaxed:
                db.execute(f"pragma main.synchronous={self._synchronous}")
        self._local.query = query
        return {**record, "prev": prev, "hash": digest}

    def audit_records(self) -> Iterator[dict[str, Any]]:
        last = 0
        while True:
            rows = self._read("select seq, record, prev, hash from audit where seq > ? "
                              "order by seq limit 5000", (last,))
            if not rows:
                return
            for seq, record, prev, digest in rows:
                yield {**_audit.decode(record, f"record {seq}"), "seq": seq, "prev": prev,
                       "hash": digest}
            last = rows[-1][0]

    def audit_verifier(self, seal: Sealer, audit_key: Path | None = None
                       ) -> tuple[Sealer, Callable[[int, str], None] | None]:
        with self._tx(write=False) as db:
            state = self._state(db)
        if state is None:
            return seal, None
        first = _audit.read_audit_key_file(audit_key or audit_key_file_for(self.path))

        def finish(n: int, _head: str) -> None:
            # The state moved one step per record: a log cut after record n leaves it ahead.
            if state != (n + 1, _audit.key_at(first, n + 1)):
                raise AuditChainError(
                    f"deid audit: the log ends at record {n} but the vault's signing state is "
                    f"at record {state[0]}: the newest records were removed (or the state "
                    "was replaced)")

        return _audit.ForwardChain(first), finish

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "vault": self.url,
            "tokens": {f"{d} ({k})": n for d, k, n in self._read(
                f"select domain, kind, count(*) from {_ALL_TOKENS} group by 1, 2 "
                "order by 1, 2")},
            "key_versions": {str(v): n for v, n in self._read(
                f"select key_version, count(*) from {_ALL_TOKENS} group by 1 order by 1")},
            "journal": self._read("select count(*) from j.journal where seq > "
                                  f"{_MERGED_THROUGH}")[0][0],
            "erased": self._read("select count(*) from erased")[0][0],
            "principals": len(self.principals()),
            "tokenize_grants": len(self.tokenize_grants()),
            "audit_records": self._read("select count(*) from audit")[0][0],
        }


# Stores whose merge thread has run: at exit, each lets its merge under way finish.
_merging: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


@atexit.register
def _finish_merges() -> None:
    for store in list(_merging):
        store.finish_merging()


def _create_directory(path: Path) -> None:
    """Make the vault's directory (0700) and keep the vault and its keys out of git.

    A directory made here holds only the vault, so its .gitignore ignores everything (as a
    virtualenv's does); in a directory that already existed only the vault's own files are
    added, so a project's other files stay tracked.
    """
    parent = path.parent
    try:
        made = not parent.exists()
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        ignore = parent / ".gitignore"
        if made:
            ignore.write_text("# created by deid init: the vault and its keys never go into "
                              "git\n*\n")
            return
        names = [f"/{name}{suffix}" for name in (path.name, journal_file_for(path).name)
                 for suffix in ("", "-wal", "-shm", "-journal")]
        names += [f"/{_keys.key_file_for(path).name}", f"/{audit_key_file_for(path).name}"]
        present = ignore.read_text().splitlines() if ignore.exists() else []
        missing = [n for n in names if n not in present]
        if missing:
            with ignore.open("a") as fh:
                if present and present[-1].strip():
                    fh.write("\n")
                fh.write("# the deid vault and its keys never go into git\n")
                fh.write("".join(f"{n}\n" for n in missing))
    except OSError as exc:
        raise VaultUnavailableError(
            f"deid vault: cannot prepare the directory of {path} ({exc.strerror})") from None


def open_store(url: str, *, keys: str | None = None, create: bool = False) -> SQLiteStore:
    """``sqlite:///path[?synchronous=full|normal&cache_mib=64&mmap_mib=1024&journal_rows=N]``;
    `keys` is
    ``DEID_KEYS`` when the host has it (else the key file beside the vault)."""
    parsed = parse_vault_url(url, "SQLite", known=("synchronous", "cache_mib", "mmap_mib",
                                                   "journal_rows"))
    return SQLiteStore(sqlite_path(url), create=create,
                       journal_rows=parsed.integer("journal_rows", DEFAULT_JOURNAL_ROWS, lo=1,
                                                   hi=1 << 24),
                       synchronous=(parsed.text("synchronous") or "full").lower(),
                       cache_mib=parsed.integer("cache_mib", 64, lo=0, hi=1 << 20),
                       mmap_mib=parsed.integer("mmap_mib", 1024, lo=0, hi=1 << 20),
                       keys=keys)
