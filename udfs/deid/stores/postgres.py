"""deid's vault in a PostgreSQL schema, reached two ways with the same SQL.

- `SpiStore`: inside the database, from the plpython3u UDFs (SPI through ``plpy``). Every
  statement runs in the caller's transaction, so a failed query (and the dbt model that ran
  it) rolls its vault writes back with it: no token is ever left in the vault without the
  row that carried it, and none reaches a mart without its vault record.
- `Psycopg2Store`: outside the database (the ``deid`` CLI, tests), one psycopg2 connection
  per thread, one transaction per method. ``DEID_VAULT=postgresql://…`` selects it.

Convergence under concurrency: new tokens go in with ``INSERT … ON CONFLICT DO NOTHING``
(unique on the token and on (domain, fingerprint)) and the winners are read back, so two
sessions that meet one new value return one token. A session whose insert meets another
session's uncommitted row waits for that transaction to end, then reads the winner (or
inserts its own if the other rolled back). Rows are inserted in fingerprint order, which keeps
multi-row inserts from deadlocking each other.

Keys: ``DEID_KEYS`` in the server's (or CLI's) environment when set (read by the host: the
plpython3u host or `deid.vault.VaultConfig`); otherwise the single
row of ``<schema>.keyring``, created on first use while the vault holds no record and readable
only by the vault role (see docs/postgres.md for why). The vault stores the check value of the
fingerprint key and refuses any other key set.

URL: ``postgresql://[user[:password]@][host][:port][/dbname][?schema=deid_vault&role=r]``;
libpq's PG* variables fill in what the URL leaves out. ``schema`` names the vault schema,
``role`` is SET after connecting (a login that is a member of the vault role).
"""

from __future__ import annotations

import datetime as _dt
import re
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from .. import _audit
from .. import keys as _keys
from .._policy import strongest
from .._url import parse_vault_url
from ..errors import ConfigError, VaultKeyError, VaultUnavailableError
from .base import (
    GENESIS,
    Erasure,
    NewRecord,
    Sealer,
    StoredValue,
    VaultStore,
    check_key_versions,
)

DEFAULT_SCHEMA = "deid_vault"
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_AUDIT_PAGE = 5000

