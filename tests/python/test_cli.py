"""The `deid` admin CLI: init, grant/revoke, keys rotate/rewrap, audit show/verify, stats."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import open_service_at
from deid.cli import main
from deid.service import VaultTokenService

Cli = Callable[..., Result]


@pytest.fixture
def cli(vault_path: Path) -> Cli:
    runner = CliRunner()
    url = f"sqlite:///{vault_path}"

    def run(*args: str, ok: bool = True) -> Result:
        if not vault_path.exists() and args[0] != "init":  # the vault `deid init` made
            assert runner.invoke(main, ["init", "--vault", url]).exit_code == 0
        result = runner.invoke(main, [*args[:2], "--vault", url, *args[2:]]
                               if args[0] in ("keys", "audit") else [*args, "--vault", url])
        if ok:
            assert result.exit_code == 0, result.output
        return result
    return run


def test_init_creates_vault_and_keys(cli: Cli, vault_path: Path) -> None:
    out = cli("init").output
    assert "versions [1]" in out and vault_path.exists()
    assert (vault_path.parent / "vault.db.keys").stat().st_mode & 0o777 == 0o600


def test_grant_revoke_and_principals_are_audited(cli: Cli, vault_path: Path) -> None:
    assert "granted" in cli("grant", "pii_reader").output
    assert "already granted" in cli("grant", "pii_reader").output
    assert cli("principals").output.startswith("pii_reader\t")
    assert "revoked" in cli("revoke", "pii_reader").output
    assert cli("principals").output == ""
    actions = [json.loads(line)["action"] for line in
               cli("audit", "show", "--json").output.splitlines()]
    assert actions == ["grant", "grant", "revoke"]
    assert "3 records" in cli("audit", "verify").output


def test_rotate_then_rewrap_keeps_tokens_and_values(cli: Cli, vault_path: Path) -> None:
    svc = open_service_at(vault_path)
    tokens = svc.tokenize("email", [f"u{i}@example.com" for i in range(30)])
    assert "key version 2" in cli("keys", "rotate").output
    assert "rewrapped 30 values under key version 2" in cli("keys", "rewrap").output
    assert '{"2": 30}' in cli("keys", "show").output
    after = open_service_at(vault_path, cache_size=0)
    assert after.tokenize("email", [f"u{i}@example.com" for i in range(30)]) == tokens
    after.store.grant("p", "test")
    assert after.detokenize(tokens, principal="p")[0] == "u0@example.com"


def test_audit_verify_fails_on_tampering(cli: Cli, vault_path: Path) -> None:
    cli("grant", "a")
    cli("grant", "b")
    db = sqlite3.connect(vault_path)
    db.execute("update audit set record = replace(record, '\"a\"', '\"z\"') where seq = 1")
    db.commit()
    result = cli("audit", "verify", ok=False)
    assert result.exit_code != 0
    assert "record 1 was altered" in str(result.exception or result.output)


def test_stats_counts_tokens_without_values(cli: Cli, vault_path: Path) -> None:
    open_service_at(vault_path).tokenize("ssn", ["901-23-4567", "901-23-4568", None])
    out = cli("stats", "--json").output
    data = json.loads(out)
    assert data["tokens"] == {"ssn (ssn)": 2} and "901-23" not in out


def test_console_script_reports_errors_in_one_line(vault_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from deid.keys import FileKeyring
    from deid.stores.sqlite import SQLiteStore

    SQLiteStore(vault_path, create=True).close()  # a vault exists, its keys come from DEID_KEYS
    env = {"DEID_KEYS": FileKeyring.generate().to_json(), "PATH": ""}
    proc = subprocess.run([str(Path(sys.executable).with_name("deid")), "keys", "rotate",
                           "--vault", f"sqlite:///{vault_path}"], env=env, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: deid keys: keys come from DEID_KEYS")
    assert "Traceback" not in proc.stderr


def test_grants_record_who_granted_and_to_whom(cli: Cli, vault_path: Path) -> None:
    import getpass

    assert "granted tokenize" in cli("init", "--transformer", "dbt_transformer").output
    assert "granted lookup in domain email" in cli("grant", "--lookup", "matcher",
                                                   "--domain", "email").output
    assert "revoked lookup" in cli("revoke", "--lookup", "matcher", "--domain", "email").output
    assert "granted detokenize" in cli("grant", "--detokenize", "pii_reader").output
    listed = cli("principals").output
    assert "dbt_transformer\ttokenize *" in listed and "pii_reader\tdetokenize" in listed
    records = [json.loads(line) for line in cli("audit", "show", "--json").output.splitlines()]
    assert [(r["action"], r["principal"], r["subject"], r["right"], r["domain"])
            for r in records] == [
        ("grant", getpass.getuser(), "dbt_transformer", "tokenize", "*"),
        ("grant", getpass.getuser(), "matcher", "lookup", "email"),
        ("revoke", getpass.getuser(), "matcher", "lookup", "email"),
        ("grant", getpass.getuser(), "pii_reader", "detokenize", None)]


def test_audit_checkpoint_then_verify_head_detects_truncation(cli: Cli, vault_path: Path,
                                                              tmp_path: Path) -> None:
    from deid.stores.sqlite import SQLiteStore

    # A log sealed with the key file's audit key, as PostgreSQL and DynamoDB seal theirs.
    legacy = VaultTokenService(SQLiteStore(vault_path, create=True, forward_audit=False))
    legacy.audit("grant", "admin", "added", subject="a")
    head = tmp_path / "head.jsonl"
    cli("grant", "b")
    assert "record 2" in cli("audit", "checkpoint", "--head", str(head)).output
    assert "consistent with 1 checkpoint" in cli("audit", "verify", "--head", str(head)).output
    db = sqlite3.connect(vault_path)
    db.execute("delete from audit where seq = 2")
    db.commit()
    db.close()
    assert "without --head" in cli("audit", "verify").output
    result = cli("audit", "verify", "--head", str(head), ok=False)
    assert result.exit_code != 0 and "truncated" in str(result.exception)


def test_the_embedded_log_needs_the_auditors_key_not_a_head(cli: Cli, vault_path: Path,
                                                            tmp_path: Path) -> None:
    cli("grant", "a")
    cli("grant", "b")
    key = tmp_path / "auditor.key"
    (vault_path.parent / "vault.db.audit-key").rename(key)
    assert "2 records" in cli("audit", "verify", "--audit-key", str(key)).output
    db = sqlite3.connect(vault_path)
    db.execute("delete from audit where seq = 2")
    db.commit()
    db.close()
    result = cli("audit", "verify", "--audit-key", str(key), ok=False)
    assert "newest records were removed" in str(result.exception)


def test_audit_show_flags_lookups_that_mostly_miss(cli: Cli, vault_path: Path) -> None:
    from deid.errors import PermissionDeniedError

    svc = open_service_at(vault_path)
    svc.store.grant_tokenize("etl", "*", "tokenize", "test")
    svc.store.grant_tokenize("prober", "email", "lookup", "test")
    svc.tokenize("email", [f"u{i}@example.com" for i in range(30)], principal="etl")
    for i in range(30):
        with pytest.raises(PermissionDeniedError):
            svc.tokenize("email", [f"guess{i}@example.com"], principal="prober")
    svc.flush_audit()
    out = CliRunner().invoke(main, ["audit", "show", "--vault",
                                                    f"sqlite:///{vault_path}"])
    assert "GUESSING? prober: 30 of 30" in out.stderr
    assert "etl" not in out.stderr


def test_synth_refuses_bad_arguments_with_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path), "--customers", "0"])
    assert result.exit_code == 2 and "customers must be at least 1" in result.output


PROFILE = """
shop:
  target: dev
  outputs:
    dev:
      type: duckdb
      path: shop.duckdb
      plugins:
        - module: deid.duckdb_plugin
          config: {vault: "{{ env_var('SHOP_VAULT', 'sqlite:///.deid/vault.db') }}"}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dbt project whose profile gives the deid plugin a relative vault path."""
    root = tmp_path / "shop"
    (root / "models" / "marts").mkdir(parents=True)
    (root / "dbt_project.yml").write_text("name: shop\nprofile: shop\nconfig-version: 2\n")
    (root / "profiles.yml").write_text(PROFILE)
    monkeypatch.setenv("DBT_PROFILES_DIR", str(root))
    for name in ("DBT_PROJECT_DIR", "DBT_TARGET", "SHOP_VAULT"):
        monkeypatch.delenv(name, raising=False)
    return root


def test_commands_on_a_missing_vault_exit_nonzero_and_create_nothing(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack: `deid principals` run where no vault is used to create an empty one and
    exit 0, so a typo in the vault path looked like "nobody is granted"."""
    monkeypatch.chdir(project / "models")
    before = sorted(project.rglob("*"))
    for args in (["principals"], ["grant", "pii_reader"], ["stats"], ["audit", "verify"],
                 ["keys", "show"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0, args
        assert f"no vault at {project / '.deid' / 'vault.db'}" in str(result.exception)
    assert sorted(project.rglob("*")) == before


def test_cli_finds_the_vault_the_dbt_profile_names_from_any_directory(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project / "models" / "marts")
    out = CliRunner().invoke(main, ["init"])
    assert out.exit_code == 0, out.output
    assert f"vault: sqlite:///{project / '.deid' / 'vault.db'}" in out.output
    assert CliRunner().invoke(main, ["grant", "pii_reader"]).exit_code == 0
    # from outside the project: --project-dir (or DBT_PROJECT_DIR) finds the same vault
    monkeypatch.chdir(tmp_path)
    listed = CliRunner().invoke(main, ["--project-dir", str(project), "principals"])
    assert listed.output.startswith("pii_reader\t"), listed.output
    # the profile's own setting is followed (here an env_var with another path)
    monkeypatch.setenv("SHOP_VAULT", "sqlite:///vaults/shop.db")
    moved = CliRunner().invoke(main, ["--project-dir", str(project), "principals"])
    assert f"no vault at {project / 'vaults' / 'shop.db'}" in str(moved.exception)


def test_a_relative_vault_outside_any_dbt_project_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DBT_PROJECT_DIR", raising=False)
    result = CliRunner().invoke(main, ["init"])
    assert result.exit_code != 0
    assert "no dbt project directory" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_init_keeps_the_vault_and_its_keys_out_of_git(tmp_path: Path) -> None:
    """The attack: `git add -A` in a project committed .deid/vault.db.keys."""
    import shutil
    import subprocess

    git = shutil.which("git")
    assert git, "git is needed to check what it would commit"
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([git, "init", "-q", str(repo)], check=True)
    (repo / "model.sql").write_text("select 1")
    # a vault in its own new directory, and one beside the project's own files
    for url in (f"sqlite:///{repo / '.deid' / 'vault.db'}", f"sqlite:///{repo / 'v.db'}"):
        assert CliRunner().invoke(main, ["init", "--vault", url]).exit_code == 0
    assert (repo / ".deid" / "vault.db.keys").exists() and (repo / "v.db.keys").exists()
    subprocess.run([git, "add", "-A"], cwd=repo, check=True)
    staged = subprocess.run([git, "diff", "--cached", "--name-only"], cwd=repo, check=True,
                            capture_output=True, text=True).stdout.split()
    assert staged == [".gitignore", "model.sql"]
