"""Obtaining the pipeline's tokenizer: train a byte-level BPE, build GPT-2's, or load a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.sources import normalize, read_documents, resolve_paths
from megadiff import MegadiffError
from megadiff.data.tokenizer import SPECIAL_TOKENS, gpt2_tokenizer, load_tokenizer, special_ids, to_bytes

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sample_texts(data_cfg: Any) -> Iterator[str]:
    """Normalized, length-filtered documents of all sources in config order, up to sample_bytes."""
    budget = data_cfg.tokenizer.sample_bytes
    for src in data_cfg.sources:
        for path in resolve_paths(list(src.paths)):
            for raw in read_documents(path, src.format, src.text_field, src.doc_split):
                text = normalize(raw)
                if not data_cfg.min_chars <= len(text) <= data_cfg.max_chars:
                    continue
                b = len(text.encode("utf-8"))
                if b > budget:
                    text = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
                yield text
                budget -= min(b, budget)
                if budget <= 0:
                    return


def train_bpe(data_cfg: Any) -> Any:
    """Byte-level BPE with [MASK] [PAD] [EOS] [BOS] as ids 0-3 (deterministic for fixed inputs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab = data_cfg.tokenizer.vocab_size
    if vocab < 256 + len(SPECIAL_TOKENS) + 1:
        raise MegadiffError(f"data.tokenizer.vocab_size={vocab} is too small; a byte-level BPE needs > 260")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample_texts(data_cfg), trainer)
    tok.encode_special_tokens = True
    return tok


def build_tokenizer(data_cfg: Any) -> Any:
    kind = data_cfg.tokenizer.kind
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "file":
        if not data_cfg.tokenizer.path:
            raise MegadiffError("data.tokenizer.kind=file needs data.tokenizer.path=<tokenizer.json>")
        return load_tokenizer(data_cfg.tokenizer.path)
    if data_cfg.tokenizer.path and Path(data_cfg.tokenizer.path).is_file():
        return load_tokenizer(data_cfg.tokenizer.path)  # a trained one, named in the recipe
    return train_bpe(data_cfg)


def tokenizer_payload(tok: Any, where: str = "tokenizer") -> tuple[bytes, dict[str, int]]:
    """The tokenizer.json bytes (what gets hashed and copied) and its special ids."""
    return to_bytes(tok), special_ids(tok, where)
