"""Zero-shot likelihood of a checkpoint on held-out shard sets and raw text files.

    im = load_for_inference("runs/demo/train")
    sets = [shard_set(im, "runs/data/wiki", "valid", max_seqs=128), text_set(im, "notes.txt")]
    res = evaluate_sets(im, sets, n_t=8, batch_size=8)   # one dict per set

Diffusion objectives (``mdlm``, ``llada``): the continuous-time NELBO in nats/token from
``evaluate_nelbo`` (an upper bound on the NLL; ``ppl_bound`` = exp(nelbo)), with ``n_t`` time points
per sequence, antithetic by default (unbiased) or the midpoint grid, and the run's noise schedule.
``ar``: the exact next-token NLL (``nll``, ``ppl``) over positions 1..L-1 of every window.

Everything is a pure function of (checkpoint, data, n_t, t_mode, seed, number of sequences): the
sequences of a shard set are a seeded permutation's first ``max_seqs``, and a text file is tokenized
with the run's tokenizer, EOS-terminated and cut into consecutive windows of the run's seq_len.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadiff import MegadiffError


@dataclass
class EvalSet:
    name: str  # e.g. "shakespeare-64:valid" or "notes.txt"
    kind: str  # "shards" | "text"
    source: str  # the path given
    seqs: np.ndarray  # [N, L] int64 token windows
    extra: dict[str, Any] = field(default_factory=dict)


def model_seq_len(im: Any) -> int:
    """Window length used for raw text: the run's training seq_len (its data), capped by the model's."""
    return int(min(im.info.seq_len, im.cfg.model.max_seq_len))


def parse_data_arg(arg: str) -> tuple[str, str]:
    """``DIR[:split]`` -> (DIR, split); the split defaults to ``valid``."""
    if ":" in arg and not Path(arg).exists():
        path, split = arg.rsplit(":", 1)
        if split and "/" not in split:
            return path, split
    return arg, "valid"


def shard_set(im: Any, path: str, split: str = "valid", max_seqs: int = 0, seed: int = 0) -> EvalSet:
    """The first ``max_seqs`` (0 = all) samples of a seeded permutation of a manifest split."""
    from megadiff.data.format import check_compat
    from megadiff.data.loader import ShardDataset

    if not (Path(path) / "manifest.json").is_file():
        raise MegadiffError(f"--data {path}: no manifest.json there; pass a directory made by `megadiff data tokenize`")
    ds = ShardDataset(path, split)
    check_compat(ds.info, vocab_size=im.info.vocab_size, mask_id=im.info.mask_id,
                 tokenizer_sha256=im.info.tokenizer_sha256)
    if ds.seq_len > im.cfg.model.max_seq_len:
        raise MegadiffError(f"--data {path}: its samples have {ds.seq_len} tokens but the model was built for at most "
                            f"model.max_seq_len={im.cfg.model.max_seq_len}; tokenize the held-out text with "
                            f"data.seq_len <= {im.cfg.model.max_seq_len}")
    n = len(ds)
    if n == 0:
        raise MegadiffError(f"--data {path}: split {split!r} is empty; pick another split with {path}:SPLIT "
                            f"(splits: {', '.join(ds.manifest['splits'])})")
    order = np.random.default_rng(seed).permutation(n)
    take = order[: max_seqs] if max_seqs and max_seqs < n else order
    seqs = ds.get_batch(np.sort(take))
    name = f"{Path(path).resolve().name}:{split}"
    return EvalSet(name, "shards", str(path), seqs, {"split": split, "available_sequences": n})


def text_set(im: Any, path: str, max_seqs: int = 0, seq_len: int | None = None) -> EvalSet:
    """A UTF-8 text file tokenized with the run's tokenizer, EOS-terminated, cut into seq_len windows."""
    p = Path(path)
    if not p.is_file():
        raise MegadiffError(f"--text {p}: no such file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MegadiffError(f"--text {p}: not UTF-8 text ({e}); pass a plain text file (for pre-tokenized data use "
                            f"`megadiff data tokenize` and --data)") from None
    L = seq_len or model_seq_len(im)
    tok = im.tokenizer
    if tok.get_vocab_size() > im.info.vocab_size:
        raise MegadiffError(f"--text {p}: the tokenizer ({im.info.tokenizer_path}) has {tok.get_vocab_size()} tokens but "
                            f"the model's vocab is {im.info.vocab_size}; the run's data directory no longer matches "
                            f"the checkpoint (re-point it with --data-dir)")
    ids = np.asarray(tok.encode(text).ids + [im.info.eos_id], dtype=np.int64)
    if ids.size and (int(ids.max()) >= im.info.vocab_size or bool((ids == im.info.mask_id).any())):
        raise MegadiffError(f"--text {p}: tokenized to ids outside the model's vocab {im.info.vocab_size} (or to "
                            f"[MASK]); the tokenizer does not match the model")
    n = n_full = ids.size // L
    if n == 0:
        raise MegadiffError(f"--text {p}: only {ids.size} tokens, fewer than one window of seq_len={L}; "
                            f"give a longer file")
    if max_seqs:
        n = min(n, max_seqs)
    seqs = ids[: n * L].reshape(n, L)
    return EvalSet(p.name, "text", str(p), seqs, {"file_tokens": int(ids.size), "available_sequences": int(n_full),
                                                   "tail_tokens_dropped": int(ids.size - n_full * L)})


@torch.no_grad()
def _ar_nll(model_fn, batches, vocab_size: int, mask_id: int) -> dict:
    from megadiff.diffusion.objectives import next_token_ce

    total, tokens, seqs, per_seq = 0.0, 0, 0, []
    for x in batches:
        ce = next_token_ce(model_fn(x), x, vocab_size, mask_id).to(torch.float64)
        total += float(ce.sum())
        tokens += ce.numel()
        seqs += x.shape[0]
        per_seq.append(ce.mean(-1).cpu())
    ps = torch.cat(per_seq)
    sem = float(ps.std() / math.sqrt(len(ps))) if len(ps) > 1 else float("nan")
    nll = total / tokens
    return {"nll": nll, "ppl": math.exp(min(nll, 700)), "tokens": tokens, "sequences": seqs, "nll_sem": sem}


def evaluate_set(im: Any, es: EvalSet, n_t: int = 8, batch_size: int = 8, seed: int = 0,
                 t_mode: str = "antithetic") -> dict:
    from megadiff.diffusion.elbo import evaluate_nelbo
    from megadiff.diffusion.schedules import make_schedule

    dev = im.device
    batches = [torch.from_numpy(es.seqs[i : i + batch_size]).to(dev) for i in range(0, len(es.seqs), batch_size)]
    t0 = time.perf_counter()
    if im.traits.is_autoregressive:
        r = _ar_nll(im.model_fn, batches, im.info.vocab_size, im.info.mask_id)
        out = {"metric": "nll", **r, "bits_per_token": r["nll"] / math.log(2)}
    else:
        sched = make_schedule(im.cfg.diffusion.schedule, im.cfg.diffusion.schedule_power)
        if im.traits.block_diffusion:  # the block NELBO through the BD3-LM mask (midpoint rule in t)
            from megadiff.diffusion.block import evaluate_block_nelbo
            from megadiff.model.block_lm import bd3lm_model_fn

            r = evaluate_block_nelbo(bd3lm_model_fn(im.model, im.cfg.diffusion.block_size), batches, sched,
                                     im.info.mask_id, im.info.vocab_size, im.cfg.diffusion.block_size, n_t=n_t,
                                     seed=seed)
        else:
            r = evaluate_nelbo(im.model_fn, batches, sched, im.info.mask_id, im.info.vocab_size, n_t=n_t,
                               seed=seed, mode=t_mode)
        if not math.isfinite(r["nelbo"]):
            raise MegadiffError(f"{es.name}: the NELBO is {r['nelbo']} (non-finite model output); the checkpoint "
                                f"{im.ckpt_dir} is damaged or diverged")
        out = {"metric": "nelbo", **r, "ppl_bound": math.exp(min(r["nelbo"], 700)),
               "bits_per_token": r["nelbo"] / math.log(2)}
    return {"name": es.name, "kind": es.kind, "source": es.source, "seq_len": int(es.seqs.shape[1]), **out,
            **es.extra, "seconds": round(time.perf_counter() - t0, 3)}


def evaluate_sets(im: Any, sets: list[EvalSet], n_t: int = 8, batch_size: int = 8, seed: int = 0,
                  t_mode: str = "antithetic", progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    return [evaluate_set(im, es, n_t=n_t, batch_size=batch_size, seed=seed, t_mode=t_mode)
            for es in tqdm(sets, desc="eval", unit="set", disable=not progress or len(sets) < 2)]
