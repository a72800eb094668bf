"""A tiny BERT (random weights, a small WordPiece vocabulary) written to a folder: a model to distil in tests.

Nothing is downloaded: the vocabulary is built from a few words and every single letter, so that
any lowercase English text tokenises, and the weights come from a seeded BertModel.
"""

from __future__ import annotations

import string
from pathlib import Path

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "this",
    "be",
    "are",
    "from",
    "or",
    "at",
    "an",
    "not",
    "which",
    "method",
    "return",
    "returns",
    "value",
    "values",
    "object",
    "objects",
    "file",
    "files",
    "list",
    "string",
    "data",
    "new",
    "set",
    "get",
    "name",
    "type",
    "error",
    "number",
    "first",
    "last",
    "true",
    "false",
    "default",
    "class",
    "function",
    "module",
    "python",
    "text",
    "line",
    "lines",
    "item",
    "items",
    "key",
    "keys",
    "copy",
    "read",
    "write",
    "open",
    "close",
    "time",
    "call",
    "called",
    "user",
    "code",
    "test",
    "tests",
]


def write_tiny_bert(folder: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """Write a 1-layer BERT (hidden width `hidden`) and its fast tokenizer to `folder`; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *("##" + c for c in letters)]
    ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    # The pieces of BERT's own tokenizer.json, built directly (a vocab.txt alone is not enough for
    # transformers 5's tokenizer classes).
    backend = Tokenizer(WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder
