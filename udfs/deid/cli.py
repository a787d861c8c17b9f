"""``deid``: administer a deid vault (keys, tokenize and detokenize policies, audit log,
erasure, stats).

The vault is ``--vault`` or ``DEID_VAULT``, else the one the dbt project's profile gives the
deid plugin, else ``sqlite:///.deid/vault.db``; a relative SQLite path is relative to the dbt
project directory, as it is for dbt. Only ``deid init`` creates a vault: every other command
refuses a missing one. Nothing here prints a value, a token or key material.
"""

from __future__ import annotations

import csv
import datetime as _dt
import getpass
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from . import _audit, artifact_scan
from ._policy import ALL_DOMAINS
from .dbt_profile import find_project_dir, profile_vault
from .errors import ConfigError, DeidError
from .ingest import FILE_FORMATS
from .ingest import columns as _columns
from .service import Eraser, VaultTokenService
from .stores import Erasure, StoredValue
from .vault import DEFAULT_VAULT, VaultConfig, anchored, open_service, open_store

_vault_option = click.option(
    "--vault", envvar="DEID_VAULT", default=None, show_envvar=True,
    help="Vault URL (default: the vault the dbt project's profile gives the deid plugin, "
         "else sqlite:///.deid/vault.db in the dbt project).")


def vault_url(vault: str | None) -> str:
    """The vault this command works on (see the module docstring for the order)."""
    opts = click.get_current_context().find_root().params
    project = find_project_dir(opts.get("project_dir"))
    url = vault or (project and profile_vault(project, profiles_dir=opts.get("profiles_dir"),
                                              target=opts.get("target"))) or DEFAULT_VAULT
    return anchored(url, project)


def _service(vault: str | None, *, create: bool = False) -> VaultTokenService:
    config = VaultConfig.from_env({"vault": vault_url(vault)})
    return VaultTokenService(open_store(config.url, keys=config.keys, create=create),
                             cache_size=0,
                             detokenize_cache_size=0)


def _admin() -> str:
    return getpass.getuser()


@click.group()
@click.version_option(package_name="deid")
@click.option("--project-dir", envvar="DBT_PROJECT_DIR", show_envvar=True,
              type=click.Path(file_okay=False),
              help="The dbt project (default: the nearest directory upward with dbt_project.yml).")
@click.option("--profiles-dir", envvar="DBT_PROFILES_DIR", show_envvar=True,
              type=click.Path(file_okay=False), help="Where profiles.yml is, as for dbt.")
@click.option("--target", envvar="DBT_TARGET", show_envvar=True,
              help="The profile target whose deid plugin names the vault, as for dbt.")
def main(project_dir: str | None, profiles_dir: str | None, target: str | None) -> None:
    """Administer a deid vault: keys, who may detokenize, the audit log."""


@main.command()
@_vault_option
@click.option("--transformer", "transformers", multiple=True, metavar="PRINCIPAL",
              help="Grant PRINCIPAL tokenize (mint) in every domain: the principal that builds "
                   "the marts (repeatable).")
def init(vault: str | None, transformers: tuple[str, ...]) -> None:
    """Create the vault and its keys (the only command that creates a vault; idempotent);
    tokenize is denied until granted."""
    svc = _service(vault, create=True)
    click.echo(f"vault: {svc.store.url}")
    click.echo(f"keys:  {svc.keyring.source} (versions {svc.keyring.versions}, "
               f"current {svc.keyring.current})")
    path = getattr(svc.store, "path", None)
    if path is not None:
        click.echo(f"git:   {path.parent / '.gitignore'} keeps the vault and its keys out of git")
    for principal in transformers:
        _grant(svc, principal, "tokenize", ALL_DOMAINS)


_RIGHTS = ("detokenize", "tokenize", "lookup")


def _right_options(f: Any) -> Any:
    f = click.option("--domain", default=ALL_DOMAINS, show_default=True,
                     help="tokenize/lookup: the token domain (email, or email:marketing's "
                          "domain marketing); * is every domain.")(f)
    for right in reversed(_RIGHTS):
        help_text = {"detokenize": "re-identify tokens (the default)",
                     "tokenize": "mint new tokens and look up existing ones",
                     "lookup": "only receive tokens of values already in the vault"}[right]
        f = click.option(f"--{right}", "right", flag_value=right, default=None,
                         help=help_text)(f)
    return f