# One statement per operation: (SQL with $n placeholders and {s} for the schema, $n types).
# The types are what plpy.prepare needs; psycopg2 gets the same SQL with %(pn)s placeholders.
_SQL: dict[str, tuple[str, tuple[str, ...]]] = {
    "keyring_get": ("select keys from {s}.keyring where id = 1", ()),
    "keyring_put": ("insert into {s}.keyring (id, keys) values (1, $1) on conflict do nothing",
                    ("text",)),
    "keyring_replace": ("update {s}.keyring set keys = $1 where id = 1", ("text",)),
    # Rotation and retirement hold the keyring row exclusively; every minting transaction
    # holds it shared until it ends, so a rotation waits for minting transactions that began
    # under the old version and every later one sees the new version (check_key_versions).
    "keyring_lock": ("select keys from {s}.keyring where id = 1 for update", ()),
    "key_current": ("select (keys::jsonb ->> 'current')::int from {s}.keyring where id = 1 "
                    "for share", ()),
    "version_count": ("select count(*) from {s}.tokens where key_version = $1", ("int",)),
    "has_records": ("select exists (select 1 from {s}.tokens) or exists (select 1 from "
                    "{s}.meta where key = 'key_check')", ()),
    "check_put": ("insert into {s}.meta (key, value) values ('key_check', $1) "
                  "on conflict do nothing", ("text",)),
    "check_get": ("select value from {s}.meta where key = 'key_check'", ()),
    "find": ("select fingerprint, token from {s}.tokens where domain = $1 "
             "and fingerprint = any($2)", ("text", "bytea[]")),
    "insert": ("insert into {s}.tokens (token, domain, fingerprint, kind, key_version, "
               "ciphertext) select * from unnest($1::text[], $2::text[], $3::bytea[], "
               "$4::text[], $5::int[], $6::bytea[]) on conflict do nothing",
               ("text[]", "text[]", "bytea[]", "text[]", "int[]", "bytea[]")),
    "fetch": ("select token, key_version, ciphertext from {s}.tokens where token = any($1)",
              ("text[]",)),
    "page": ("select token, key_version, ciphertext from {s}.tokens where token > $1 "
             "order by token limit $2", ("text", "int")),
    "rewrap": ("update {s}.tokens t set key_version = u.v, ciphertext = u.c from "
               "unnest($1::text[], $2::int[], $3::bytea[], $4::int[], $5::bytea[]) "
               "as u (tk, v, c, ov, oc) where t.token = u.tk and t.key_version = u.ov "
               "and t.ciphertext = u.oc",
               ("text[]", "int[]", "bytea[]", "int[]", "bytea[]")),
    "grant": ("insert into {s}.principals (principal, granted_at, granted_by) "
              "values ($1, $2, $3) on conflict do nothing", ("text", "text", "text")),
    "revoke": ("delete from {s}.principals where principal = $1", ("text",)),
    "principals": ("select principal, granted_at, granted_by from {s}.principals "
                   "order by principal", ()),
    "is_allowed": ("select exists (select 1 from {s}.principals where principal = $1)",
                   ("text",)),
    "tgrant": ("insert into {s}.tokenize_grants (principal, domain, mode, granted_at, "
               "granted_by) values ($1, $2, $3, $4, $5) on conflict (principal, domain) do "
               "update set mode = excluded.mode, granted_at = excluded.granted_at, "
               "granted_by = excluded.granted_by where tokenize_grants.mode <> excluded.mode",
               ("text", "text", "text", "text", "text")),
    "trevoke": ("delete from {s}.tokenize_grants where principal = $1 and domain = $2",
                ("text", "text")),
    "tgrants": ("select principal, domain, mode, granted_at, granted_by from "
                "{s}.tokenize_grants order by principal, domain", ()),
    "tmode": ("select mode from {s}.tokenize_grants where principal = $1 "
              "and domain in ($2, '*')", ("text", "text")),
    # Row locks in the vault schema, held until the transaction ends. Only the vault role can
    # reach them: an advisory lock on a well-known key could be held by any login and stall
    # the vault. audit serializes appends to the hash chain; mint, sessions that mint tokens
    # (see SpiStore).
    "audit_lock": ("select 1 from {s}.locks where name = 'audit' for update", ()),
    "mint_lock": ("select 1 from {s}.locks where name = 'mint' for update", ()),
    "audit_head": ("select seq, hash from {s}.audit order by seq desc limit 1", ()),
    "audit_put": ("insert into {s}.audit (seq, record, prev, hash) values ($1, $2, $3, $4)",
                  ("bigint", "text", "text", "text")),
    # Re-seals the statement's own record, still the uncommitted head of the chain.
    "audit_merge": ("update {s}.audit set record = $1, hash = $2 where seq = $3 and hash = $4",
                    ("text", "text", "bigint", "text")),
    "audit_page": ("select seq, record, prev, hash from {s}.audit where seq > $1 "
                   "order by seq limit $2", ("bigint", "int")),
    "audit_count": ("select count(*) from {s}.audit", ()),
    # erase: held exclusively by an erasure against the share every insert into tokens takes
    # (the erase_guard trigger), so no insert passes the reissue check mid-erasure.
    "erase_lock": ("select 1 from {s}.locks where name = 'erase' for update", ()),
    "erase_find_fp": ("select token, kind from {s}.tokens where domain = $1 "
                      "and fingerprint = any($2) for update", ("text", "bytea[]")),
    "erase_find_tok": ("select token, kind from {s}.tokens where domain = $1 "
                       "and token = any($2) for update", ("text", "text[]")),
    "erase_put": ("insert into {s}.erased (token, domain, kind, erased_at) select * from "
                  "unnest($1::text[], $2::text[], $3::text[], $4::text[])",
                  ("text[]", "text[]", "text[]", "text[]")),
    "erase_record": ("insert into {s}.erased (token, domain, kind, erased_at) select * from "
                     "unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
                     "on conflict do nothing", ("text[]", "text[]", "text[]", "text[]")),
    "erase_delete": ("delete from {s}.tokens where token = any($1)", ("text[]",)),
    "epoch_bump": ("insert into {s}.meta (key, value) values ('erasure_epoch', '1') "
                   "on conflict (key) do update set value = ({s}.meta.value::bigint + 1)::text",
                   ()),
    "epoch_get": ("select value from {s}.meta where key = 'erasure_epoch'", ()),
    "erased_get": ("select token, domain, kind, erased_at from {s}.erased "
                   "where token = any($1)", ("text[]",)),
    "erasures_page": ("select token, domain, kind, erased_at from {s}.erased "
                      "where erased_at >= $1 and (erased_at, token) > ($2, $3) "
                      "order by erased_at, token limit $4", ("text", "text", "text", "int")),
    "erased_count": ("select count(*) from {s}.erased", ()),
    "stats_tokens": ("select domain, kind, count(*) from {s}.tokens group by 1, 2 "
                     "order by 1, 2", ()),
    "stats_versions": ("select key_version, count(*) from {s}.tokens group by 1 order by 1",
                       ()),
}


