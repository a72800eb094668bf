"""The engines' plain-Python parts: actor planning, address checks, debris of killed writers, the local engine.

The Ray engine itself runs on real clusters in test_ray_engine.py.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.run.engines import DRIVER, EngineError
from semdedup_assets.core.run.local_engine import LocalEngine
from semdedup_assets.core.run.ray_engine import (
    LazyEncoder,
    plan_actors,
    ray_init_options,
    remove_temporaries,
    resolve_ray_address,
    starts_local_instance,
    worker_died_error,
)


def test_one_actor_per_gpu_with_no_cpu_claim_else_cpu_actors_splitting_the_cores():
    s = Settings()
    gpu = plan_actors(s, n_units=10, node_cpus=[1.0], gpus=2)
    assert (gpu.actors, gpu.options, gpu.threads) == (2, {"num_gpus": 1, "num_cpus": 0}, 0)
    two_nodes = plan_actors(s, n_units=10, node_cpus=[1.0, 1.0], gpus=0)
    # CPU actors: the Rust tokenizers' pool held to the actor's share through its runtime_env
    assert (two_nodes.actors, two_nodes.options, two_nodes.threads) == (
        2,
        {"num_cpus": 1, "runtime_env": {"env_vars": {"RAYON_NUM_THREADS": "1"}}},
        1,
    )
    one_actor = plan_actors(s.replace(ray_actors=1), n_units=10, node_cpus=[2.0], gpus=0)
    assert (one_actor.actors, one_actor.options, one_actor.threads) == (
        1,
        {"num_cpus": 2, "runtime_env": {"env_vars": {"RAYON_NUM_THREADS": "2"}}},
        2,
    )
    assert plan_actors(s, n_units=1, node_cpus=[8.0], gpus=0).actors == 1  # never more actors than shards
    # 2 actors of 2 CPUs fit only once on nodes of 3 and 1 CPUs: a second one would wait forever
    assert plan_actors(s.replace(ray_actors=2), n_units=10, node_cpus=[3.0, 1.0], gpus=0).actors == 1


def test_a_malformed_or_unreachable_address_fails_at_once_naming_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(EngineError, match="'nonsense' is not HOST:PORT"):
        resolve_ray_address("nonsense")
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(EngineError, match=f"cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        resolve_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5
    assert resolve_ray_address(None) is None  # no address: start a local instance


def test_no_address_inside_a_ray_job_connects_there_without_the_local_instance_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` of this machine to find
    # Ray's job supervisor sets RAY_ADDRESS for each job's driver (a Dagster run under RayRunLauncher);
    # ray.init() then joins that cluster, where the driver must keep its node's own address.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert resolve_ray_address(None) is None  # Ray's choice
    assert not starts_local_instance()
    assert "_node_ip_address" not in ray_init_options(None)
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert starts_local_instance()
    assert ray_init_options(None)["_node_ip_address"] == "127.0.0.1"  # a new instance: loopback only


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path: Path):
    path = st.UPath(str(tmp_path / "embeddings" / "part-01.parquet"))
    path.parent.mkdir()
    debris = path.parent / ".part-01.parquet.0123abcd.tmp"
    other = path.parent / ".part-02.parquet.0123abcd.tmp"
    for p in (path, debris, other):
        p.write_bytes(b"x")
    remove_temporaries(path)
    assert path.exists() and other.exists() and not debris.exists()


def test_the_local_engine_runs_the_core_units_in_order(tmp_path: Path):
    from semdedup_assets.core.io.shards import discover_shards
    from semdedup_assets.core.run.loop import ingest_shards
    from semdedup_assets_tests.fixtures import write_embedding_shards

    write_embedding_shards(tmp_path / "in", n_shards=3, per_shard=20)
    settings = Settings(storage=str(tmp_path / "s"), input=str(tmp_path / "in"), modality="embedding")
    shards = discover_shards(settings.input)
    ingest_shards(settings, shards)
    done = list(LocalEngine().embed_shards(settings, shards))
    assert [d.unit for d in done] == [s.key for s in shards]
    assert all(d.result.rows == 20 and Path(d.result.path).exists() for d in done)
    assert len({d.worker for d in done}) == 1
    files = {d.unit: st.UPath(d.result.path) for d in done}
    engine = LocalEngine()
    settings = settings.replace(clusters=3)
    centroids = engine.train_centroids(settings, files)  # k-means in this process: the driver
    assert (centroids.unit, centroids.result.clusters, centroids.worker.role) == ("centroids", 3, DRIVER)
    cuda = torch.cuda.is_available()
    assert ("CUDA not available" in centroids.result.device_note) == (not cuda)
    assigned = list(engine.assign_shards(settings, [s.key for s in shards]))
    assert [d.unit for d in assigned] == [s.key for s in shards]
    assert all(d.result.rows == 20 and Path(d.result.path).exists() for d in assigned)
    assert {d.result.device for d in assigned} == {"cuda" if cuda else "cpu"}


def test_an_embedding_actor_loads_its_encoder_only_when_a_shard_needs_it(monkeypatch):
    import semdedup_assets.core.embed.encoders as encoders

    loads = []

    class Fake:
        modality = "text"

        def encode(self, texts):
            return len(texts)

    monkeypatch.setattr(encoders, "encoder_for", lambda settings: loads.append(settings) or Fake())
    lazy = LazyEncoder(Settings())
    assert loads == [] and bool(lazy)  # truthy: embed_shard's `encoder or encoder_for(...)` keeps it
    assert lazy.encode(["a", "b"]) == 2 and lazy.modality == "text" and len(loads) == 1
    lazy.encode(["c"])
    assert len(loads) == 1 and isinstance(lazy.loaded(), Fake)  # loaded once


def test_a_unit_past_its_retries_is_named():
    err = worker_died_error("shard", "part-03", 4, 3, RuntimeError("worker crashed\nmore"))
    assert str(err) == "shard 'part-03': its Ray worker died 4 time(s); the 3 retries are exhausted: worker crashed"
    assert err.shard == "part-03"
    assert worker_died_error("bucket", "007", 1, 0, RuntimeError("x")).shard is None
    assert str(worker_died_error("k-means", "centroids", 2, 1, RuntimeError("x"))).startswith("k-means: its Ray")
