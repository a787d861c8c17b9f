"""Find the vault a dbt project uses: its directory, its profile's target, the deid plugin's
``vault`` setting. The CLI reads these so ``deid grant`` run anywhere in the project opens the
vault ``dbt build`` opens, never a second one.

Only what is needed is read, the way dbt resolves it: the project directory (``--project-dir``,
``DBT_PROJECT_DIR``, else the nearest directory upward holding ``dbt_project.yml``), the
profiles directory (``--profiles-dir``, ``DBT_PROFILES_DIR``, else ``profiles.yml`` in the
working directory, else ``~/.dbt``), the target (``--target``, ``DBT_TARGET``, else the
profile's default). Values are rendered with ``env_var`` only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

try:  # both come with dbt; without dbt there is no profile to read
    import jinja2
    import yaml
except ImportError:  # pragma: no cover - a bare `pip install deid` (no engine extra)
    jinja2 = None  # type: ignore[assignment]
    yaml = None  # type: ignore[assignment]

PLUGIN_MODULE = "deid.duckdb_plugin"


def find_project_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The dbt project directory, or None when there is none (as dbt finds it)."""
    given = explicit or os.environ.get("DBT_PROJECT_DIR")
    if given:
        path = Path(given).resolve()
        if not (path / "dbt_project.yml").is_file():
            raise ConfigError(f"deid: {path} holds no dbt_project.yml (from --project-dir or "
                              "DBT_PROJECT_DIR)")
        return path
    cwd = Path.cwd()
    return next((p for p in (cwd, *cwd.parents) if (p / "dbt_project.yml").is_file()), None)


def _render(text: Any, where: str) -> Any:
    if not isinstance(text, str) or "{{" not in text:
        return text

    def env_var(name: str, default: str | None = None) -> str:
        value = os.environ.get(name, default)
        if value is None:
            raise ConfigError(f"deid: {where} needs the environment variable {name}")
        return value

    try:
        return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text).render(
            env_var=env_var)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"deid: cannot render {where} ({exc.__class__.__name__}); set "
                          "DEID_VAULT or pass --vault") from None


def profile_vault(project_dir: Path, *, profiles_dir: str | None = None,
                  target: str | None = None) -> str | None:
    """The ``vault`` the project's profile gives the deid plugin in the target dbt would use;
    None when the profile, the target or the plugin setting is not there."""
    if yaml is None:
        return None
    project = yaml.safe_load((project_dir / "dbt_project.yml").read_text()) or {}
    profile_name = project.get("profile")
    folder = profiles_dir or os.environ.get("DBT_PROFILES_DIR")
    if folder:
        profiles = Path(folder) / "profiles.yml"
    elif (Path.cwd() / "profiles.yml").is_file():
        profiles = Path.cwd() / "profiles.yml"
    else:
        profiles = Path.home() / ".dbt" / "profiles.yml"
    if not profile_name or not profiles.is_file():
        return None
    profile = (yaml.safe_load(profiles.read_text()) or {}).get(profile_name) or {}
    name = _render(target or os.environ.get("DBT_TARGET") or profile.get("target"),
                   f"the target of profile {profile_name!r} in {profiles}")
    output = (profile.get("outputs") or {}).get(name) or {}
    for plugin in output.get("plugins") or []:
        if isinstance(plugin, dict) and plugin.get("module") == PLUGIN_MODULE:
            vault = (plugin.get("config") or {}).get("vault")
            if vault:
                return str(_render(vault, f"the deid plugin's vault in {profiles} "
                                          f"(profile {profile_name!r}, target {name!r})"))
    return None