def vault_ddl(schema: str = DEFAULT_SCHEMA) -> str:
    """The vault's tables. macros/postgres/postgres_create_vault.sql holds the same DDL
    (dbt cannot import Python); the end-to-end test checks that the two agree."""
    s = check_schema(schema)
    return f"""
create schema if not exists {s};
create table if not exists {s}.meta (key text primary key, value text not null);
create table if not exists {s}.keyring (
    id integer primary key check (id = 1),
    keys text not null
);
create table if not exists {s}.tokens (
    token text primary key,
    domain text not null,
    fingerprint bytea not null,
    kind text not null,
    key_version integer not null,
    ciphertext bytea not null,
    unique (domain, fingerprint)
);
create table if not exists {s}.principals (
    principal text primary key,
    granted_at text not null,
    granted_by text not null
);
create table if not exists {s}.tokenize_grants (
    principal text not null,
    domain text not null,
    mode text not null check (mode in ('tokenize', 'lookup')),
    granted_at text not null,
    granted_by text not null,
    primary key (principal, domain)
);
create table if not exists {s}.audit (
    seq bigint primary key,
    record text not null,
    prev text not null,
    hash text not null
);
create table if not exists {s}.locks (name text primary key);
insert into {s}.locks (name) values ('audit'), ('mint'), ('erase') on conflict do nothing;
{erasure_ddl(s)}"""


def erasure_ddl(s: str) -> str:
    """Tombstones of erased tokens, and the triggers that keep an erased token from being
    issued again (also in macros/postgres/postgres__create_vault.sql). Every insert into
    tokens shares the ``erase`` lock row that an erasure holds exclusively: no insert can pass
    the reissue check between an erasure's delete and its commit. A row of the vault's own
    ``locks`` table, not an advisory lock any login could take and hold."""
    return f"""create table if not exists {s}.erased (
    token text primary key,
    domain text not null,
    kind text not null,
    erased_at text not null
);
create index if not exists erased_by_time on {s}.erased (erased_at);
create or replace function {s}.erase_guard() returns trigger language plpgsql as $g$
begin
    perform 1 from {s}.locks where name = 'erase' for share;
    return null;
end $g$;
create or replace trigger erase_guard before insert on {s}.tokens
    for each statement execute function {s}.erase_guard();
create or replace function {s}.never_reissue_erased() returns trigger language plpgsql as $r$
begin
    if exists (select 1 from {s}.erased where token = new.token) then
        return null;
    end if;
    return new;
end $r$;
create or replace trigger never_reissue_erased before insert on {s}.tokens
    for each row execute function {s}.never_reissue_erased();
"""


def check_schema(schema: str) -> str:
    if not _IDENT.fullmatch(schema):
        raise ConfigError("deid vault: the PostgreSQL vault schema must be a lowercase SQL "
                          "identifier (letters, digits, underscore)")
    return schema


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


