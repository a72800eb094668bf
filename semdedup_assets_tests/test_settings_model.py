"""One settings model: the CLI and the resource are derived from `Settings` and cannot drift.

Also the rule for a re-run with different settings: flags left out mean their defaults
(never the stored run's), the run warns about every change and prints its effective
settings, and every option can be set back (`--no-strict`, `--clusters auto`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from semdedup_assets.cli import _settings_from_args, build_parser
from semdedup_assets.core.config import DEFAULT_EPS, Settings, allowed_values, default_of, field_types, knobs
from semdedup_assets.core.settings_store import load_settings, save_settings
from semdedup_assets.resources import SemDedupConfig, resource_type
from semdedup_assets_tests.fixtures import write_embedding_shards

PACKAGE = Path(__file__).resolve().parents[1] / "semdedup_assets"


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def test_resource_fields_are_the_settings_knobs() -> None:
    # SemDedupConfig declares its fields statically (resources.py): each knob once, typed as Dagster takes it.
    fields = SemDedupConfig.model_fields
    names = {f.name for f in knobs()}
    assert set(fields) == names, (
        f"add to SemDedupConfig in resources.py: {sorted(names - set(fields))}; remove: {sorted(set(fields) - names)}"
    )
    types = field_types()
    for f in knobs():
        assert fields[f.name].annotation == resource_type(types[f.name]), f.name
        if f.name == "storage":
            assert fields[f.name].is_required()
            continue
        default = default_of(f)
        assert fields[f.name].default == (list(default) if isinstance(default, tuple) else default), f.name
    # Round trip: every knob survives Settings -> resource -> Settings.
    s = Settings(storage="/tmp/s", clusters=7, eps=(0.2, 0.01), keep="easy", strict=True, sensor_interval=5)
    assert SemDedupConfig.from_settings(s).settings() == s


def test_cli_options_are_the_settings_knobs() -> None:
    actions = {a.dest: a for a in _run_parser()._actions if a.dest not in ("help",)}
    with_flag = {f.name for f in knobs() if f.metadata.get("flag", "") is not None}
    assert set(actions) == with_flag | {"storage", "verbose"}  # -v: the terminal, not a setting
    for f in knobs():
        if f.name not in actions:
            continue
        action = actions[f.name]
        assert action.default is None, f"--{f.name}: a flag left out must mean 'not given', not a value"
        assert f.metadata["help"] in action.help
        allowed = allowed_values(f)
        if allowed:
            assert tuple(action.choices) == allowed, f.name


def test_allowed_values_are_defined_once() -> None:
    from semdedup_assets.core.dedup import ordering, pairwise

    assert allowed_values(next(f for f in knobs() if f.name == "keep")) == ordering.STRATEGIES
    assert allowed_values(next(f for f in knobs() if f.name == "precision")) == pairwise.TILE_PRECISIONS
    with pytest.raises(ValueError, match="keep must be one of hard, easy, random"):
        Settings(keep="medium")


def test_environment_is_read_only_in_the_settings_module_and_dagster_home_handling() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "os.environ" not in line and "os.getenv" not in line:
                continue
            # The settings (model and store) and DAGSTER_HOME (the instance; `make ui` hands it to dg dev).
            if rel in ("core/config.py", "core/settings_store.py") or (
                rel in ("instance.py", "ui.py", "cli.py") and "DAGSTER_HOME" in line
            ):
                continue
            offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.subprocess
def test_definitions_module_reads_nothing_at_import(tmp_path: Path) -> None:
    # A broken semdedup.json must not break `import semdedup_assets.definitions`: the
    # settings are read when Dagster loads the code location.
    (tmp_path / "semdedup.json").write_text("{not json")
    code = "import semdedup_assets.definitions as d; print(type(d.defs).__name__)"
    env = dict(os.environ, SEMDEDUP_STORAGE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from semdedup_assets.definitions import load_definitions

    os.environ["SEMDEDUP_STORAGE"] = str(tmp_path)
    try:
        with pytest.raises(ValueError, match=r"semdedup.json"):
            load_definitions()
    finally:
        del os.environ["SEMDEDUP_STORAGE"]


def test_operations_knobs_come_from_settings(tmp_path: Path) -> None:
    import dagster as dg

    from semdedup_assets.definitions import build_definitions

    d = build_definitions(Settings(storage=str(tmp_path), sensors=True, sensor_interval=7, retrain_cron="0 1 * * *"))
    assert d.resolve_sensor_def("shard_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    assert d.resolve_sensor_def("bucket_sensor").minimum_interval_seconds == 7
    assert d.resolve_schedule_def("retrain_centroids_schedule").cron_schedule == "0 1 * * *"


def test_flags_left_out_mean_defaults_not_the_stored_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEMDEDUP_STRICT", raising=False)
    monkeypatch.delenv("SEMDEDUP_CLUSTERS", raising=False)
    storage = str(tmp_path / "storage")
    save_settings(Settings(storage=storage, input="/data", strict=True, clusters=500, eps=(0.2,), buckets=3))
    parser = build_parser()
    again = _settings_from_args(parser.parse_args(["run", "--input", "/data", "--storage", storage]))
    assert again.strict is False and again.clusters is None and again.eps == DEFAULT_EPS and again.buckets == 16
    # ... while commands working on the existing storage see what it holds.
    assert load_settings(storage).strict is True and load_settings(storage).clusters == 500
    # Every option can be set back explicitly too.
    args = parser.parse_args(["run", "--input", "/data", "--storage", storage, "--no-strict", "--clusters", "auto"])
    assert _settings_from_args(args).strict is False and _settings_from_args(args).clusters is None
    args = parser.parse_args(["run", "--input", "/data", "--storage", storage, "--strict", "--clusters", "12"])
    assert _settings_from_args(args).strict is True and _settings_from_args(args).clusters == 12
    monkeypatch.setenv("SEMDEDUP_STRICT", "off")
    assert load_settings(storage).strict is False
    with pytest.raises(ValueError, match="strict must be on or off"):
        load_settings(storage, strict="maybe")


def test_stored_settings_hold_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_settings(Settings(storage="rel-storage", input="rel-input"))
    stored = json.loads((tmp_path / "rel-storage" / "semdedup.json").read_text())
    assert stored["input"] == str(tmp_path / "rel-input") and stored["storage"] == str(tmp_path / "rel-storage")


@pytest.mark.subprocess
def test_rerun_warns_about_changed_settings_and_prints_the_effective_ones(tmp_path: Path) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8)
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith("SEMDEDUP_")}
    base = [
        sys.executable,
        "-m",
        "semdedup_assets.cli",
        "run",
        "--input",
        str(tmp_path / "input"),
        "--storage",
        str(tmp_path / "storage"),
        "--modality",
        "embedding",
        "--buckets",
        "2",
    ]
    first = subprocess.run(
        [*base, "--clusters", "5", "--eps", "0.05"], env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "warning" not in first.stderr
    line = next(x for x in first.stdout.splitlines() if x.startswith("[semdedup] settings: "))
    effective = dict(item.split("=", 1) for item in line.split(": ", 1)[1].split())
    assert effective["clusters"] == "5" and effective["eps"] == "0.05" and effective["modality"] == "embedding"
    assert effective["buckets"] == "2" and effective["strict"] == "False"

    second = subprocess.run(base, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    warned = set(re.findall(r"warning: (\w+) is ", second.stderr))
    assert warned == {"clusters", "eps"}, second.stderr
    line = next(x for x in second.stdout.splitlines() if x.startswith("[semdedup] settings: "))
    effective = dict(item.split("=", 1) for item in line.split(": ", 1)[1].split())
    assert effective["clusters"] == "auto" and effective["eps"] == ",".join(map(str, DEFAULT_EPS))
    clusters = re.search(r"^clusters: (\d+)$", second.stdout, re.M)
    assert clusters and int(clusters.group(1)) == round((2 * 60) ** 0.5)


def test_relative_paths_are_not_reported_as_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semdedup_assets.core.settings_store import changed_settings

    monkeypatch.chdir(tmp_path)
    save_settings(Settings(storage="st", input="inp", clusters=4))
    assert changed_settings(Settings(storage="st", input="inp", clusters=4)) == {}
    assert changed_settings(Settings(storage="st", input="other", clusters=4)) == {
        "input": (str(tmp_path / "inp"), str(tmp_path / "other"))
    }
