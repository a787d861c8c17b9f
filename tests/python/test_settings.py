"""Settings travel with the macros: every var deid reads has its default where it is read,
deid's dbt_project.yml holds none (a package's vars never reach its macros when another
project calls them), and README "Settings" lists exactly these vars."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

SOURCES = [*(ROOT / "macros").rglob("*.sql"), *(ROOT / "tests" / "generic").glob("*.sql")]


def _vars_read() -> dict[str, list[str]]:
    """var name -> the call texts reading it (literal names, and names passed to the role
    helpers, which read var(var_name, []))."""
    found: dict[str, list[str]] = {}
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(r"var\(\s*'(\w+)'\s*(,?)", text):
            found.setdefault(m.group(1), []).append(f"{path.name}: {m.group(0)}")
        for m in re.finditer(r"(?:role_list|grantees)\(\s*'(deid_\w+)'", text):
            found.setdefault(m.group(1), [])
    # deid's example grants its marts with this one (dbt_project.yml), consumers may too
    found.setdefault("deid_analyst_roles", [])
    return found


def test_every_var_read_has_its_default_at_the_call() -> None:
    without_default = [call for calls in _vars_read().values() for call in calls
                       if not call.endswith(",")]
    assert without_default == []


def test_deid_project_declares_no_default_of_its_own() -> None:
    """Its only var is the example's own choice (two extra generalizers), not a default."""
    project = yaml.safe_load((ROOT / "dbt_project.yml").read_text())
    assert [v for v in project.get("vars") or {} if str(v).startswith("deid_")] == [
        "deid_generalizers"]


def test_readme_settings_table_lists_every_var() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Settings"):readme.index("### Macros")]
    listed = set(re.findall(r"^\| `(deid_\w+)` \|", table, flags=re.M))
    assert listed == set(_vars_read())


def test_the_safe_harbor_default_is_the_one_the_readme_states() -> None:
    macro = (ROOT / "macros" / "restricted_zip3.sql").read_text()
    call = macro[macro.index("var('deid_restricted_zip3'"):]
    default = re.findall(r"'(\d{3})'", call[:call.index("])")])
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines()
               if line.startswith("| `deid_restricted_zip3`"))
    assert len(default) == 17 and default == re.findall(r"\b(\d{3})\b", row.split("|")[2])[-17:]