def _grant(svc: VaultTokenService, principal: str, right: str, domain: str) -> None:
    if right == "detokenize":
        added = svc.store.grant(principal, _admin())
    else:
        added = svc.store.grant_tokenize(principal, domain, right, _admin())
    where = f" in domain {domain}" if right != "detokenize" else ""
    svc.audit("grant", _admin(), "added" if added else "unchanged", subject=principal,
              right=right, domain=domain if right != "detokenize" else None, host="cli")
    click.echo(f"{principal}: {'granted' if added else 'already granted'} {right}{where}")


@main.command()
@click.argument("principal")
@_right_options
@_vault_option
def grant(principal: str, right: str, domain: str, vault: str | None) -> None:
    """Allow PRINCIPAL to detokenize (default), tokenize or look up tokens.

    The warehouse must grant EXECUTE too. A principal holds one of tokenize or lookup per
    domain; granting the other replaces it.
    """
    _grant(_service(vault), principal, right or "detokenize", domain)


@main.command()
@click.argument("principal")
@_right_options
@_vault_option
def revoke(principal: str, right: str, domain: str, vault: str | None) -> None:
    """Remove PRINCIPAL's detokenize (default) or tokenize/lookup grant."""
    svc = _service(vault)
    right = right or "detokenize"
    if right == "detokenize":
        removed = svc.store.revoke(principal)
    else:
        removed = svc.store.revoke_tokenize(principal, domain)
    svc.audit("revoke", _admin(), "removed" if removed else "unchanged", subject=principal,
              right=right, domain=domain if right != "detokenize" else None, host="cli")
    click.echo(f"{principal}: {'revoked' if removed else 'was not granted'} {right}")


@main.command()
@_vault_option
def principals(vault: str | None) -> None:
    """List the vault's policies: who may detokenize, tokenize and look up."""
    store = _service(vault).store
    for p in store.principals():
        click.echo(f"{p['principal']}\tdetokenize\tgranted {p['granted_at']} by "
                   f"{p['granted_by']}")
    for g in store.tokenize_grants():
        click.echo(f"{g['principal']}\t{g['mode']} {g['domain']}\tgranted {g['granted_at']} "
                   f"by {g['granted_by']}")


@main.group()
def keys() -> None:
    """Key versions: rotate, rewrap, show."""


@keys.command("show")
@_vault_option
def keys_show(vault: str | None) -> None:
    """Key versions in use (never key material)."""
    svc = _service(vault)
    click.echo(f"source:   {svc.keyring.source}")
    click.echo(f"versions: {svc.keyring.versions} (current {svc.keyring.current})")
    click.echo(f"records by version: {json.dumps(svc.store.stats()['key_versions'])}")


@keys.command("rotate")
@_vault_option
def keys_rotate(vault: str | None) -> None:
    """Add a new encryption key version; tokens do not change, old values stay readable."""
    svc = _service(vault)
    ring, made = svc.store.rotate_keyring(seen_current=svc.keyring.current)
    svc.keyring = ring
    if made:
        svc.audit("keys.rotate", _admin(), f"current={ring.current}", host="cli")
        click.echo(f"rotated: new values are encrypted with key version {ring.current}; "
                   f"versions {ring.versions} kept in {ring.source}")
    else:
        click.echo(f"not rotated: another rotation made key version {ring.current} just now "
                   "(one new version is what was asked for)")


# Passes over the vault before rewrap gives up: a pass finds only records minted before the
# rotation was recorded (writers are refused an old version after it), so two suffice.
_REWRAP_PASSES = 5


