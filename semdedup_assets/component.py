"""`SemDedup`: the whole SemDeDup asset graph as a Dagster Component, for users' own projects.

In a project made with `create-dagster project`:

    dg scaffold defs semdedup_assets.SemDedup dedup_c4   # writes defs/dedup_c4/defs.yaml
    dg check defs
    dg launch --job dedup_c4_pipeline_job                # every stage, as `semdedup run`

Each component puts its graph under its own names (semdedup_assets/names.py): asset keys
under `<prefix>/` (`dedup_c4/keep_lists`, which the user's assets can depend on), its own
dynamic partitions (`dedup_c4_shards`), resource keys, GPU pool, jobs, sensors and
schedule, and its own storage root, so two components (two datasets) in one code location
never collide. This project's own code location (definitions.py) is one `SemDedup` with
no prefix, configured from the environment and the storage's `semdedup.json`.
"""

import re
from pathlib import Path
from typing import Any

import dagster as dg
from dagster.components.component_scaffolding import scaffold_component

from semdedup_assets.core.config import Settings, coerce, knobs
from semdedup_assets.core.settings_store import local_paths_absolute
from semdedup_assets.graph import build_definitions
from semdedup_assets.names import DEFAULT_NAMES, GraphNames
from semdedup_assets.pipeline import PipelineError, run_pipeline

PIPELINE_JOB = "pipeline_job"
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SemDedupScaffolder(dg.Scaffolder):
    """`dg scaffold defs semdedup_assets.SemDedup NAME`: a defs.yaml for one dataset, keys under NAME/."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        name = request.target_path.name
        scaffold_component(
            request,
            {
                "prefix": name,
                "input": "data/" + name,
                "storage": ".storage/" + name,
                "modality": "text",
                "encoder": None,
                "clusters": None,
                "eps": [0.01, 0.05, 0.1],
                "engine": "local",
                "sensors": False,
                "schedule": False,
                "settings": {},
            },
        )


@dg.scaffold_with(SemDedupScaffolder)
class SemDedup(dg.Component, dg.Resolvable, dg.Model):
    """Semantic deduplication (SemDeDup) of one dataset: ingest, embed, cluster, pairwise rule, keep-lists.

    The attributes are the knobs of `semdedup run` (docs/configuration.md lists them;
    `encoder` is the `model` knob); `settings` takes any other knob by name. `prefix` puts every asset key under `<prefix>/`
    and names the partitions, resources, pool, jobs, sensors and schedule after it.
    """

    prefix: str | None = None
    input: str | None = None
    storage: str = ".storage"
    modality: str = "text"
    encoder: str | None = None  # the `model` knob (`model` is a name Resolvable keeps for itself)
    clusters: int | None = None
    eps: list[float] | None = None
    engine: str = "local"
    ray_address: str | None = None
    pool: str | None = None
    sensors: bool = False
    schedule: bool = False
    settings: dict[str, Any] = {}  # noqa: RUF012  dg.Model is pydantic: each instance gets its own copy

    @classmethod
    def from_settings(cls, settings: Settings, prefix: str | None = None) -> "SemDedup":
        """The component for a Settings object (every knob goes in `settings`, the named attributes too)."""
        values = {f.name: getattr(settings, f.name) for f in knobs()}
        values["eps"] = list(values["eps"])
        named = {
            k: values.pop(k)
            for k in ("input", "storage", "modality", "clusters", "eps", "engine", "ray_address", "sensors")
        }
        return cls(prefix=prefix, encoder=values.pop("model"), settings=values, **named)

    @property
    def names(self) -> GraphNames:
        """The Dagster-side names of this component's graph."""
        if self.prefix is None:
            return DEFAULT_NAMES
        if not _PREFIX.match(self.prefix):
            raise ValueError(f"prefix must be a Python identifier (letters, digits, _), got {self.prefix!r}")
        return GraphNames.for_component(self.prefix, self.pool)

    def to_settings(self, root: Path | None = None) -> Settings:
        """The plain Settings of this component; relative local paths are taken from `root` (the project root)."""
        unknown = sorted(set(self.settings) - {f.name for f in knobs()})
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; the knobs are {[f.name for f in knobs()]}")
        values = {name: coerce(name, raw) for name, raw in self.settings.items()}
        values.update(
            input=self.input,
            storage=self.storage,
            modality=self.modality,
            model=self.encoder,
            clusters=self.clusters,
            engine=self.engine,
            ray_address=self.ray_address,
            sensors=self.sensors,
        )
        if self.eps is not None:
            values["eps"] = tuple(self.eps)
        for key in ("input", "storage", "reference"):
            if (
                root is not None
                and values.get(key)
                and "://" not in values[key]
                and not Path(values[key]).is_absolute()
            ):
                values[key] = str(root / values[key])
        return local_paths_absolute(Settings(**values))  # without a root: from the current directory

    def definitions(self, root: Path | None = None) -> dg.Definitions:
        """The graph's definitions and a job that runs every stage (`<prefix>_pipeline_job`)."""
        settings, names = self.to_settings(root), self.names
        return dg.Definitions.merge(
            build_definitions(settings, names, schedule_running=self.schedule),
            dg.Definitions(jobs=[build_pipeline_job(names)]),
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return self.definitions(context.project_root)


def build_pipeline_job(names: GraphNames) -> dg.JobDefinition:
    """A job of one op that registers every shard under `input` and runs every stage as its own run.

    The stages cover different partitionings (shards, none, buckets), which one run cannot
    hold, so the op runs them as `semdedup run` does: one run per stage, in this instance,
    each shown in the run history.
    """

    @dg.op(name=names.definition("run_every_stage"), required_resource_keys={names.resource})
    def run_every_stage(context: dg.OpExecutionContext) -> None:
        settings = getattr(context.resources, names.resource).settings()
        try:
            result = run_pipeline(settings, context.instance, log=context.log.info, names=names)
        except PipelineError as err:
            raise dg.Failure(description=str(err)) from None
        context.log.info(f"{len(result.shards)} shard(s); runs {result.run_ids}")

    @dg.job(
        name=names.definition(PIPELINE_JOB),
        description="Register every shard under `input` and materialize the whole graph (one run per stage).",
    )
    def pipeline_job() -> None:
        run_every_stage()

    return pipeline_job
