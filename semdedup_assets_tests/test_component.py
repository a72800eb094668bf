"""The `SemDedup` Component in a user's project: a fresh `create-dagster project` with two of them.

One module-scoped project (offline: `create-dagster project --no-uv-sync`): `dg scaffold
defs semdedup_assets.SemDedup dedup_c4` writes the first defs.yaml, a second component
(`dedup_laion`) sits beside it, and a user asset `training_mix` depends on
`dedup_c4/keep_lists`. Small bring-your-own-embedding shards: no model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from semdedup_assets.component import SemDedup
from semdedup_assets.core.config import Settings
from semdedup_assets.instance import ensure_instance_config
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards

BIN = Path(sys.executable).parent
KNOBS = {"modality": "embedding", "clusters": 3, "eps": [0.01, 0.05, 0.1]}
BUCKETS = 2


def _dg(project: Path, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "dg"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"dg {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A create-dagster project with components dedup_c4 (scaffolded) and dedup_laion, and a user asset."""
    root = tmp_path_factory.mktemp("userproj")
    home = root / "dagster_home"
    ensure_instance_config(str(home))  # telemetry off
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMDEDUP_")}
    env.update(
        DAGSTER_HOME=str(home),
        VIRTUAL_ENV=sys.prefix,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # The project is not installed (no uv sync offline): its src/ goes on the path.
        PYTHONPATH=os.pathsep.join(p for p in (str(root / "userproj" / "src"), env.get("PYTHONPATH")) if p),
    )
    subprocess.run(
        [str(BIN / "create-dagster"), "project", "userproj", "--no-uv-sync"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    proj = root / "userproj"
    with open(proj / "pyproject.toml", "a") as f:
        f.write("\n[tool.dg.cli.telemetry]\nenabled = false\n")
    write_embedding_shards(proj / "data" / "c4", n_shards=2, per_shard=60, d=8, dup_every=5)
    write_embedding_shards(proj / "data" / "laion", n_shards=2, per_shard=40, d=8, dup_every=4, seed=1)

    _dg(proj, env, "scaffold", "defs", "semdedup_assets.SemDedup", "dedup_c4")
    defs_dir = proj / "src" / "userproj" / "defs"
    scaffolded = yaml.safe_load((defs_dir / "dedup_c4" / "defs.yaml").read_text())
    assert scaffolded["type"] == "semdedup_assets.SemDedup" and scaffolded["attributes"]["prefix"] == "dedup_c4"
    for name, data in (("dedup_c4", "c4"), ("dedup_laion", "laion")):
        (defs_dir / name).mkdir(exist_ok=True)
        attributes = dict(
            scaffolded["attributes"],
            prefix=name,
            input=f"data/{data}",
            storage=f".storage/{name}",
            settings={"buckets": BUCKETS},
            **KNOBS,
        )
        (defs_dir / name / "defs.yaml").write_text(
            yaml.safe_dump({"type": "semdedup_assets.SemDedup", "attributes": attributes}, sort_keys=False)
        )
    (defs_dir / "training_mix.py").write_text(
        "import dagster as dg\n\n\n"
        "@dg.asset(deps=[dg.AssetKey(['dedup_c4', 'keep_lists'])])\n"
        "def training_mix() -> dg.MaterializeResult:\n"
        '    """The user\'s own asset, downstream of the keep-lists."""\n'
        "    return dg.MaterializeResult(metadata={'mixed': True})\n"
    )
    return proj, env


def test_dg_check_and_list_two_components_that_do_not_collide(project: tuple[Path, dict[str, str]]) -> None:
    proj, env = project
    checked = _dg(proj, env, "check", "defs")
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = json.loads(_dg(proj, env, "list", "defs", "--json").stdout)
    keys = {a["asset_key"] for a in listed["assets"]}
    plain = SemDedup.from_settings(Settings(storage=str(proj / "unused"))).definitions()
    graph = {k.to_user_string() for k in plain.resolve_all_asset_keys()}
    assert {"raw_shards", "keep_lists", "deduplicated"} <= graph
    assert keys == {f"{p}/{k}" for p in ("dedup_c4", "dedup_laion") for k in graph} | {"training_mix"}
    deps = {a["asset_key"]: a["dependency_keys"] for a in listed["assets"]}
    assert deps["training_mix"] == ["dedup_c4/keep_lists"]
    for kind in ("jobs", "sensors", "schedules", "resources"):
        names = [d["name"] for d in listed[kind]]
        assert len(names) == len(set(names)) and {
            n.startswith(("dedup_c4", "semdedup_dedup_c4", "ray_dedup_c4")) for n in names
        } == {True, False}, (kind, names)
    assert {"dedup_c4_pipeline_job", "dedup_laion_pipeline_job"} <= {j["name"] for j in listed["jobs"]}


def test_two_components_have_their_own_partitions_pools_and_storage(tmp_path: Path) -> None:
    a = SemDedup(prefix="dedup_c4", input="data/c4", storage=".storage/dedup_c4", **KNOBS)
    b = SemDedup(prefix="dedup_laion", input="data/laion", storage=".storage/dedup_laion", **KNOBS)
    defs = dg.Definitions.merge(a.definitions(tmp_path), b.definitions(tmp_path))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    for comp in ("dedup_c4", "dedup_laion"):
        node = graph.get(dg.AssetKey([comp, "embeddings"]))
        assert node.pools == {f"{comp}_gpu"}
        assert node.partitions_def.name == f"{comp}_shards"
        assert a.to_settings(tmp_path).storage != b.to_settings(tmp_path).storage
    assert a.to_settings(tmp_path).storage == str(tmp_path / ".storage" / "dedup_c4")
    # The project's own code location is the same component with no prefix.
    plain = SemDedup.from_settings(Settings(storage=str(tmp_path / "s"))).definitions()
    assert plain.resolve_assets_def("keep_lists").key == dg.AssetKey("keep_lists")
    with pytest.raises(ValueError, match="unknown setting"):
        SemDedup(prefix="x", settings={"no_such_knob": 1}).to_settings()


@pytest.mark.timeout(600)
def test_dg_launch_materializes_one_component_with_the_bytes_of_semdedup_run(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    proj, env = project
    _dg(proj, env, "launch", "--job", "dedup_c4_pipeline_job", timeout=600)
    c4 = proj / ".storage" / "dedup_c4"
    keep = sorted((c4 / "keep_lists").glob("eps=*.parquet"))
    assert len(keep) == len(KNOBS["eps"])
    assert not (proj / ".storage" / "dedup_laion").exists()  # the other component was not touched

    # `semdedup run`'s pipeline on the same input and knobs, in a storage and instance of its own.
    settings = Settings(
        storage=str(tmp_path / "ref"),
        input=str(proj / "data" / "c4"),
        buckets=BUCKETS,
        modality="embedding",
        clusters=3,
        eps=(0.01, 0.05, 0.1),
    )
    with dg.instance_for_test() as instance:
        run_pipeline(settings, instance, log=lambda _: None)
    reference = sorted((tmp_path / "ref" / "keep_lists").glob("eps=*.parquet"))
    assert [p.name for p in keep] == [p.name for p in reference]
    assert [p.read_bytes() for p in keep] == [p.read_bytes() for p in reference]

    _dg(proj, env, "launch", "--assets", "training_mix")
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("training_mix")) is not None
        assert instance.get_dynamic_partitions("dedup_c4_shards") == ["part-00", "part-01"]
        assert instance.get_dynamic_partitions("dedup_laion_shards") == []