@keys.command("rewrap")
@_vault_option
@click.option("--batch-size", default=10_000, show_default=True)
def keys_rewrap(vault: str | None, batch_size: int) -> None:
    """Re-encrypt every value under the current key version (then old versions can retire).

    Finishes only when no record under an older version remains."""
    svc = _service(vault)
    moved = 0
    for _ in range(_REWRAP_PASSES):
        # The key set as the vault has it now, not as this process loaded it.
        ring = svc.keyring = svc.store.reload_keyring()
        for batch in svc.store.iter_values(batch_size):
            updates = [(token, value, StoredValue(*ring.encrypt(
                            token, ring.decrypt(token, value.key_version, value.ciphertext))))
                       for token, value in batch if value.key_version != ring.current]
            if updates:
                moved += svc.store.update_values(updates)
        old = {v: n for v, n in svc.store.key_version_counts().items() if v != ring.current}
        if not old:
            break
    else:
        raise DeidError(f"deid keys rewrap: records remain under older key versions "
                        f"{sorted(old)} after {_REWRAP_PASSES} passes (a rotation is running "
                        "concurrently?); run rewrap again")
    svc.audit("keys.rewrap", _admin(), f"rewrapped={moved}", count=moved, host="cli")
    click.echo(f"rewrapped {moved} values under key version {ring.current}; no record uses "
               "an older version")


@keys.command("retire")
@_vault_option
@click.argument("version", type=int)
def keys_retire(vault: str | None, version: int) -> None:
    """Remove an old key version; refused while any record is encrypted under it."""
    svc = _service(vault)
    ring = svc.store.retire_key_version(version)
    svc.audit("keys.retire", _admin(), f"retired={version}", host="cli")
    click.echo(f"retired key version {version}; versions {ring.versions} remain "
               f"(current {ring.current})")


@main.group()
def audit() -> None:
    """The hash-chained detokenize audit log."""


@audit.command("show")
@_vault_option
@click.option("--limit", default=20, show_default=True, help="Show the last N records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line.")
def audit_show(vault: str | None, limit: int, as_json: bool) -> None:
    """Show the last audit records (who, time, counts, kinds; never values), then flag
    principals whose tokenize lookups mostly miss (someone testing guesses)."""
    all_records = list(_service(vault).store.audit_records())
    for r in all_records[-limit:]:
        if as_json:
            click.echo(json.dumps(r, sort_keys=True))
            continue
        kinds = ",".join(f"{k}={n}" for k, n in r.get("kinds", {}).items()) or "-"
        extra = ""
        if r.get("subject"):
            extra += f" subject={r['subject']} right={r.get('right')}"
            extra += f" domain={r['domain']}" if r.get("domain") else ""
        if r["action"] == "tokenize":
            extra += f" new={r.get('new', 0)} existing={r.get('existing', 0)}"
            extra += f" missed={r['missed']}" if r.get("missed") else ""
        if r.get("query_id"):
            extra += f" query={r['query_id']}"
        click.echo(f"#{r['seq']:<6} {r['at']}  {r['action']:<11} {r['principal']:<18} "
                   f"{r['outcome']:<9} count={r.get('count', 0):<7} kinds={kinds}{extra}")
    for s in _audit.suspected_guessing(all_records):
        click.echo(f"GUESSING? {s['principal']}: {s['missed']} of {s['lookups']} tokenize "
                   "lookups missed or were refused", err=True)


_head_option = click.option(
    "--head", type=click.Path(dir_okay=False, path_type=Path), default=None,
    envvar="DEID_AUDIT_HEAD", show_envvar=True,
    help="Head checkpoint file kept outside the vault (append-only, not writable by readers).")


@audit.command("verify")
@_vault_option
@_head_option
@click.option("--audit-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The auditor's key of an SQLite vault's log (default <vault>.audit-key).")
def audit_verify(vault: str | None, head: Path | None, audit_key: Path | None) -> None:
    """Check the hash chain; exit 1 at the first altered, reordered or missing record, or
    (with --head) when the log was truncated or re-chained since a checkpoint."""
    result = _service(vault).verify_audit(head, audit_key)
    click.echo(f"audit log intact: {result['records']} records, head {result['head']}")
    if head is None and not result["forward_secure"]:
        click.echo("(without --head a truncated log still verifies: keep checkpoints with "
                   "deid audit checkpoint --head FILE)")
    elif head is None:
        click.echo("(forward-secure log: truncation shows without --head; a vault file "
                   "replaced by an older copy needs checkpoints: deid audit checkpoint)")
    else:
        click.echo(f"consistent with {result['checkpoints']} checkpoint(s) in {head}")


