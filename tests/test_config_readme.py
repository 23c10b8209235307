"""The README's configuration section matches the code: every LoraplexConfig key has one row with
its env name and its default, no row names a key that does not exist, and every non-setting
LORAPLEX_* variable the loader accepts is listed."""
from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from loraplex_common.config import NON_SETTING_ENV, LoraplexConfig, env_name, parse_value

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def _rows(section: str, ncells: int) -> list[list[str]]:
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == ncells:
            rows.append(cells)
    return rows


def _code(cell: str) -> str:
    m = re.fullmatch(r"`([^`]*)`.*", cell)
    assert m, f"cell {cell!r} does not start with a `code` value"
    return m.group(1)


def _defaults() -> dict[str, object]:
    out = {}
    for f in fields(LoraplexConfig):
        assert f.default is not MISSING, f.name
        out[f.name] = f.default
    return out


def test_every_config_key_has_one_readme_row_with_env_name_and_default():
    rows = _rows(_section("Configuration"), 4)
    keys = [_code(r[0]) for r in rows]
    defaults = _defaults()
    assert len(keys) == len(set(keys)), "a key has two rows"
    assert set(keys) - set(defaults) == set(), "README rows for keys that do not exist"
    assert set(defaults) - set(keys) == set(), "config keys without a README row"
    for key, env, default, meaning in rows:
        key = _code(key)
        assert _code(env) == env_name(key), f"{key}: README env {env}, code {env_name(key)}"
        shown = _code(default)
        if shown == '""':  # an empty string, or an empty list written as its env form
            value = "" if isinstance(defaults[key], str) else parse_value(key, "")
        else:
            value = parse_value(key, shown)
        assert value == defaults[key], f"{key}: README default {shown!r}, code {defaults[key]!r}"
        assert meaning, f"{key}: no meaning"


def test_non_setting_variables_are_listed():
    rows = _rows(_section("Configuration"), 2)
    assert {_code(r[0]) for r in rows} == set(NON_SETTING_ENV)


@pytest.mark.parametrize("title", ["Configuration", "Onboarding: `tenantctl`", "Limits"])
def test_readme_names_no_removed_key(title):
    """Old names of renamed keys stay out of the README."""
    text = _section(title)
    for old in ("max_resident_adapters", "tenant_registry/config.py"):
        assert old not in text, f"README section {title!r} still names {old}"
