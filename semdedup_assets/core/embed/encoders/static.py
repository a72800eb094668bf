"""Static text embeddings (model2vec): a token-vector lookup and a mean, distilled offline from a transformer.

A static model stores one vector per token of its vocabulary (the transformer's output for
that token alone, PCA-reduced and Zipf/SIF-weighted, see model2vec's distillation). Embedding
a text is then tokenise + sum of rows + normalise, with no forward pass: two orders of
magnitude cheaper than the transformer on a CPU, at some cost in quality (the similarities of
unrelated texts sit higher, so eps has to be chosen for the model: docs/choosing-eps.md).

Three ways to name one (`--model`):
- `model2vec:PATH_OR_NAME`: a static model folder (or a hub name already in the local cache);
- a local folder that holds a static model is detected by its config (`model_type: model2vec`);
- `static`: the default static model of this machine, distilled once from the shipped
  all-MiniLM-L6-v2 into the cache folder (`semdedup distill` builds it ahead of time).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from semdedup_assets.core.io.storage import folder_problem
from semdedup_assets.core.messages import printable

from .base import l2_normalize, missing_model_folder
from .registry import register_encoder

__all__ = [
    "DEFAULT_STATIC_DIMS",
    "STATIC_DEFAULT",
    "STATIC_PREFIX",
    "NotAStaticModelError",
    "StaticTextEncoder",
    "default_static_model",
    "distill_static_model",
    "is_static_model_dir",
    "static_cache_dir",
    "wants_static",
]

STATIC_PREFIX = "model2vec:"
STATIC_DEFAULT = "static"  # --model static: this machine's cached distillation of the default model
DEFAULT_STATIC_DIMS = 256
# Static vectors are position-free, so long texts cost only their tokens; texts are cut to this many
# characters per token of max_length before tokenising, so that a megabyte-long text costs no more
# than a long paragraph (WordPiece tokens of English prose average ~4-5 characters).
CHARS_PER_TOKEN_CAP = 16
# A static batch is a lookup and a sum: batches far larger than a transformer's amortise the
# per-call cost of the tokenizer (which tokenises a batch on all cores).
MIN_STATIC_BATCH = 1024
MARKER = "semdedup_distill.json"  # written by distill_static_model beside the model files


class NotAStaticModelError(ValueError):
    """`--model model2vec:PATH` names something that is not a model2vec static model."""


def is_static_model_dir(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a folder holding a model2vec static model (model2vec or sentence-transformers layout)."""
    folder = Path(os.path.expanduser(os.fspath(path)))
    if (folder / "0_StaticEmbedding" / "model.safetensors").is_file():
        return True
    config = folder / "config.json"
    if not (config.is_file() and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "model2vec"
    except (OSError, ValueError):
        return False


def _not_static_reason(folder: Path) -> str:
    """Why a folder is not a static model, for the error message."""
    if not folder.exists():
        return "no such folder"
    if not folder.is_dir():
        return "not a folder"
    config = folder / "config.json"
    if config.is_file():
        try:
            kind = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as err:
            return f"its config.json does not parse ({err})"
        if kind != "model2vec":
            return f"its config.json says model_type {kind!r}, not 'model2vec' (a transformer, not a static model)"
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    return f"missing {', '.join(missing)}" if missing else "not a model2vec layout"


def wants_static(model: str | None) -> bool:
    """True when a `--model` value asks for a static (model2vec) encoder."""
    if not model:
        return False
    if model.startswith(STATIC_PREFIX) or model.strip().lower() == STATIC_DEFAULT:
        return True
    return os.path.isdir(os.path.expanduser(model)) and is_static_model_dir(model)


def static_cache_dir() -> Path:
    """Where `--model static` lives on this machine: $SEMDEDUP_CACHE, else $XDG_CACHE_HOME/semdedup, else ~/.cache/semdedup."""
    from semdedup_assets.core.config import model_cache_dir

    return Path(model_cache_dir())


def _default_static_path(cache_dir: Path, dims: int) -> Path:
    return cache_dir / f"model2vec-all-MiniLM-L6-v2-{dims}d"


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive file lock: two processes asking for the same distillation wait for one another."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def distill_static_model(
    source: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    dims: int = DEFAULT_STATIC_DIMS,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Distil a model2vec static model from a local Hugging Face encoder into `out` (atomically); return `out`.

    `source` is a local folder or hub name (None: the shipped all-MiniLM-L6-v2). The model's own
    tokenizer vocabulary is kept; every token is embedded by one forward pass (model2vec shows a
    progress bar), PCA reduces the vectors to `dims` (capped at the model's width), SIF weights by
    Zipf rank, stored as float32. The folder appears whole or not at all.
    """
    from .text import resolve_text_model

    if not isinstance(dims, int) or dims < 1:
        raise ValueError(f"dims must be a positive int, got {dims!r}")
    # Before the minutes of distillation: an output that cannot be a folder is refused now, not at the write.
    if (problem := folder_problem(os.path.expanduser(os.fspath(out)), "the output")) is not None:
        raise NotADirectoryError(problem)
    if (problem := missing_model_folder(source, "the source model folder")) is not None:  # a path, not a hub name
        raise FileNotFoundError(problem)
    try:
        from model2vec.distill import distill_from_model
    except ImportError as err:
        raise ImportError(
            f"distilling a static model needs model2vec and skeletoken ({err}): pip install 'semdedup-assets[static]'"
        ) from err
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_text_model(source)
    local = os.path.isdir(path)
    out = Path(os.path.expanduser(os.fspath(out)))
    say = log or (lambda m: None)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local, use_fast=True)
        model = AutoModel.from_pretrained(path, local_files_only=local).to(torch.float32).eval()
    except OSError as err:  # transformers' own message spans lines and speaks of the network
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(
            f"cannot load the source model {printable(path)}: not a local encoder folder, nor a hub "
            f"name in this machine's cache ({printable(first)})"
        ) from None
    width = int(getattr(model.config, "hidden_size", dims))
    pca = min(dims, width)
    say(f"distilling {path} ({len(tokenizer)} tokens, {width}-d) to a {pca}-d static model at {out}")
    static = distill_from_model(model=model, tokenizer=tokenizer, device="cpu", pca_dims=pca, quantize_to="float32")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        static.save_pretrained(tmp)
        import model2vec

        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "source": os.fspath(source) if source is not None else "all-MiniLM-L6-v2",
                    "source_path": path,
                    "dims": int(static.dim),
                    "model2vec": model2vec.__version__,
                    "seconds": round(time.perf_counter() - start, 1),
                },
                indent=2,
                sort_keys=True,
            )
        )
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"distilled in {time.perf_counter() - start:.1f} s: {out}")
    return out


def default_static_model(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dims: int = DEFAULT_STATIC_DIMS,
    source: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """This machine's static model for `--model static`, distilled from all-MiniLM-L6-v2 on first use.

    `source` replaces the shipped MiniLM (tests pass a tiny model). The distillation runs once per
    cache folder: concurrent callers wait on a file lock and then load what the first one wrote.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else static_cache_dir()
    target = _default_static_path(cache, dims)
    if is_static_model_dir(target):
        return target
    say = log or (lambda m: print(f"[semdedup] {m}", file=sys.stderr, flush=True))
    with _locked(cache / f".{target.name}.lock"):
        if not is_static_model_dir(target):  # another process may have finished it while we waited
            say(
                f"--model static: no cached static model yet; distilling it once for this machine into {target} "
                "(seconds on idle cores, minutes on busy ones; `semdedup distill` does it ahead of time)"
            )
            distill_static_model(source, target, dims=dims, log=say)
    return target


def resolve_static_model(model: str | os.PathLike[str], log: Callable[[str], None] | None = None) -> str:
    """A `--model` value (model2vec:X, static, or a static folder) -> what StaticModel.from_pretrained loads."""
    raw = os.fspath(model).strip()
    if raw.lower() == STATIC_DEFAULT:
        return str(default_static_model(log=log))
    name = raw[len(STATIC_PREFIX) :] if raw.startswith(STATIC_PREFIX) else raw
    if not name:
        raise ValueError("--model model2vec: needs a folder or a model name after the colon")
    expanded = os.path.expanduser(name)
    # ORG/NAME is a hub name; anything else with a slash, or that exists, is a folder.
    looks_like_path = name.startswith((".", "/", "~")) or (name.count("/") != 1 and "/" in name)
    if os.path.exists(expanded) or looks_like_path:
        folder = Path(expanded)
        if not is_static_model_dir(folder):
            raise NotAStaticModelError(
                f"{name} is not a model2vec static model: {_not_static_reason(folder)}; build one with "
                f"`semdedup distill --from {name} --out DIR` and pass --model model2vec:DIR"
            )
        return str(folder)
    return name  # a hub name: model2vec finds it in the local Hugging Face cache (offline) or fetches it


@register_encoder("model2vec")
class StaticTextEncoder:
    """Embeds strings with a model2vec static model: sum of token vectors, L2-normalised, float32, input order.

    Deterministic: the tokenizer's output does not depend on threads, and the per-text sum
    (torch's embedding_bag on CPU) adds each text's rows in token order, whatever the thread count.
    """

    # Tokenised text by text, each bag summed on its own (embedding_bag), each row normalised
    # on its own: an item's bits do not depend on its batch (test_exact_copies checks it).
    batch_invariant = True

    modality: str = "text"
    name: str
    dim: int

    def __init__(
        self,
        model: str | os.PathLike[str] = STATIC_DEFAULT,
        *,
        max_length: int = 256,
        batch_size: int = MIN_STATIC_BATCH,
        device: str = "cpu",
    ) -> None:
        """Load the static model named by `model` (see the module docstring); `device` "auto" means the CPU."""
        import torch

        from .base import resolve_device

        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        try:
            from model2vec import StaticModel
        except ImportError as err:
            raise ImportError("static text models need model2vec: pip install 'semdedup-assets[static]'") from err
        self.model_path = resolve_static_model(model)
        self.name = os.fspath(model)
        try:
            static = StaticModel.from_pretrained(self.model_path, force_download=False)
        except (OSError, ValueError) as err:
            raise NotAStaticModelError(
                f"cannot load the static model {self.name!r} from {self.model_path}: {err}"
            ) from err
        # A lookup is cheaper than moving the batch to a GPU and back: the CPU unless asked otherwise.
        self.device = torch.device("cpu") if str(device).strip().lower() == "auto" else resolve_device(device)
        self.tokenizer = static.tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.enable_truncation(max_length)
        self.unk_token_id: int | None = static.unk_token_id
        vectors = np.asarray(static.embedding, dtype=np.float32)
        if static.token_mapping is not None:  # vocabulary quantization: token id -> shared row
            self._mapping = torch.as_tensor(np.asarray(static.token_mapping, dtype=np.int64))
        else:
            self._mapping = None
        self._weights = (
            None
            if static.weights is None
            else torch.as_tensor(np.asarray(static.weights, dtype=np.float32), device=self.device)
        )
        self._vectors = torch.from_numpy(vectors).to(self.device)
        self.dim = int(vectors.shape[1])
        self.max_length = max_length
        self.batch_size = max(batch_size, MIN_STATIC_BATCH)

    def __repr__(self) -> str:
        """Short description for logs."""
        return (
            f"StaticTextEncoder(name={self.name!r}, dim={self.dim}, max_length={self.max_length}, "
            f"batch_size={self.batch_size}, device='{self.device}')"
        )

    def _ids(self, texts: Sequence[str], offset: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids of the texts one after another, tokens per text): no special tokens, unknown tokens
        dropped as model2vec does; a text with no known token is the unknown token alone.

        Flat numpy arrays rather than a list per text: filtering and flattening token by token in
        Python cost about a tenth of a static model's encoding (the tokenizer is most of the rest).
        """
        cap = self.max_length * CHARS_PER_TOKEN_CAP
        encodings = self.tokenizer.encode_batch_fast([t[:cap] for t in texts], add_special_tokens=False)
        lists = [enc.ids for enc in encodings]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
        unk = self.unk_token_id
        if unk is not None:
            known = flat != unk
            lengths = np.bincount(np.repeat(np.arange(len(lists)), lengths)[known], minlength=len(lists))
            flat = flat[known]
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            # Nothing known in the text (empty, or only unknown characters): its vector is the
            # unknown token's, so such texts group together instead of failing the shard.
            if unk is None:
                raise ValueError(f"item {offset + int(empty[0])} tokenises to zero tokens; cannot embed it")
            starts = np.cumsum(lengths) - lengths
            flat = np.insert(flat, starts[empty], unk)
            lengths[empty] = 1
        return flat, lengths

    def encode(self, items: Sequence[str]) -> np.ndarray:
        """Embed `items` into an (n, dim) float32 array of unit rows, in input order."""
        import torch

        from .text import as_texts

        texts = as_texts(items)
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                ids, lengths = self._ids(texts[start : start + self.batch_size], start)
                flat = torch.as_tensor(ids)
                offsets = torch.as_tensor(np.concatenate(([0], np.cumsum(lengths)[:-1])))
                weights = None if self._weights is None else self._weights[flat]
                rows = flat if self._mapping is None else self._mapping[flat]
                summed = torch.nn.functional.embedding_bag(
                    rows.to(self.device), self._vectors, offsets.to(self.device), mode="sum", per_sample_weights=weights
                )
                out[start : start + len(lengths)] = summed.cpu().numpy()
        # The sum and the mean point the same way; the norm makes them equal.
        return l2_normalize(out)