@audit.command("checkpoint")
@_vault_option
@click.option("--head", type=click.Path(dir_okay=False, path_type=Path), required=True,
              envvar="DEID_AUDIT_HEAD", show_envvar=True,
              help="Append-only file outside the vault that readers cannot write.")
def audit_checkpoint(vault: str | None, head: Path) -> None:
    """Verify the log, then append its head (seq, hash) to --head."""
    doc = _service(vault).checkpoint_audit(head)
    click.echo(f"checkpoint: record {doc['seq']}, head {doc['hash']} appended to {head}")


def _lines(stream: TextIO) -> Iterator[str]:
    """One item per line; blank lines skipped; nothing echoed."""
    for line in stream:
        item = line.rstrip("\r\n")
        if item.strip():
            yield item


@main.command()
@click.argument("kind")
@click.option("--values-from", type=click.File("r", encoding="utf-8"),
              help="Erase these values, one per line ('-' reads stdin). Never pass a value "
                   "as an argument: it would stay in shell history and the process list.")
@click.option("--token", "tokens", multiple=True, help="Erase this token (repeatable).")
@click.option("--tokens-from", type=click.File("r", encoding="utf-8"),
              help="Erase these tokens, one per line ('-' reads stdin).")
@_vault_option
def forget(kind: str, values_from: TextIO | None, tokens: tuple[str, ...],
           tokens_from: TextIO | None, vault: str | None) -> None:
    """Erase a person from the vault: destroy the values' encrypted records of KIND
    (``kind`` or ``kind:domain``) and their fingerprint entries.

    Their tokens then fail to detokenize with an "erased" error, and the same value
    tokenized later gets a new token. Audited (who, when, kind, domain, count). A vault
    administrator's command: it needs the vault's own credentials, like grant and keys.
    """
    if values_from is not None and (tokens or tokens_from is not None):
        raise click.UsageError("pass values (--values-from) or tokens (--token, "
                               "--tokens-from), not both")
    config = VaultConfig.from_env({"vault": vault_url(vault)})
    svc = _eraser(config.url)
    if values_from is not None:
        items = list(_lines(values_from))
        n = svc.forget(kind, values=items, principal=_admin())
    elif tokens or tokens_from is not None:
        items = [*tokens, *(_lines(tokens_from) if tokens_from is not None else ())]
        n = svc.forget(kind, tokens=items, principal=_admin())
    else:
        raise click.UsageError("nothing to erase: pass --values-from, --token or --tokens-from")
    distinct = len(set(items))
    click.echo(f"erased {n} vault record(s) of kind {kind} ({distinct - n} of {distinct} "
               "given were not in the vault or already erased)")
    click.echo("downstream copies: list erased tokens with deid erased --since <date>")


def _eraser(url: str) -> Eraser:
    svc = open_service(VaultConfig(url, cache_size=0, detokenize_cache_size=0))
    if not isinstance(svc, Eraser):  # pragma: no cover - every vault deid opens can erase
        raise ConfigError("deid forget: this vault cannot erase records")
    return svc


def _since(text: str | None) -> str | None:
    """An ISO date or time, as the UTC text the vault stores (so it compares as text)."""
    if text is None:
        return None
    try:
        at = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter("expected an ISO 8601 date or time, e.g. 2026-01-31 or "
                                 "2026-01-31T12:00:00+00:00", param_hint="--since") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=_dt.UTC)
    return at.astimezone(_dt.UTC).isoformat(timespec="milliseconds")


@main.command()
@click.option("--since", help="Only tokens erased at or after this ISO date/time (UTC).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv",
              show_default=True)
@click.option("--out", type=click.File("w", encoding="utf-8"), default="-",
              help="Write here instead of stdout (e.g. seeds/deid_erased_tokens.csv).")
