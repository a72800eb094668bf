"""Encoders turning items of one modality into unit-norm embeddings, looked up by modality name."""

# Registers the "text" modality; cheap, since text.py imports torch/transformers lazily.
from . import text as text
from .base import Encoder, batch_invariant, l2_normalize, resolve_device, row_norms
from .dispatch import encoder_for
from .registry import available_modalities, create_encoder, register_encoder

__all__ = [
    "Encoder",
    "available_modalities",
    "batch_invariant",
    "create_encoder",
    "encoder_for",
    "l2_normalize",
    "register_encoder",
    "resolve_device",
    "row_norms",
]
