"""The engines' plain-Python parts: actor planning, address checks, debris of killed writers, the local engine.

The Ray engine itself runs on real clusters in test_ray_engine.py.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from semdedup_assets.core import storage as st
from semdedup_assets.core.config import Settings
from semdedup_assets.core.engines import EngineError, LocalEngine, plan_actors, remove_temporaries, resolve_ray_address


def test_one_actor_per_gpu_with_no_cpu_claim_else_cpu_actors_splitting_the_cores():
    s = Settings()
    gpu = plan_actors(s, n_units=10, node_cpus=[1.0], gpus=2)
    assert (gpu.actors, gpu.options, gpu.threads) == (2, {"num_gpus": 1, "num_cpus": 0}, 0)
    two_nodes = plan_actors(s, n_units=10, node_cpus=[1.0, 1.0], gpus=0)
    assert (two_nodes.actors, two_nodes.options, two_nodes.threads) == (2, {"num_cpus": 1}, 1)
    one_actor = plan_actors(s.replace(ray_actors=1), n_units=10, node_cpus=[2.0], gpus=0)
    assert (one_actor.actors, one_actor.options, one_actor.threads) == (1, {"num_cpus": 2}, 2)
    assert plan_actors(s, n_units=1, node_cpus=[8.0], gpus=0).actors == 1  # never more actors than shards
    # 2 actors of 2 CPUs fit only once on nodes of 3 and 1 CPUs: a second one would wait forever
    assert plan_actors(s.replace(ray_actors=2), n_units=10, node_cpus=[3.0, 1.0], gpus=0).actors == 1


def test_a_malformed_or_unreachable_address_fails_at_once_naming_it():
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
    from semdedup_assets.core.ingest import ingest_shards
    from semdedup_assets.core.shards import discover_shards
    from semdedup_assets_tests.fixtures import write_embedding_shards

    write_embedding_shards(tmp_path / "in", n_shards=3, per_shard=20)
    settings = Settings(storage=str(tmp_path / "s"), input=str(tmp_path / "in"), modality="embedding")
    shards = discover_shards(settings.input)
    ingest_shards(settings, shards)
    done = list(LocalEngine().embed_shards(settings, shards))
    assert [d.unit for d in done] == [s.key for s in shards]
    assert all(d.result.rows == 20 and Path(d.result.path).exists() for d in done)
    assert len({d.worker for d in done}) == 1