@_vault_option
def erased(since: str | None, fmt: str, out: TextIO, vault: str | None) -> None:
    """List erased tokens (token, kind, domain, erased_at) so downstream copies of mart rows
    can be found and cleaned; load it as a dbt seed for the deid.no_erased_tokens test.
    Tokens only: the values are gone."""
    config = VaultConfig.from_env({"vault": vault_url(vault)})
    svc = _eraser(config.url)
    rows: Iterator[Erasure] = svc.erasures(_since(since))
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["token", "kind", "domain", "erased_at"])
        for e in rows:
            writer.writerow([e.token, e.kind, e.domain, e.erased_at])
    else:
        for e in rows:
            out.write(json.dumps({"token": e.token, "kind": e.kind, "domain": e.domain,
                                  "erased_at": e.erased_at}) + "\n")


@main.command()
@_vault_option
@click.option("--json", "as_json", is_flag=True)
def stats(vault: str | None, as_json: bool) -> None:
    """Token counts per domain and kind, values per key version, policy and audit sizes."""
    data: dict[str, Any] = _service(vault).store.stats()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    click.echo(f"vault: {data['vault']}")
    for name, n in data["tokens"].items():
        click.echo(f"  {name:<28} {n:>10} tokens")
    click.echo(f"key versions: {json.dumps(data['key_versions'])}")
    click.echo(f"erased tokens: {data.get('erased', 0)}")
    click.echo(f"principals: {data['principals']}   tokenize grants: "
               f"{data.get('tokenize_grants', 0)}   audit records: {data['audit_records']}")


@main.command("tokenize-file")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--map", "column_map", type=click.Path(exists=True, dir_okay=False),
              help="target/manifest.json of a dbt project, or a YAML map of sources.")
@click.option("--source", help="The source in the map, e.g. pharmacy.customers.")
@click.option("-c", "--column", "overrides", multiple=True, metavar="NAME=KIND",
              help="Declare a column: a kind spec (email, string:customer) or 'clear'.")
@click.option("--allow-undeclared", is_flag=True,
              help="Pass columns the map does not declare through unchanged.")
@click.option("--format", "in_format", type=click.Choice(FILE_FORMATS),
              help="Input format (default: from the suffix).")
@click.option("--to", "out_format", type=click.Choice(FILE_FORMATS),
              help="Output format (default: from the suffix).")
@click.option("--batch-rows", default=50_000, show_default=True)
@click.option("--cache-size", default=200_000, show_default=True,
              help="Tokens kept in memory (entries, ~200 B each).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_vault_option
def tokenize_file(src: Path, dst: Path, column_map: str | None, source: str | None,
                  overrides: tuple[str, ...], allow_undeclared: bool, in_format: str | None,
                  out_format: str | None, batch_rows: int, cache_size: int, quiet: bool,
                  vault: str | None) -> None:
    """Tokenize SRC (CSV, Parquet, JSON Lines) into DST before it lands anywhere."""
    from .ingest import files as _files  # pyarrow: only this command needs it

    declared: dict[str, str | None] = {}
    name = source or src.stem
    if column_map:
        if not source:
            raise click.UsageError("--map needs --source (e.g. pharmacy.customers)")
        declared.update(_columns.source_columns(column_map, source).columns)
    for item in overrides:
        col, sep, kind = item.partition("=")
        if not sep or not col:
            raise click.UsageError(f"--column takes NAME=KIND, not {item[:40]!r}")
        declared[col.lower()] = None if kind == "clear" else kind
    columns = _columns.from_mapping({"sources": {name: {"columns": declared}}})[name]
    if not columns.sensitive:
        raise click.UsageError("no sensitive column declared: pass --map/--source or "
                               "--column NAME=KIND")
    if allow_undeclared:
        columns = _columns.SourceColumns(name, columns.columns, strict=False)
    config = VaultConfig.from_env({"vault": vault_url(vault), "cache_size": cache_size,
                                   "detokenize_cache_size": 0})
    service = open_service(config)
    total = _files.progress_total(src, in_format)
    with click.progressbar(length=total, label=f"tokenizing {src.name}", file=sys.stderr,
                           hidden=quiet) as bar:
        def advance(done: int) -> None:
            bar.update(done - bar.pos)

        stats = _files.tokenize_file(service, src, dst, columns, in_format=in_format,
                                     out_format=out_format, batch_rows=batch_rows,
                                     progress=advance)
    counts = ", ".join(f"{c}={n}" for c, n in (stats.tokenized or {}).items())
    click.echo(f"{dst}: {stats.rows} rows; tokenized {counts}", err=True)


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--customers", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--distinct-ratio", type=float, default=1.0, show_default=True)
def synth(out: Path, customers: int, seed: int, distinct_ratio: float) -> None:
    """Write synthetic raw landing tables (CSV) at any scale."""
    try:  # a developer tool, installed with the synth extra; the runtime never needs it
        from deid_synth import write_tables
    except ImportError:
        raise click.ClickException("deid synth needs the synthetic data tools: install deid "
                                   "with the synth extra (pip install 'deid[synth]')") from None
    try:
        counts = write_tables(out, customers, seed=seed, distinct_ratio=distinct_ratio)
    except ValueError as exc:  # out-of-range arguments; the message names which
        raise click.UsageError(str(exc)) from None
    for table, n in counts.items():
        click.echo(f"{table}: {n} rows")


