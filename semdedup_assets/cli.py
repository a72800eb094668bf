"""The `semdedup` command line: run, demo, sql, groups, forget, status, export, verify, sweep, compare, distill."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from semdedup_assets.core.config import (
    AUTO_KNOBS,
    Settings,
    allowed_values,
    base_type,
    default_of,
    describe_settings,
    knobs,
    shown_value,
)
from semdedup_assets.core.messages import printable
from semdedup_assets.core.settings_store import changed_settings, load_settings
from semdedup_assets.status import refuse_missing_storage
from semdedup_assets.ui import ui_command

DEMO_STORAGE = ".demo/storage"
DEMO_MODEL = "static"  # the demo's default text model: fast on a CPU; --model all-MiniLM-L6-v2 for the transformer
# The catalog's views (core.io.catalog.VIEW_NAMES; listed here so --help imports no DuckDB).
SQL_VIEWS = (
    "items",
    "embeddings",
    "centroids",
    "eps_curve",
    "groups",
    "raw_items",
    "rejected",
    "contaminated",
    "cluster_assignments",
    "centroid_vectors",
    "pruned",
    "pruned_budget",
)


def _add_storage(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--storage",
        default=default,
        help=f"storage root: local folder or fsspec URL (default: $SEMDEDUP_STORAGE or {default or '.storage'})",
    )


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print Dagster's own DEBUG event stream (always recorded in the instance for the UI)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="semdedup",
        description="SemDeDup (semantic deduplication, Abbas et al. 2023) as a Dagster asset graph. "
        "Results land as Parquet under the storage root, with a DuckDB catalog at <storage>/catalog.duckdb.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="register every shard under --input and materialize the whole asset graph",
        description="Register every shard file under --input as a `shards` partition and "
        "materialize the whole asset graph through Dagster (runs are recorded in $DAGSTER_HOME, "
        "default <storage>/dagster_home, so they show in the Dagster UI: `make ui` in a checkout, "
        "`dagster dev -m semdedup_assets.definitions` with DAGSTER_HOME and SEMDEDUP_STORAGE set).",
    )
    add_settings_options(run)
    _add_storage(run)
    _add_verbose(run)

    demo = sub.add_parser(
        "demo",
        help="the embedded demo: Python's own docstrings, deduplicated end to end",
        description="Write the embedded demo shards (real English text from this Python's "
        "standard-library docstrings) and run the whole graph on them, as `make demo`.",
    )
    _add_storage(demo, DEMO_STORAGE)
    demo.add_argument(
        "--model",
        default=DEMO_MODEL,
        metavar="static|all-MiniLM-L6-v2|...",
        help="text model of the demo (default: static, this machine's model2vec distillation of "
        "all-MiniLM-L6-v2, made on first use; all-MiniLM-L6-v2 runs the transformer itself)",
    )
    _add_verbose(demo)

    sql = sub.add_parser(
        "sql",
        help="query the DuckDB catalog (views items, embeddings, centroids, eps_curve, ...)",
        description="Run SQL against the catalog's views (those of <storage>/catalog.duckdb, "
        "in a private in-memory connection: it never waits for another client of the file). "
        f"Views: {', '.join(SQL_VIEWS)}. Several statements separated by `;` run in order, "
        "each result printed under its statement. The keep-list at any eps is "
        "`SELECT id FROM items WHERE max_sim <= 1 - eps`.",
    )
    sql.add_argument("query", help='e.g. "SELECT * FROM eps_curve"')
    _add_storage(sql)

    groups = sub.add_parser(
        "groups",
        help="the largest duplicate groups at one eps (connected components of the duplicate graph)",
        description="Print the largest duplicate groups at a configured eps: the connected components "
        "of the graph with an edge from each removed item to its duplicate_of, two or more items each. "
        "A group is named by its one kept item (group_id, listed first); the other members are by id. "
        "For text, each listed member's text follows. All groups: the `groups` view (`semdedup sql`).",
    )
    groups.add_argument(
        "--eps", type=float, default=None, help="one of the configured eps (default: the smallest configured)"
    )
    groups.add_argument("--top", type=int, default=10, help="how many groups, largest first (default: 10)")
    groups.add_argument(
        "--examples", type=int, default=5, help="members listed per group, the kept item first (default: 5)"
    )
    _add_storage(groups)

    forget = sub.add_parser(
        "forget",
        help="remove one shard's results and its partition",
        description="Delete a shard's raw, rejected, embeddings and cluster_assignments files "
        "and its `shards` partition, then re-run (through Dagster) the cluster buckets its items "
        "were in and the keep-lists, so the catalog no longer shows it.",
    )
    forget.add_argument("shard", help="shard key, e.g. part-03 or 2024/part-03")
    _add_storage(forget)
    _add_verbose(forget)

    status = sub.add_parser(
        "status",
        help="what a storage holds and what state it is in",
        description="Input and settings; shards registered, embedded and assigned; centroids "
        "(age, k, training sample); buckets done; keep-lists with the eps curve; the last runs "
        "with status and duration, stale or failed runs; disk used per stage.",
    )
    status.add_argument("--json", action="store_true", help="the same as JSON, for scripts")
    _add_storage(status)

    export = sub.add_parser(
        "export",
        help="write the deduplicated dataset (each input shard, kept rows only)",
        description="Write every input shard again under <storage>/deduplicated/<selection>/, "
        "in its own format and relative path, with all of its columns and only the kept rows "
        "(items flagged by --reference decontamination are dropped too). Shards whose kept rows "
        "did not change since the last export of the same selection are not rewritten.",
    )
    export.add_argument(
        "--select",
        default=None,
        metavar="eps=E|keep-fraction=F|METHOD:K=V,...",
        help="eps=E (one of the configured eps) or keep-fraction=F with 0 < F <= 1: keep the "
        "ceil(F * items) items with the smallest max_sim, ties by id (default: the smallest eps); "
        "or a pruning selection, computed first: prototypes:keep-fraction=F, "
        "d4:eps=E,keep-fraction=F[,clusters=K], dbp:eps=E,keep-fraction=F[,temperature=T,neighbours=L]",
    )
    _add_storage(export)

    verify = sub.add_parser(
        "verify",
        help="check that every stage file is whole and consistent; --repair deletes bad ones",
        description="Read every stage file back and check it against its upstream (row counts, ids, "
        "embedding cache keys, cluster ranges, keep-list counts). Exits 1 and lists each bad file; "
        "with --repair, deletes them (and leftover temporary files) so that the next "
        "`semdedup run` recomputes them.",
    )
    verify.add_argument(
        "--repair",
        action="store_true",
        help="delete every damaged or inconsistent file "
        "(stale files, made from an input or settings that changed since, are left: a run redoes them)",
    )
    verify.add_argument(
        "--content",
        action="store_true",
        help="also read every input file and compare its bytes "
        "with the digest recorded at ingest (finds an in-place edit that kept size and mtime)",
    )
    _add_storage(verify)

    sweep = sub.add_parser(
        "sweep",
        help="the robustness study: one run per k (and encoder), embeddings computed once",
        description="Run the whole graph once per --clusters value (and per --model and --seed), "
        "each in its own sub-storage <storage>/[model=M/]k=K[/seed=S], a normal storage that every "
        "command opens. Each "
        "encoder embeds once; the other k of that encoder share its embeddings files (hard links, "
        "not copies) and run only centroids to keep-lists. Then compares them as `semdedup compare`.",
    )
    add_settings_options(sweep)
    sweep._option_string_actions["--clusters"].help = "comma-separated k values, e.g. 100,1000,5000 (auto allowed)"
    sweep._option_string_actions["--clusters"].required = True
    sweep._option_string_actions["--clusters"].metavar = "K1,K2,..."
    # Through a name: `ruff format` splits the subscripted target differently on each pass otherwise.
    model = sweep._option_string_actions["--model"]
    model.help = (
        "comma-separated encoders to sweep as well (default: the modality's default model, one sub-storage per k)"
    )
    seed = sweep._option_string_actions["--seed"]
    seed.type, seed.metavar = None, "S1,S2,..."
    seed.help = "comma-separated seeds to sweep as well (k-means sample and training, the random order; default: 0)"
    _add_storage(sweep)
    sweep.add_argument(
        "--plot", default=None, metavar="PNG", help="where to write the eps curves (default: <storage>/compare.png)"
    )
    _add_verbose(sweep)

    compare = sub.add_parser(
        "compare",
        help="compare the removals of storages on the same items (k, seed, encoder)",
        description="Join finished storages on the item id (they must hold the same ids) and "
        "print, per eps, each one's removed count and, per pair, the Jaccard index of the removed "
        "sets and the share of A's removals that B also makes; write every configuration's eps "
        "curve into one PNG. A sweep's root stands for all of its sub-storages.",
    )
    compare.add_argument("storages", nargs="+", metavar="STORAGE", help="storage roots (or a `semdedup sweep` root)")
    compare.add_argument(
        "--eps",
        default=None,
        metavar="E1,E2,...",
        help="eps values to compare at (default: every eps any of the storages configured)",
    )
    compare.add_argument(
        "--plot",
        default="semdedup-compare.png",
        metavar="PNG",
        help="where to write the eps curves (default: ./semdedup-compare.png)",
    )

    distill = sub.add_parser(
        "distill",
        help="build a static (model2vec) text model from a local transformer, offline",
        description="Distil a model2vec static model: one forward pass per token of the "
        "source model's vocabulary (with a progress bar), PCA to --dims, Zipf/SIF weights. "
        "Without --out it writes this machine's default for `--model static` into the cache "
        "folder ($SEMDEDUP_CACHE, else ~/.cache/semdedup), once; use the result with "
        "`semdedup run --model model2vec:OUT`.",
    )
    distill.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="MODEL",
        help="a local Hugging Face encoder folder or a cached hub name (default: the shipped all-MiniLM-L6-v2)",
    )
    distill.add_argument("--dims", type=int, default=None, help="output width after PCA (default: 256)")
    distill.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="output folder (default: the cached `--model static` of this machine)",
    )
    distill.add_argument("--force", action="store_true", help="distil again even when the output already exists")
    return parser


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One option per Settings knob that has a flag: name, type, choices, help and default from Settings."""
    for f in knobs():
        flag = f.metadata.get("flag", "")
        if flag is None:
            continue
        flag = flag or "--" + f.name.replace("_", "-")
        kind, allowed, default = base_type(f.name), allowed_values(f), default_of(f)
        shown = None if default is None and f.name not in AUTO_KNOBS else shown_value(f.name, default)
        help_text = f"{f.metadata['help']} (default: {shown})" if shown is not None else f.metadata["help"]
        options: dict[str, object] = {"dest": f.name, "default": None, "help": help_text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction  # --strict / --no-strict
        elif allowed:
            options["choices"] = allowed
        elif kind in (int, float) and f.name not in (*AUTO_KNOBS, "eps"):
            options["type"] = kind  # clusters and buckets also take `auto` and eps a list; Settings coerces them
        if f.metadata.get("metavar"):
            options["metavar"] = f.metadata["metavar"]
        if f.name == "input":
            options["required"] = True
        parser.add_argument(flag, **options)


def _settings_from_args(args: argparse.Namespace) -> Settings:
    """A run's settings: defaults, SEMDEDUP_* variables, then the flags given (never the stored run's)."""
    overrides = {f.name: getattr(args, f.name, None) for f in knobs() if f.name != "storage"}
    return load_settings(args.storage, use_stored=False, **overrides)


def warn_changed_settings(settings: Settings) -> None:
    """Warn about every knob that differs from the run stored in the same storage."""
    changed = changed_settings(settings)
    for name, (before, now) in sorted(changed.items()):
        print(
            f"semdedup: warning: {name} is {shown_value(name, now)}, the previous run on this storage used "
            f"{shown_value(name, before)}",
            file=sys.stderr,
        )


def summary(settings: Settings) -> str:
    """Items, clusters (the k that k-means used, as `status` shows it) and kept/removed per eps, from the catalog."""
    from semdedup_assets.core.io.catalog import format_table, query

    storage = settings.storage_root()
    _, [(items,)] = query(storage, "SELECT count(*) FROM items")
    _, [(k, filled)] = query(storage, "SELECT count(*), count(*) FILTER (WHERE size > 0) FROM centroids")
    clusters = f"{k}" if filled == k else f"{k} ({filled} with members, {k - filled} empty)"
    cols, rows = query(
        storage, "SELECT eps, kept, removed, round(kept_fraction, 4) AS kept_fraction FROM eps_curve ORDER BY eps"
    )
    return f"items: {items}\nclusters: {clusters}\n{format_table(cols, rows)}\ncatalog: {storage.catalog_file}"


def _show_progress(settings: Settings):
    """Progress of the long stages on stderr while a command runs: bars on a terminal, a line per interval elsewhere."""
    from semdedup_assets import progress

    return progress.reporting(progress.Reporter(sys.stderr, interval=settings.progress_interval))


def cmd_run(settings: Settings, verbose: bool = False) -> int:
    """Materialize the whole graph and print the summary."""
    from semdedup_assets.core.io.shards import ShardError
    from semdedup_assets.core.io.storage import StoreError
    from semdedup_assets.instance import open_instance
    from semdedup_assets.pipeline import PipelineError, check_run_locations, run_pipeline

    warn_changed_settings(settings)
    print(f"[semdedup] settings: {describe_settings(settings)}", flush=True)
    try:
        # Every refusal about the locations before the instance is opened: that creates <storage>/dagster_home.
        check_run_locations(settings)
        # Before the clock starts: a one-time distillation is set-up, not pipeline time.
        prepare_static_model(settings)
    except (PipelineError, ValueError, ImportError, OSError) as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    instance = open_instance(settings)
    start = time.perf_counter()
    try:
        with _show_progress(settings):
            result = run_pipeline(
                settings, instance, log=lambda m: print(m, flush=True), verbose=verbose, stop_on_signals=True
            )
    except (PipelineError, ShardError, StoreError, FileNotFoundError, ValueError) as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    print(
        f"\nshards: {len(result.shards)}  stages (s): "
        + ", ".join(f"{k} {v}" for k, v in result.seconds.items())
        + f"  total: {time.perf_counter() - start:.1f} s"
    )
    print(summary(settings))
    home = os.environ["DAGSTER_HOME"]
    print(f"dagster runs recorded in {home} (open them with `{ui_command(settings.storage, home)}`)")
    return 0


def cmd_demo(storage: str, verbose: bool = False, model: str = DEMO_MODEL) -> int:
    """Write the demo shards and run the graph on them."""
    from semdedup_assets.core.io.storage import folder_problem
    from semdedup_assets.demo_data import write_demo_shards

    storage = os.path.abspath(storage)
    input_dir = os.path.join(os.path.dirname(storage.rstrip("/")), "input")
    for location, role in ((storage, "--storage"), (input_dir, "the demo's input")):
        if (problem := folder_problem(location, role)) is not None:  # before the demo shards are written
            print(f"semdedup: error: {problem}", file=sys.stderr)
            return 1
    paths = write_demo_shards(input_dir)
    print(f"[semdedup] demo: {len(paths)} shards of Python standard-library docstrings in {input_dir}")
    settings = load_settings(storage, use_stored=False, input=input_dir, modality="text", max_length=128, model=model)
    return cmd_run(settings, verbose)


def prepare_static_model(settings: Settings) -> None:
    """A static --model: make `static` exist before the run (saying so when it is made), check a model2vec:PATH."""
    from semdedup_assets.core.embed.encoders.static import resolve_static_model, wants_static

    if settings.modality == "text" and wants_static(settings.model):
        # Fails here, before any run starts, when model2vec:PATH is not a static model.
        resolve_static_model(settings.model or "", log=lambda m: print(f"[semdedup] {m}", flush=True))


def cmd_distill(source: str | None, dims: int | None, out: str | None, force: bool = False) -> int:
    """Distil a static model (to `out`, or this machine's cached `--model static`) and say where it is."""
    from semdedup_assets.core.embed.encoders.static import (
        DEFAULT_STATIC_DIMS,
        default_static_model,
        distill_static_model,
        is_static_model_dir,
        static_cache_dir,
    )

    dims = DEFAULT_STATIC_DIMS if dims is None else dims
    log = lambda m: print(f"[semdedup] {m}", flush=True)  # noqa: E731
    try:
        if out is None and source is None and not force:
            path = default_static_model(dims=dims, log=log)
            print(
                f"static model: {path} (cached in {static_cache_dir()}; use it with --model static"
                + (")" if dims == DEFAULT_STATIC_DIMS else f" only at the default dims; here --model model2vec:{path})")
            )
            return 0
        if out is None:
            out = str(
                static_cache_dir()
                / f"model2vec-{os.path.basename(str(source or 'all-MiniLM-L6-v2').rstrip('/'))}-{dims}d"
            )
        if is_static_model_dir(out) and not force:
            print(f"static model: {out} exists already (--force distils it again); use it with --model model2vec:{out}")
            return 0
        path = distill_static_model(source, out, dims=dims, log=log)
    except (OSError, ImportError) as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    print(f"static model: {path}; use it with --model model2vec:{path}")
    return 0


def cmd_sql(storage: str | None, sql: str) -> int:
    """Print each statement's result as a table (several statements: each under its own text)."""
    import duckdb

    from semdedup_assets.core.io.catalog import format_table, query_statements

    settings = load_settings(storage)
    if refuse_missing_storage(settings):
        return 1
    try:
        results, problems = query_statements(settings.storage_root(), sql)
    except duckdb.Error as err:
        print(f"semdedup: SQL error: {err}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"semdedup: warning: {problem}", file=sys.stderr)
    if not results:
        print("semdedup: error: no SQL statement given", file=sys.stderr)
        return 1
    blocks = [format_table(cols, rows) if cols else "ok" for _, cols, rows in results]
    if len(results) > 1:
        blocks = [f"> {text}\n{block}" for (text, _, _), block in zip(results, blocks)]
    print("\n\n".join(blocks))
    return 0


def cmd_groups(storage: str | None, eps: float | None, top: int, examples: int) -> int:
    """Print the `top` largest duplicate groups at `eps`, `examples` members each (and their texts, for text)."""
    from semdedup_assets.core.dedup.groups import group_counts, top_groups
    from semdedup_assets.core.dedup.keep import payload_texts
    from semdedup_assets.core.io.catalog import format_table
    from semdedup_assets.core.io.storage import format_eps

    settings = load_settings(storage)
    if refuse_missing_storage(settings):
        return 1
    if top < 1 or examples < 1:
        print("semdedup: error: --top and --examples must be at least 1", file=sys.stderr)
        return 2
    store = settings.storage_root()
    eps = min(settings.eps) if eps is None else eps
    configured = ", ".join(format_eps(e) for e in settings.eps)
    if not any(float(eps) == float(e) for e in settings.eps):
        print(
            f"semdedup: error: eps={format_eps(eps)} is not configured in {settings.storage} (configured: "
            f"{configured}); run again with it in --eps to get its groups",
            file=sys.stderr,
        )
        return 1
    if not store.groups_file(eps).exists():
        done = store.eps_curve_file.exists()
        print(
            f"semdedup: error: no duplicate groups at eps={format_eps(eps)} in {settings.storage}: "
            + ("its results predate the groups, `semdedup run` again" if done else "`semdedup run` first"),
            file=sys.stderr,
        )
        return 1
    count, members = group_counts(store, eps)
    largest = top_groups(store, eps, top, examples)
    print(f"eps={format_eps(eps)}: {count} group(s) of two or more items, {members} items in them")
    if not largest:
        return 0
    rows = [
        (rank, size, group_id, ", ".join(ids) + (", ..." if size > len(ids) else ""))
        for rank, (group_id, size, ids) in enumerate(largest, start=1)
    ]
    print(format_table(["#", "size", "group_id (kept)", "members"], rows, max_width=100))
    texts = payload_texts(store, sorted({i for _, _, ids in largest for i in ids}), settings.modality)
    if texts:
        for rank, (group_id, size, ids) in enumerate(largest, start=1):
            print(f"\n#{rank} {group_id} ({size} items)")
            for i in ids:
                text = printable(" ".join(texts.get(i, "").split()))  # one line per member
                print(f"  {i}: {text[:120] + ('…' if len(text) > 120 else '')}")
    return 0


def cmd_forget(storage: str | None, shard: str, verbose: bool = False) -> int:
    """Remove one shard's results; the buckets it touched and the keep-lists are recomputed."""
    from semdedup_assets.instance import open_instance
    from semdedup_assets.pipeline import PipelineError, forget_shard

    settings = load_settings(storage)
    if refuse_missing_storage(settings):
        return 1
    try:
        with _show_progress(settings):
            result = forget_shard(
                settings,
                open_instance(settings),
                shard,
                log=lambda m: print(m, flush=True),
                verbose=verbose,
                stop_on_signals=True,
            )
    except PipelineError as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    print(
        f"forgot shard {shard!r}: removed {len(result.removed)} file(s), re-ran {len(result.buckets)} bucket(s)"
        + (" and the keep-lists" if result.keep_lists else "")
    )
    return 0


def cmd_export(storage: str | None, select: str | None) -> int:
    """Write the deduplicated dataset for a selection and print what each shard kept."""
    from semdedup_assets import progress
    from semdedup_assets.core.io.catalog import refresh_catalog
    from semdedup_assets.core.io.storage import StageFileError
    from semdedup_assets.core.select.export import (
        ExportError,
        default_selection,
        export_shards,
        parse_selection,
        tidy_exports,
    )
    from semdedup_assets.core.select.prune import PruneError, compute_pruning

    settings = load_settings(storage)
    if refuse_missing_storage(settings):
        return 1
    if not settings.input:
        print(f"semdedup: error: no run recorded in {settings.storage}: `semdedup run` first", file=sys.stderr)
        return 1
    try:
        selection = parse_selection(select or settings.select or default_selection(settings.eps), settings.eps)
        if selection.pruning is not None:  # computed from the stored results (deterministic: same bytes again)
            pruned = compute_pruning(
                settings, selection.pruning, log=lambda m: print(f"[semdedup] {m}", file=sys.stderr)
            )
            refresh_catalog(settings.storage_root())
            print(
                f"{pruned.label}: {pruned.survivors} of {pruned.items} items survive, target {pruned.target}, "
                f"kept {pruned.kept}",
                file=sys.stderr,
            )
        total = len(settings.storage_root().stage_files("raw"))
        with _show_progress(settings), progress.task("export", total, unit="shards") as bar:
            done = export_shards(
                settings.storage_root(),
                settings.input,
                selection,
                configured_eps=settings.eps,
                log=lambda note: bar.update(1, note),
                reference=settings.reference,
                files_per_shard=settings.files_per_shard,
            )
        tidied = tidy_exports(
            settings.storage_root(), settings.input, selection, settings.eps, settings.files_per_shard
        )
    except (ExportError, PruneError, FileNotFoundError, StageFileError) as err:  # a damaged stage file: named
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    for d in done:
        print(f"{d.shard}: kept {d.kept}, removed {d.removed}" + ("" if d.rewritten else " (unchanged)"))
    if tidied.stale_files:
        print(
            f"{selection.label}: removed {len(tidied.stale_files)} file(s) the selection no longer implies "
            f"(e.g. {', '.join(tidied.stale_files[:3])})"
        )
    for label in tidied.unproducible:
        print(
            f"removed deduplicated/{label}/: the configured eps ({', '.join(map(str, settings.eps))}) "
            "can no longer produce it"
        )
    print(
        f"{selection.label}: kept {sum(d.kept for d in done)} of {sum(d.kept + d.removed for d in done)} items "
        f"in {len(done)} shard(s) under {settings.storage_root().stage_dir('deduplicated') / selection.label}"
    )
    return 0


def cmd_verify(storage: str | None, repair: bool, content: bool = False) -> int:
    """List damaged or inconsistent stage files (BAD) and stale ones (STALE); with repair, delete the damaged.

    Exit status 1 while anything is found, unless `repair` deleted every damaged file.
    """
    from semdedup_assets.core.checks.verify import STALE, verify_storage
    from semdedup_assets.core.checks.verify import repair as delete

    settings = load_settings(storage)
    if refuse_missing_storage(settings):
        return 1
    files = _input_files(settings)
    problems = verify_storage(settings.storage_root(), settings, _cache_keys(settings, files), files, content)
    stale = [p for p in problems if p.kind == STALE]
    damaged = [p for p in problems if p.kind != STALE]
    for problem in damaged:
        print(f"BAD {problem}")
    for problem in stale:
        print(f"STALE {problem}")
    if not problems:
        checked = " (and every input's content)" if content else ""
        print(f"every stage file under {settings.storage_root().root} is whole and consistent{checked}")
        return 0
    if stale:
        print(
            f"{len(stale)} stale file(s): their input or settings changed since; the next `semdedup run` "
            "redoes them (--repair leaves them)",
            file=sys.stderr,
        )
    if not repair:
        if damaged:
            print(
                f"{len(damaged)} bad file(s); `semdedup verify --repair` deletes them so the next run recomputes them",
                file=sys.stderr,
            )
        return 1
    removed = delete(damaged)
    print(f"deleted {len(removed)} file(s); `semdedup run` recomputes them")
    return 0


def _input_files(settings: Settings) -> dict:
    """The input shards by key ({} when the input is not reachable)."""
    from semdedup_assets.core.io.shards import discover_shards

    try:
        return {s.key: s for s in discover_shards(settings.input, settings.files_per_shard)} if settings.input else {}
    except (OSError, ValueError):
        return {}


def _cache_keys(settings: Settings, files: dict | None = None):
    """The embeddings cache key each shard should carry now (None when the input is not reachable)."""
    from semdedup_assets.core.embed.shard import embedding_cache_key
    from semdedup_assets.core.io import storage as st

    files = _input_files(settings) if files is None else files
    raw = settings.storage_root()

    def key_of(shard: str) -> str | None:
        path = raw.shard_file(st.RAW, shard)
        return embedding_cache_key(path, files[shard], settings) if shard in files and path.exists() else None

    return key_of


def comparison_report(storages: Sequence[str], eps: str | None, plot: str) -> str:
    """`semdedup compare`'s output: the configurations, the per-eps tables and the plot's path (written here)."""
    from semdedup_assets.core.dedup.keep import parse_eps_list
    from semdedup_assets.core.io.catalog import format_table
    from semdedup_assets.core.io.storage import folder_problem
    from semdedup_assets.core.plots import eps_curves_png
    from semdedup_assets.core.select.robustness import CompareError, compare_storages, expand_sweeps

    folder = os.path.dirname(os.path.abspath(plot))
    if (problem := folder_problem(folder, "--plot's folder")) is not None:
        raise CompareError(problem)  # before the work: a comparison of large storages takes a while
    r = compare_storages(expand_sweeps(storages), parse_eps_list(eps) if eps else None)
    os.makedirs(folder, exist_ok=True)  # `--plot cmp/out.png` with no cmp/ yet: made, as the storages are
    with open(plot, "wb") as f:
        f.write(eps_curves_png(r.curves))

    def fmt(name: str, v: object) -> object:  # eps as given; fractions to 4 places
        return "-" if v is None else round(v, 4) if isinstance(v, float) and name != "eps" else v

    lines = ["configurations:"] + [
        f"  {c.label}: {c.storage} (" + ", ".join(f"{k}={v}" for k, v in c.settings.items()) + ")"
        for c in r.configurations
    ]
    lines.append(f"items: {r.items}")
    cols = ["eps", "configuration", "removed", "kept_fraction"]
    lines.append(format_table(cols, [tuple(fmt(c, row[c]) for c in cols) for row in r.per_configuration]))
    if r.pairs:
        cols = list(r.pairs[0])
        lines += ["", format_table(cols, [tuple(fmt(c, row[c]) for c in cols) for row in r.pairs])]
    lines.append(f"plot: {os.path.abspath(plot)}")
    return "\n".join(lines)


def cmd_compare(storages: Sequence[str], eps: str | None, plot: str) -> int:
    """Print the comparison of finished storages and write the eps-curves PNG."""
    from semdedup_assets.core.select.robustness import CompareError

    try:
        print(comparison_report(storages, eps, plot))
    except (CompareError, OSError) as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    return 0


def args_text(values: Sequence[object], none: str = "default") -> str:
    """A sweep dimension as one line, e.g. `50,155,500`; None (not swept, or k=auto) as `none`."""
    return ",".join(none if v is None else str(v) for v in values)


def _sweep_values(text: str, name: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise ValueError(f"--{name} has an empty entry: {text!r}")
    return values


def cmd_sweep(args: argparse.Namespace) -> int:
    """One run per (encoder, k) in sub-storages sharing each encoder's embeddings, then the comparison."""
    from semdedup_assets.core.config import coerce
    from semdedup_assets.core.io.shards import ShardError
    from semdedup_assets.core.io.storage import StoreError
    from semdedup_assets.core.select.robustness import CompareError, run_sweep
    from semdedup_assets.instance import open_instance
    from semdedup_assets.pipeline import PipelineError, check_run_locations, execute_job, run_pipeline

    clusters = [coerce("clusters", v) for v in _sweep_values(args.clusters, "clusters")]
    models: list[str | None] = _sweep_values(args.model, "model") if args.model else [None]
    seeds: list[int | None] = [coerce("seed", v) for v in _sweep_values(args.seed, "seed")] if args.seed else [None]
    args.clusters = args.model = args.seed = None
    base = _settings_from_args(args)
    root = base.storage
    own_home = os.environ.get("DAGSTER_HOME")  # given by the user: every sub-storage's runs go there
    print(f"[semdedup] settings: {describe_settings(base)}", flush=True)
    print(
        f"[semdedup] sweep: clusters={args_text(clusters, 'auto')} models={args_text(models)} seeds={args_text(seeds)}",
        flush=True,
    )

    def run(settings: Settings) -> None:
        if own_home is None:  # each sub-storage its own instance, as `semdedup run --storage SUB` would use
            os.environ.pop("DAGSTER_HOME", None)
        with _show_progress(settings):
            run_pipeline(
                settings,
                open_instance(settings),
                log=lambda m: print(m, flush=True),
                verbose=args.verbose,
                stop_on_signals=True,
            )
        print(summary(settings), flush=True)

    try:
        check_run_locations(base)  # the root's: before any sub-storage (or its dagster_home) is made
        result = run_sweep(base, root, clusters, models, run, log=lambda m: print(m, flush=True), seeds=seeds)
        first = load_settings(result.storages[0])
        if own_home is None:
            os.environ.pop("DAGSTER_HOME", None)
        from semdedup_assets.definitions import build_definitions

        # The `robustness` asset of the first sub-storage, so the UI on it shows the comparison.
        execute_job(
            build_definitions(first),
            open_instance(first),
            "robustness_job",
            {"semdedup/sweep": root},
            first.storage,
            verbose=args.verbose,
        )
        local_root = Settings(storage=root).storage_root()
        plot = args.plot or (
            os.path.join(str(local_root.root), "compare.png") if local_root.local else "semdedup-compare.png"
        )
        print(comparison_report(result.storages, None, plot))
    except (PipelineError, ShardError, StoreError, CompareError, FileNotFoundError, ValueError) as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `semdedup` console script.

    A reader that closes the pipe early (`semdedup status | head -1`) ends the command quietly,
    with status 1 and no traceback, whatever the command was printing. A command points DAGSTER_HOME
    at its storage's run history (instance.open_instance); an in-process caller (a notebook, a test)
    gets its own value back afterwards, so a later command on another storage never shares that history.
    """
    home = os.environ.get("DAGSTER_HOME")
    try:
        code = run_command(build_parser().parse_args(argv))
        sys.stdout.flush()  # inside the guard: a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        silence_stdout()
        return 1
    finally:
        if home is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = home


def silence_stdout() -> None:
    """Point stdout at /dev/null: Python's final flush would otherwise report the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture): nothing to flush there
        pass


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a user error is one `semdedup: error: ...` line on stderr and status 1 or 2."""
    from semdedup_assets.core.io.storage import StoreError

    try:
        if args.command == "run":
            return cmd_run(_settings_from_args(args), args.verbose)
        if args.command == "demo":
            return cmd_demo(args.storage, args.verbose, args.model)
        if args.command == "sql":
            return cmd_sql(args.storage, args.query)
        if args.command == "groups":
            return cmd_groups(args.storage, args.eps, args.top, args.examples)
        if args.command == "status":
            from semdedup_assets.status import cmd_status

            return cmd_status(args.storage, as_json=args.json)
        if args.command == "export":
            return cmd_export(args.storage, args.select)
        if args.command == "verify":
            return cmd_verify(args.storage, args.repair, args.content)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "compare":
            return cmd_compare(args.storages, args.eps, args.plot)
        if args.command == "distill":
            return cmd_distill(args.source, args.dims, args.out, args.force)
        if args.command == "forget":
            return cmd_forget(args.storage, args.shard, args.verbose)
        build_parser().print_help(sys.stderr)  # no command (or one without a branch here): never a default
        return 2
    except ValueError as err:  # bad settings
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 2
    except StoreError as err:  # a missing bucket, refused credentials, an unreachable endpoint
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # main() ends quietly on it
    except OSError as err:  # a path the user named that cannot be used (not a folder, no permission, full disk)
        print(f"semdedup: error: {printable(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