class _PgStore(VaultStore):
    """The vault logic, written once over `_run` (one statement) and `_atomic` (a block)."""

    # Whether sessions minting tokens take one transaction-long lock first (see SpiStore).
    _serialize_minting = False

    def __init__(self, schema: str, keys: str | None = None) -> None:
        self.schema = check_schema(schema)
        self._keys_json = keys  # DEID_KEYS, as the host read it; None: the keyring table

    def _sql(self, name: str) -> str:
        return _SQL[name][0].format(s=self.schema)

    @abstractmethod
    def _atomic(self) -> Any:
        """Context manager yielding a `Run`; its statements commit or roll back together."""

    @abstractmethod
    def _count(self, run: Run, name: str, args: Sequence[Any]) -> int:
        """Run a write statement, return the number of rows it changed."""

    def _rows(self, name: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._atomic() as run:
            return run(name, args)

    # -- keys -----------------------------------------------------------------------------

    def _load_keyring(self) -> _keys.FileKeyring:
        source = f"the {self.schema}.keyring table"
        with self._atomic() as run:
            if self._keys_json:
                ring = _keys.FileKeyring.from_json(self._keys_json, "DEID_KEYS")
            else:
                row = run("keyring_get", ())
                if not row:
                    if run("has_records", ())[0][0]:
                        raise VaultKeyError(
                            f"deid keys: {source} is empty but the vault already holds "
                            "records; restore the keyring row or set DEID_KEYS (refusing to "
                            "create new keys, which would mint different tokens)")
                    # Two first sessions converge: one row wins, both read it back.
                    run("keyring_put", (_keys.FileKeyring.generate(source).to_json(),))
                    row = run("keyring_get", ())
                ring = _keys.FileKeyring.from_json(row[0][0], source)
            check = ring.check_value()
            # Written once; read-only afterwards, so lookups work in read-only transactions.
            stored_rows = run("check_get", ())
            if not stored_rows:
                run("check_put", (check,))
                stored_rows = run("check_get", ())
            stored = stored_rows[0][0]
        if stored != check:
            raise VaultKeyError(
                f"deid keys: {ring.source} does not belong to the vault in schema "
                f"{self.schema} (its fingerprint key differs); use the vault's own keys")
        return ring

    def rotate_keyring(self, seen_current: int) -> tuple[_keys.FileKeyring, bool]:
        with self._atomic() as run:
            ring = self._locked_keyring(run)
            made = ring.current == seen_current
            if made:
                ring = ring.rotated()
                self._count(run, "keyring_replace", (ring.to_json(),))
        self.reload_keyring()
        return ring, made

    def retire_key_version(self, version: int) -> _keys.FileKeyring:
        with self._atomic() as run:
            ring = self._locked_keyring(run).without(version)
            left = run("version_count", (version,))[0][0]
            if left:
                raise VaultKeyError(f"deid keys: {left} records are still encrypted under key "
                                    f"version {version}; run deid keys rewrap first")
            self._count(run, "keyring_replace", (ring.to_json(),))
        self.reload_keyring()
        return ring

    def _locked_keyring(self, run: Run) -> _keys.FileKeyring:
        row = run("keyring_lock", ())
        if not row:
            raise VaultKeyError(f"deid keys: the vault in schema {self.schema} keeps its keys "
                                "in DEID_KEYS, not in its keyring table; rotate them there")
        ring = _keys.FileKeyring.from_json(row[0][0], f"the {self.schema}.keyring table")
        if ring.check_value() != self.keyring().check_value():
            raise VaultKeyError("deid keys: the keyring table holds a different fingerprint "
                                "key than this vault's (every token would change)")
        return ring

    # -- tokens ---------------------------------------------------------------------------

    def find_tokens(self, domain: str, fingerprints: Sequence[bytes]) -> dict[bytes, str]:
        if not fingerprints:
            return {}
        return {bytes(fp): tok for fp, tok in self._rows("find", (domain, list(fingerprints)))}

    def insert_tokens(self, records: Sequence[NewRecord], *,
                      random_tokens: bool = False) -> dict[bytes, str]:
        if not records:
            return {}
        ordered = sorted(records, key=lambda r: r.fingerprint)
        domain = ordered[0].domain
        args = ([r.token for r in ordered], [r.domain for r in ordered],
                [r.fingerprint for r in ordered], [r.kind for r in ordered],
                [r.key_version for r in ordered], [r.ciphertext for r in ordered])
        with self._atomic() as run:
            current = run("key_current", ())
            # No keyring row: keys come from DEID_KEYS and are rotated where that secret lives.
            check_key_versions(current[0][0] if current else None, ordered)
            if self._serialize_minting:
                self._lock_row(run, "mint_lock")
            inserted = self._count(run, "insert", args)
            if inserted == len(ordered):
                return {r.fingerprint: r.token for r in ordered}
            # Another session minted some of these (or a token collided): read the winners.
            return {bytes(fp): tok for fp, tok in
                    run("find", (domain, [r.fingerprint for r in ordered]))}

    def fetch_values(self, tokens: Sequence[str]) -> dict[str, StoredValue]:
        if not tokens:
            return {}
        return {t: StoredValue(v, bytes(b)) for t, v, b in self._rows("fetch", (list(tokens),))}

    def iter_values(self, batch_size: int = 10_000) -> Iterator[list[tuple[str, StoredValue]]]:
        last = ""
        while True:
            rows = self._rows("page", (last, batch_size))
            if not rows:
                return
            yield [(t, StoredValue(v, bytes(b))) for t, v, b in rows]
            last = rows[-1][0]

    def update_values(self, rows: Sequence[tuple[str, StoredValue, StoredValue]]) -> int:
        if not rows:
            return 0
        with self._atomic() as run:
            return self._count(run, "rewrap", (
                [t for t, _, _ in rows], [n.key_version for _, _, n in rows],
                [n.ciphertext for _, _, n in rows], [o.key_version for _, o, _ in rows],
                [o.ciphertext for _, o, _ in rows]))

    # -- erasure --------------------------------------------------------------------------

    def _erase(self, domain: str, finder: str, keys: list[Any]) -> list[Erasure]:
        if not keys:
            return []
        at = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        with self._atomic() as run:
            self._lock_row(run, "erase_lock")
            found = [Erasure(t, domain, k, at) for t, k in run(finder, (domain, keys))]
            if found:
                tokens = [e.token for e in found]
                run("erase_put", (tokens, [domain] * len(found), [e.kind for e in found],
                                  [at] * len(found)))
                run("erase_delete", (tokens,))
                run("epoch_bump", ())
        return found

    def record_erasures(self, erasures: Sequence[Erasure]) -> None:
        if not erasures:
            return
        with self._atomic() as run:
            run("erase_record", ([e.token for e in erasures], [e.domain for e in erasures],
                                 [e.kind for e in erasures], [e.erased_at for e in erasures]))
            run("epoch_bump", ())

    def erase(self, domain: str, fingerprints: Sequence[bytes]) -> list[Erasure]:
        return self._erase(domain, "erase_find_fp", list(fingerprints))

    def erase_tokens(self, domain: str, tokens: Sequence[str]) -> list[Erasure]:
        return self._erase(domain, "erase_find_tok", list(tokens))

    def erased(self, tokens: Sequence[str]) -> dict[str, Erasure]:
        if not tokens:
            return {}
        return {r[0]: Erasure(*r) for r in self._rows("erased_get", (list(tokens),))}

    def erasures(self, since: str | None = None) -> Iterator[Erasure]:
        last = ("", "")
        while True:
            rows = self._rows("erasures_page", (since or "", *last, _AUDIT_PAGE))
            if not rows:
                return
            yield from (Erasure(*r) for r in rows)
            last = (rows[-1][3], rows[-1][0])

    def erasure_epoch(self) -> int:
        rows = self._rows("epoch_get")
        return int(rows[0][0]) if rows else 0

    # -- policy ---------------------------------------------------------------------------

    def grant(self, principal: str, granted_by: str) -> bool:
        with self._atomic() as run:
            return self._count(run, "grant", (principal, _now(), granted_by)) == 1

    def revoke(self, principal: str) -> bool:
        with self._atomic() as run:
            return self._count(run, "revoke", (principal,)) == 1

    def principals(self) -> list[dict[str, str]]:
        return [{"principal": p, "granted_at": at, "granted_by": by}
                for p, at, by in self._rows("principals")]

    def is_allowed(self, principal: str) -> bool:
        return bool(self._rows("is_allowed", (principal,))[0][0])

    def grant_tokenize(self, principal: str, domain: str, mode: str, granted_by: str) -> bool:
        with self._atomic() as run:
            return self._count(run, "tgrant", (principal, domain, mode, _now(),
                                               granted_by)) == 1

    def revoke_tokenize(self, principal: str, domain: str) -> bool:
        with self._atomic() as run:
            return self._count(run, "trevoke", (principal, domain)) == 1

    def tokenize_grants(self) -> list[dict[str, str]]:
        cols = ("principal", "domain", "mode", "granted_at", "granted_by")
        return [dict(zip(cols, row, strict=True)) for row in self._rows("tgrants")]

    def tokenize_mode(self, principal: str, domain: str) -> str | None:
        return strongest([m for (m,) in self._rows("tmode", (principal, domain))])

    def _lock_row(self, run: Run, name: str) -> None:
        if not run(name, ()):
            raise VaultUnavailableError(
                f"deid vault: the lock rows of schema {self.schema} are missing; re-run "
                "`dbt run-operation postgres_install_udfs` (or deid init) to add them")

    # -- audit ----------------------------------------------------------------------------

    def append_audit(self, record: dict[str, Any], seal: Sealer) -> dict[str, Any]:
        with self._atomic() as run:
            self._lock_row(run, "audit_lock")
            head = run("audit_head", ())
            seq, prev = (int(head[0][0]) + 1, head[0][1]) if head else (1, GENESIS)
            record = {**record, "seq": seq}
            digest = seal(prev, record)
            run("audit_put", (seq, _audit.encode(record), prev, digest))
        return {**record, "prev": prev, "hash": digest}

    def audit_records(self) -> Iterator[dict[str, Any]]:
        last = 0
        while True:
            rows = self._rows("audit_page", (last, _AUDIT_PAGE))
            if not rows:
                return
            for seq, record, prev, digest in rows:
                yield {**_audit.decode(record, f"record {seq}"), "seq": int(seq), "prev": prev,
                       "hash": digest}
            last = int(rows[-1][0])

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "vault": self.url,
            "tokens": {f"{d} ({k})": int(n) for d, k, n in self._rows("stats_tokens")},
            "key_versions": {str(v): int(n) for v, n in self._rows("stats_versions")},
            "erased": int(self._rows("erased_count")[0][0]),
            "principals": len(self.principals()),
            "tokenize_grants": len(self.tokenize_grants()),
            "audit_records": int(self._rows("audit_count")[0][0]),
        }


