"""Run the dbt project from a private copy (so tests can add models and run in parallel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PARTS = ("dbt_project.yml", "models", "macros", "seeds", "analyses", "tests/generic",
                 "profiles.yml.example", ".sqlfluff")


@dataclass
class DbtProject:
    path: Path
    env: dict[str, str] = field(default_factory=dict)

    def dbt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        dbt = Path(sys.executable).with_name("dbt")
        proc = subprocess.run([str(dbt), *args], cwd=self.path, env=self.env, text=True,
                              capture_output=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"dbt {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def deid(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The `deid` admin CLI on this project's vault (DEID_VAULT in its environment)."""
        deid = Path(sys.executable).with_name("deid")
        proc = subprocess.run([str(deid), *args], cwd=self.path, env=self.env, text=True,
                              capture_output=True, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f"deid {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc


def copy_project(dest: Path, profiles: str | None = None, **env: str) -> DbtProject:
    """Copy the project to `dest` with its own profiles.yml, warehouse and vault."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in PROJECT_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / part)
    (dest / "profiles.yml").write_text(
        profiles if profiles is not None else (ROOT / "profiles.yml.example").read_text())
    full_env = {
        **os.environ,
        "DBT_PROFILES_DIR": str(dest),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DEID_WAREHOUSE": str(dest / "warehouse.duckdb"),
        "DEID_RAW": str(dest / "raw.duckdb"),
        # dest is absolute, so this is sqlite:////abs/path
        "DEID_VAULT": f"sqlite:///{dest.resolve() / '.deid' / 'vault.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **env,
    }
    full_env.pop("DEID_KEYS", None)
    return DbtProject(dest, full_env)
