"""The documentation site: the configuration page is generated from Settings and lists every knob,
and `mkdocs build --strict` passes (issue 35, point 2)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from semdedup_assets.cli import build_parser
from semdedup_assets.core.config import ENV_PREFIX, knobs

REPO = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config", REPO / "docs" / "gen_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_flags() -> dict[str, str]:
    """dest -> the first option string of every `semdedup run` option, from the real parser."""
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["run"]
    return {a.dest: a.option_strings[0] for a in run._actions if a.option_strings}


def _rows(page: str) -> dict[str, list[str]]:
    """knob -> its table cells, from the page's `| `knob` | ...` rows."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_configuration_page_lists_every_knob_with_flag_resource_env_default_and_help() -> None:
    gen = _generator()
    page = gen.render()
    rows = _rows(page)
    flags = _run_flags()
    names = [f.name for f in knobs()]
    assert list(rows) == names, "every knob, in the model's order, and nothing else"
    for f in knobs():
        _knob, flag, resource, env, default, help_text = rows[f.name]
        if f.name in flags and f.name != "storage":
            assert f"`{flags[f.name]}`" in flag, (f.name, flag, flags[f.name])
        else:
            assert flag in ("—", "`--storage` (every command)"), (f.name, flag)
        assert resource == f"`{f.name}`", f.name
        assert env == f"`{ENV_PREFIX}{f.name.upper()}`", f.name
        assert default, f.name
        assert f.metadata["help"].split(" ")[0] in help_text, f.name
    assert "memory_budget" in rows  # the knob the hand-written table had missed


def test_committed_configuration_page_is_the_generated_one() -> None:
    """Fails when a knob is added, renamed or re-documented in Settings without `make docs`."""
    committed = (REPO / "docs" / "configuration.md").read_text()
    generated = _generator().render()
    missing = sorted(set(_rows(generated)) - set(_rows(committed)))
    assert not missing, f"docs/configuration.md lacks {missing}: run `make docs`"
    assert committed == generated, "docs/configuration.md is out of date: run `make docs`"


@pytest.mark.subprocess
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