# ---------------------------------------------------------------------------------------
# inside the database: SPI through plpy


class SpiStore(_PgStore):
    """The vault as seen from a plpython3u function (runs as the function's owner).

    ``_atomic`` is a subtransaction: a block's statements go or stay together, and all of
    them belong to the caller's transaction. A SPI error keeps its SQLSTATE (so a deadlock
    or a lock timeout is reported as one) but not its detail, which may quote key values.

    Minting is serialized: a new token's row stays uncommitted until the caller's statement
    (a whole dbt model) commits, and another session that meets that row waits for it. Two
    models minting overlapping values in different orders would wait on each other and one
    would die of a deadlock. So the first mint of a transaction locks one row of the vault's
    ``locks`` table until its end: sessions that mint run one after another, never in a
    cycle; sessions whose values are all in the vault already take no lock and run in
    parallel.
    """

    _serialize_minting = True
    # Record fields that must match for a detokenize call to join the scope's open record.
    _MERGE_KEY = ("action", "principal", "outcome", "query_id", "host")

    def __init__(self, plpy: Any, schema: str = DEFAULT_SCHEMA, *,
                 keys: str | None = None) -> None:
        super().__init__(schema, keys)
        self.url = f"postgresql (in-database, schema {self.schema})"
        self._plpy = plpy
        self._plans: dict[str, Any] = {}
        self._open_audit: dict[str, Any] | None = None
        self._allowed: dict[str, bool] = {}

    def start_scope(self) -> None:
        """A new (transaction, statement, subtransaction) scope: forget what the last one
        cached (keys, the policy answers, the open audit record), since it may have rolled
        back or changed since."""
        self.forget_keyring()
        self._open_audit = None
        self._allowed = {}

    def is_allowed(self, principal: str) -> bool:
        # Once per scope: plpython3u calls detokenize once per row, and a statement's rows
        # are one request, as a GRANT is checked once per statement.
        allowed = self._allowed.get(principal)
        if allowed is None:
            allowed = self._allowed[principal] = super().is_allowed(principal)
        return allowed

    def append_audit(self, record: dict[str, Any], seal: Sealer) -> dict[str, Any]:
        """One record per statement, not per row: a call whose record matches the scope's open
        one adds its count and kinds to it and re-seals it.

        That record is the head of the chain and nobody can append after it: the audit lock
        row taken by the first append is held until the transaction ends, and every append
        of this session passes here (any other record closes the open one). Before commit
        the record is invisible to others, so the chain anyone can read is never rewritten.
        """
        head = self._open_audit
        if head is not None and all(head[k] == record.get(k) for k in self._MERGE_KEY):
            kinds = dict(head["kinds"])
            for k, n in (record.get("kinds") or {}).items():
                kinds[k] = kinds.get(k, 0) + n
            merged = {k: v for k, v in head.items() if k not in ("prev", "hash")}
            merged.update(count=head["count"] + record["count"], kinds=dict(sorted(kinds.items())))
            digest = seal(head["prev"], merged)
            with self._atomic() as run:
                changed = self._count(run, "audit_merge", (
                    _audit.encode(merged), digest, merged["seq"], head["hash"]))
            if changed == 1:
                self._open_audit = {**merged, "prev": head["prev"], "hash": digest}
                return self._open_audit
        stored = super().append_audit(record, seal)
        self._open_audit = stored if record.get("action") == "detokenize" else None
        return stored

    def _rows(self, name: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        # One statement is atomic by itself: no subtransaction (they cost more than the read).
        return self._run(name, args)

    def forget_keyring(self) -> None:
        """Drop the cached keys; the next use reads them again (in the current transaction)."""
        with self._keyring_lock:
            self._keyring = None

    def _plan(self, name: str) -> Any:
        plan = self._plans.get(name)
        if plan is None:
            sql, types = _SQL[name]
            n = 0
            # Placeholders are numbered in order of first use; plpy wants one type per number.
            for m in re.finditer(r"\$(\d+)", sql):
                n = max(n, int(m.group(1)))
            plan = self._plpy.prepare(sql.format(s=self.schema), list(types[:n]))
            self._plans[name] = plan
        return plan

    def _execute(self, name: str, args: Sequence[Any]) -> Any:
        try:
            return self._plpy.execute(self._plan(name), list(args))
        except self._plpy.SPIError as exc:
            sqlstate = getattr(exc, "sqlstate", None)
            err = VaultUnavailableError(
                f"deid vault: statement {name!r} on schema {self.schema} failed: "
                f"{_primary(exc)} (SQLSTATE {sqlstate or 'unknown'}){_fix(sqlstate)}")
            err.sqlstate = sqlstate
            raise err from None

    def _run(self, name: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        result = self._execute(name, args)
        if not _returns_rows(name):
            return []
        cols = result.colnames()
        return [tuple(row[c] for c in cols) for row in result]

    def _count(self, run: Run, name: str, args: Sequence[Any]) -> int:
        return int(self._execute(name, args).nrows())

    @contextmanager
    def _atomic(self) -> Iterator[Run]:
        with self._plpy.subtransaction():
            yield self._run


# SQLSTATE (or its class, the first two characters) → what to do.
_FIXES = {
    "25006": "the transaction is read-only (a standby, or SET TRANSACTION READ ONLY): looking "
             "up existing tokens works there, but new tokens and detokenize (which writes its "
             "audit record) need the primary in a read-write transaction",
    "42501": "the role lacks a privilege on the vault schema: connect as the vault role or a "
             "member of it (role= in the URL), see docs/postgres.md",
    "42P01": "the vault's tables are missing: create them with `dbt run-operation "
             "postgres_install_udfs` (or `deid init`)",
    "3F000": "the vault schema is missing: create it with `dbt run-operation "
             "postgres_install_udfs` (or `deid init`)",
    "57014": "the statement was cancelled (statement_timeout or a cancel request); retry, or "
             "raise statement_timeout for this role",
    "55P03": "a vault lock was not granted within lock_timeout; retry",
    "40P01": "a deadlock with another session; retry the statement",
    "40001": "a serialization failure with another session; retry the statement",
    "53": "the server is out of a resource (disk, memory, connections); free it and retry",
    "08": "the connection to the server failed; check PGHOST/PGPORT and the server",
    "28": "the server refused the login; check the user and password (PGUSER, PGPASSWORD, "
          "~/.pgpass)",
}


def _fix(sqlstate: str | None) -> str:
    if not sqlstate:
        return ""
    fix = _FIXES.get(sqlstate) or _FIXES.get(sqlstate[:2])
    return f"; {fix}" if fix else ""


def _returns_rows(name: str) -> bool:
    return _SQL[name][0].lstrip().startswith("select")


def _primary(exc: BaseException) -> str:
    """The primary message of a PostgreSQL error: no DETAIL, which may quote key values."""
    text = str(exc.args[0]) if exc.args else exc.__class__.__name__
    return text.splitlines()[0][:200]


# ---------------------------------------------------------------------------------------
# outside the database: psycopg2


_OUR_PARAMS = ("schema", "role")


def _to_pyformat(sql: str) -> str:
    return re.sub(r"\$(\d+)", r"%(p\1)s", sql)


class Psycopg2Store(_PgStore):
    """The vault over psycopg2: one connection per thread, one transaction per method."""

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, role: str | None = None,
                 url: str | None = None, keys: str | None = None) -> None:
        super().__init__(schema, keys)
        try:
            import psycopg2  # noqa: F401 - fail early with an actionable message
        except ImportError:
            raise ConfigError("deid vault: postgresql:// needs psycopg2; install deid with "
                              "the postgres extra") from None
        self._dsn = dsn
        self._role = check_schema(role) if role else None
        self.url = url or _redact(dsn)
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()

    def _conn(self) -> Any:
        import psycopg2

        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = psycopg2.connect(self._dsn, application_name="deid vault")
                if self._role:
                    with conn.cursor() as cur:
                        cur.execute(f'set role "{self._role}"')
                    conn.commit()
            except psycopg2.Error as exc:
                raise VaultUnavailableError(
                    f"deid vault: cannot connect to {self.url}: {_primary(exc)}"
                    f"{_fix(exc.pgcode or '08')}") from None
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _atomic(self) -> Iterator[Run]:
        import psycopg2

        conn = self._conn()
        cur = conn.cursor()

        def run(name: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
            cur.execute(_to_pyformat(self._sql(name)),
                        {f"p{i}": a for i, a in enumerate(args, start=1)})
            self._local.rowcount = cur.rowcount
            return cur.fetchall() if cur.description is not None else []

        try:
            try:
                yield run
            except psycopg2.Error as exc:
                raise VaultUnavailableError(
                    f"deid vault: {self.url}, schema {self.schema}: {_primary(exc)} "
                    f"(SQLSTATE {exc.pgcode or 'unknown'}){_fix(exc.pgcode)}") from None
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except psycopg2.Error:
                conn.close()
            raise
        finally:
            cur.close()

    def _count(self, run: Run, name: str, args: Sequence[Any]) -> int:
        run(name, args)
        return int(self._local.rowcount)

    def create_schema(self) -> None:
        """Create the vault's tables (idempotent). dbt's create_udfs does the same."""
        import psycopg2

        conn = self._conn()
        try:
            with conn.cursor() as cur:
                cur.execute(vault_ddl(self.schema))
            conn.commit()
        except psycopg2.Error as exc:
            conn.rollback()
            raise VaultUnavailableError(
                f"deid vault: creating schema {self.schema} on {self.url} failed: "
                f"{_primary(exc)} (SQLSTATE {exc.pgcode or 'unknown'}){_fix(exc.pgcode)}"
            ) from None

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                if not conn.closed:
                    conn.close()
            self._all.clear()
        self._local = threading.local()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def open_store(url: str, *, keys: str | None = None) -> Psycopg2Store:
    """``postgresql://…?schema=deid_vault&role=deid_vault`` → a psycopg2-backed store. Other
    parameters go to libpq (connect_timeout, sslmode, …), under the same rule: once each."""
    parsed = parse_vault_url(url, "PostgreSQL", known=None)
    rest = [(k, v) for k, v in parsed.params.items() if k not in _OUR_PARAMS]
    dsn = urlunsplit(parsed.parts._replace(scheme="postgresql", query=urlencode(rest)))
    return Psycopg2Store(dsn, schema=parsed.text("schema") or DEFAULT_SCHEMA,
                         role=parsed.text("role"), url=_redact(url), keys=keys)
