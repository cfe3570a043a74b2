"""Tokenizers: load the one a dataset was built with, or build GPT-2's from set-up-time assets.

Nothing is fetched from a hub at run time. GPT-2's BPE ranks come from ``assets/gpt2/gpt2.tiktoken``
(installed by ``tools/setup_assets.sh`` from the openai-whisper sdist, MIT); ``$MEGADIFF_ASSETS``
points elsewhere. Self-trained tokenizers reserve ``[MASK] [PAD] [EOS] [BOS]`` as ids 0-3.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from megadiff import MegadiffError

SPECIAL_TOKENS = ("[MASK]", "[PAD]", "[EOS]", "[BOS]")
GPT2_EOT = "<|endoftext|>"
# names each special role goes by in common tokenizers, first match wins: megadiff/BERT style, GPT-2/Qwen,
# Llama 1/2 and Mistral (<s> </s>), Llama 3 (<|begin_of_text|> <|end_of_text|>), LLaDA's mask token
_ALIASES = {"mask": ("[MASK]", "<|mdm_mask|>", "<mask>"), "pad": ("[PAD]", "<pad>"),
            "eos": ("[EOS]", GPT2_EOT, "</s>", "<|end_of_text|>"),
            "bos": ("[BOS]", "<s>", "<|begin_of_text|>", GPT2_EOT)}


def assets_dir() -> Path:
    env = os.environ.get("MEGADIFF_ASSETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "assets"


def tokenizer_file_name(data: bytes) -> str:
    """Hash-versioned file name: ``tokenizer-<first 8 hex of sha256>.json``."""
    return f"tokenizer-{hashlib.sha256(data).hexdigest()[:8]}.json"


def to_bytes(tok: Any) -> bytes:
    return tok.to_str(pretty=False).encode("utf-8")


def load_tokenizer(path: str | os.PathLike) -> Any:
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise MegadiffError(f"tokenizer file {p} not found; train one with `megadiff data train-tokenizer CONFIG`")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:
        raise MegadiffError(f"{p} is not a Hugging Face tokenizer.json ({e})") from None
    tok.encode_special_tokens = True  # text that spells "[MASK]" is text, not the mask token
    return tok


def special_ids(tok: Any, where: str = "tokenizer") -> dict[str, int]:
    """ids of mask, pad, eos, bos; a tokenizer without [MASK] and an EOS cannot be used."""
    out = {}
    for role in ("mask", "eos", "pad", "bos"):  # eos before pad: a tokenizer without a pad token pads with EOS
        names = _ALIASES[role]
        ids = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
        if not ids:
            if role == "pad" and "eos" in out:
                out[role] = out["eos"]
                continue
            raise MegadiffError(
                f"{where} has no {' or '.join(names)} token; add it as a special token, or use "
                f"data.tokenizer.kind=bpe (trains one with {', '.join(SPECIAL_TOKENS)}) or kind=gpt2"
            )
        out[role] = ids[0]
    return {role: out[role] for role in _ALIASES}


def gpt2_tokenizer(tiktoken_path: str | os.PathLike | None = None) -> Any:
    """GPT-2's byte-level BPE (ids 0..50256 as in GPT-2) plus ``[MASK]`` = 50257 and ``[PAD]`` = 50258.

    Built from tiktoken ranks: merges are recovered by splitting every token into two tokens
    of lower rank (the standard tiktoken -> tokenizers conversion).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    p = Path(tiktoken_path) if tiktoken_path else assets_dir() / "gpt2" / "gpt2.tiktoken"
    if not p.is_file():
        raise MegadiffError(
            f"GPT-2 BPE ranks {p} not found; run `bash tools/setup_assets.sh .venv/bin/python` once (set-up time), "
            f"or use data.tokenizer.kind=bpe"
        )
    ranks: dict[bytes, int] = {}
    for line in p.read_text().splitlines():
        if line:
            tok_b64, rank = line.split()
            ranks[base64.b64decode(tok_b64)] = int(rank)
    byte_enc = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(byte_enc[c] for c in b)

    vocab = {s(b): r for b, r in ranks.items()}
    merges = []
    for b, r in ranks.items():
        if len(b) == 1:
            continue
        local = [(b[:i], b[i:], r) for i in range(1, len(b)) if b[:i] in ranks and b[i:] in ranks]
        local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: x[2])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(s(a), s(b)) for a, b, _ in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert len(vocab) == 50256, f"{p}: expected 50256 ranks, got {len(vocab)}"
    tok.add_special_tokens([AddedToken(GPT2_EOT, special=True), AddedToken("[MASK]", special=True),
                            AddedToken("[PAD]", special=True)])
    tok.encode_special_tokens = True
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def load_from_dir(path: str | os.PathLike) -> tuple[Any, Any]:
    """(tokenizer, ManifestInfo) of a dataset directory; checks the tokenizer copy's sha256."""
    from megadiff.data.format import manifest_info, read_manifest
    from megadiff.utils.io import sha256_file

    m = read_manifest(path)
    info = manifest_info(m, path)
    if not Path(info.tokenizer_path).is_file():
        raise MegadiffError(f"{info.tokenizer_path} (named by {Path(path) / 'manifest.json'}) is missing; "
                            f"re-run `megadiff data tokenize` with the same config")
    if sha256_file(info.tokenizer_path) != info.tokenizer_sha256:
        raise MegadiffError(f"{info.tokenizer_path}: sha256 differs from the manifest's; the tokenizer copy was "
                            f"changed; re-run `megadiff data tokenize` with the same config")
    return load_tokenizer(info.tokenizer_path), info


def toy_tokenizer(vocab_size: int = 64) -> Any:
    """A word-level tokenizer ``[MASK] [PAD] [EOS] [BOS] t4 t5 ...`` for tests and tools (no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok
