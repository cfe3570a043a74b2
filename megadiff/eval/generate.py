"""Batched generation around a sampler: prompts in, JSONL records out.

    records = generate(model_fn, tokenizer, prompts, gen_length=128, sampler="ancestral",
                       sampler_kwargs={"steps": 128}, batch_size=8, seed=0, out_path="samples.jsonl")
    # each record: {"prompt", "sample", "steps", "nfe", "seconds"}

``model_fn(tokens[B, L]) -> logits[B, L, V]`` and a Hugging Face ``tokenizers.Tokenizer``.
Prompts are grouped by token length (so a batch shares one canvas layout: prompt, then
``gen_length`` masks); ``nfe`` is the number of network evaluations of that sequence and
``seconds`` the wall time of its batch. Works on CPU and GPU (``device``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm import tqdm

from megadiff.diffusion.samplers import SAMPLERS, make_canvas


def _mask_id(tokenizer: Any, mask_id: Optional[int]) -> int:
    if mask_id is not None:
        return int(mask_id)
    mid = tokenizer.token_to_id("[MASK]")
    if mid is None:
        raise ValueError("tokenizer has no [MASK] token; pass mask_id=")
    return int(mid)


def generate(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Any,
    prompts: Sequence[str],
    gen_length: int,
    sampler: str = "ancestral",
    sampler_kwargs: Optional[dict] = None,
    batch_size: int = 8,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    mask_id: Optional[int] = None,
    device: str | torch.device = "cpu",
    out_path: Optional[str | Path] = None,
    progress: bool = True,
) -> list[dict]:
    """Generate one sample per prompt (``""`` = unconditional); returns records in prompt order.

    vocab_size: real vocab incl. [MASK] (default ``tokenizer.get_vocab_size()``). If ``out_path`` is
    given, the records are also written there as JSONL (one per line).
    """
    fn = SAMPLERS.get(sampler)
    kw = dict(sampler_kwargs or {})
    mid = _mask_id(tokenizer, mask_id)
    V = int(vocab_size or tokenizer.get_vocab_size())
    encoded = [tokenizer.encode(p).ids if p else [] for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    batches = [idx[j : j + batch_size] for _, idx in sorted(groups.items()) for j in range(0, len(idx), batch_size)]
    gen = torch.Generator(device=device).manual_seed(seed)
    records: list[Optional[dict]] = [None] * len(prompts)
    for idx in tqdm(batches, desc=f"sampling ({sampler})", disable=not progress, unit="batch"):
        P = len(encoded[idx[0]])
        prompt = torch.tensor([encoded[i] for i in idx], dtype=torch.int64, device=device).view(len(idx), P)
        x = make_canvas(prompt, gen_length, mid)
        t0 = time.perf_counter()
        out = fn(model_fn, x, mask_id=mid, vocab_size=V, generator=gen, **kw)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        for r, i in enumerate(idx):
            ids = out.tokens[r, P:].tolist()
            records[i] = {
                "prompt": prompts[i],
                "sample": tokenizer.decode(ids),
                "steps": int(out.steps),
                "nfe": int(out.nfe_rows[r]),
                "seconds": round(dt, 4),
            }
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return records  # type: ignore[return-value]