@main.command()
@click.option("--project-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=".", show_default=True, help="The dbt project (its dbt_project.yml vars).")
@click.option("--target-path", envvar="DBT_TARGET_PATH", show_envvar=True, default="target",
              show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="dbt's target path (relative: to the project), as dbt reads it.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Default: <target-path>/manifest.json (after `dbt compile`).")
def check(project_dir: Path, target_path: Path, manifest: Path | None) -> None:
    """Column lineage over the compiled SQL: fail (exit 1) when declared PII reaches a relation
    outside the restricted zone without deid.tokenize or a registered generalizer."""
    # sqlglot comes with the engine extras (deid[duckdb], …), not with the vault CLI alone.
    from .lineage import check as check_lineage

    manifest = manifest or project_dir / target_path / "manifest.json"
    if not manifest.is_file():
        raise click.ClickException(f"{manifest} not found: run `dbt compile` first")
    findings = check_lineage(manifest, project_dir)
    for finding in findings:
        click.echo(f"deid check: {finding}", err=True)
    if findings:
        raise click.ClickException(
            f"{len(findings)} finding(s): declared PII would leave the restricted zone")
    click.echo("deid check: no declared PII leaves the restricted zone untreated")


@main.command("scan-artifacts")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--raw-db", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="DuckDB raw database file: also search for each declared raw value.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("target/manifest.json"), show_default=True,
              help="Where the declared PII columns are read from (with --raw-db).")
@click.option("--shapes", "by_shape", is_flag=True,
              help="Also report email-, SSN-, phone- and card-shaped strings (any engine; "
                   "unit-test fixture rows are reported too).")
def scan_artifacts(paths: tuple[Path, ...], raw_db: Path | None, manifest: Path,
                   by_shape: bool) -> None:
    """Report files under PATHS (default: logs target) holding sensitive values; exit 1 if any.

    Prints file names, kinds or raw columns and counts: never a value.
    """
    if not raw_db and not by_shape:
        raise click.UsageError("give --raw-db (DuckDB's raw file) and/or --shapes")
    values = (artifact_scan.raw_values(raw_db, artifact_scan.declared_columns(manifest))
              if raw_db else None)
    report = artifact_scan.scan(paths or (Path("logs"), Path("target")), values,
                                by_shape=by_shape)
    for path, found in report.items():
        counts = ", ".join(f"{n} {what}" for what, n in sorted(found.items()))
        click.echo(f"{path}: {counts}")
    if report:
        raise click.ClickException(
            f"{len(report)} file(s) hold sensitive values (an engine error message quoting a "
            "value, or a dbt show result): restrict or delete them before sharing logs or "
            "artifacts")
    click.echo("no sensitive values found" + (f" ({len(values)} raw values searched)"
                                                if values is not None else ""))


def run() -> None:
    """The `deid` console script: a DeidError becomes one line on stderr and exit 1."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DeidError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()

