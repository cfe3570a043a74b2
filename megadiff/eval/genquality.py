"""Sampling helpers for the CLI, and generation quality: generative perplexity + unigram entropy vs NFE.

    tokens, recs = run_sampler(im, canvas, "ancestral", sampler_kwargs(im, "ancestral", steps=64), seed=0)
    scorer = load_scorer("runs/ar/train", im)         # a megadiff `ar` checkpoint or a local HF causal LM dir
    res = gen_quality(im, scorer, ["ancestral", "first_hitting"], [16, 64], num=32)
    plot_gen_quality(res, "gen_quality.png")

Generative perplexity = exp(token-weighted mean NLL of the samples under the scoring model), where
each sample is scored as one sequence (first token not predicted). A scorer sharing the diffusion
model's tokenizer scores the sampled ids directly; otherwise samples are decoded to text and
re-tokenized. Unigram entropy (nats) is computed per sample from its token counts and averaged:
a sampler collapsing to repetitive text gets a low perplexity AND a low entropy, so both are reported.
The same two numbers on real held-out windows (``reference``) show where a perfect sampler would land.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megadiff import MegadiffError


def sampler_kwargs(im: Any, sampler: str, steps: Optional[int] = None, block_length: Optional[int] = None,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, length: int = 64,
                   remasking: str = "low_confidence", group: int = 1, cache: bool = True,
                   stop_at_eos: bool = True, threshold: Optional[float] = None) -> dict:
    """Keyword arguments of a registered sampler, filled from its declared traits and the run (schedule,
    EOS id). ``steps`` is the total for unblocked samplers and per block for blocked ones."""
    from megadiff.diffusion.catalog import SAMPLERS
    from megadiff.diffusion.schedules import make_schedule

    tr = SAMPLERS.traits(sampler)  # unknown name -> a clear error listing the registered ones
    kw: dict = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    if tr.grouped:
        kw["group"] = group
    if tr.blocks:
        block_length = block_length or (min(tr.default_block, length) if tr.default_block else None)
        kw["block_length"] = block_length
    if not tr.stepless:
        kw["steps"] = steps or (block_length if tr.default_block else length)
    if tr.needs_schedule:
        kw["schedule"] = make_schedule(im.cfg.diffusion.schedule, im.cfg.diffusion.schedule_power)
    if tr.cacheable and not cache:
        kw["cache"] = False
    if tr.remasking:
        kw["remasking"] = remasking
    if tr.stops_at_eos and stop_at_eos:
        kw.update(eos_id=im.info.eos_id, pad_id=im.info.pad_id)
    if tr.needs_denoiser:  # block diffusion: the run's block size, per-block steps, KV-cached network calls
        from megadiff.diffusion.catalog import OBJECTIVES
        from megadiff.model.block_lm import MegatronDenoiser

        if not OBJECTIVES.traits(im.cfg.diffusion.objective).block_diffusion:
            raise MegadiffError(f"sampler {sampler!r} needs a block-diffusion checkpoint; this one was trained with "
                                f"diffusion.objective={im.cfg.diffusion.objective}")
        bs = int(im.cfg.diffusion.block_size)
        if block_length not in (None, bs):
            raise MegadiffError(f"--block-length {block_length} differs from the checkpoint's diffusion.block_size "
                                f"{bs}; leave it out")
        kw.update(block_length=bs, steps=steps or bs, denoiser=MegatronDenoiser(im.model, bs), threshold=threshold)
    elif threshold is not None:
        raise MegadiffError(f"--threshold (Fast-dLLM parallel decoding) applies to the bd3lm sampler, not {sampler!r}")
    return kw


def _expected_calls(sampler: str, kw: dict, n_masked: int) -> int:
    """Network calls a sampler makes for ``n_masked`` tokens (at most; caching makes fewer)."""
    from megadiff.diffusion.catalog import SAMPLERS

    tr = SAMPLERS.traits(sampler)
    if tr.stepless:
        return math.ceil(n_masked / max(1, kw.get("group", 1)))
    if tr.blocks:
        return kw["steps"] * math.ceil(n_masked / (kw.get("block_length") or n_masked))
    return min(kw["steps"], n_masked)


def run_sampler(im: Any, canvas: torch.Tensor, sampler: str, kw: dict, seed: int = 0, batch_size: int = 8,
                progress: bool = True, desc: str = "", cfg_weight: float = 0.0,
                cond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[dict]]:
    """Fill the [MASK] positions of ``canvas`` [N, L]; returns (tokens [N, L], one stats dict per row).

    ``cfg_weight`` > 0: unsupervised classifier-free guidance (``diffusion.guidance``) conditioned on the
    positions ``cond`` [L] bool (the prompt / fixed text). The progress bar counts network calls
    (cached/skipped steps make it finish early; a guided call scores twice the rows in one call).
    """
    from tqdm import tqdm

    from megadiff.diffusion.samplers import SAMPLERS

    fn = SAMPLERS.get(sampler)
    mid, V = im.info.mask_id, im.info.vocab_size
    canvas = canvas.to(im.device)
    gen = torch.Generator(device=im.device).manual_seed(seed)
    n_masked = int((canvas == mid).sum(-1).max()) if canvas.numel() else 0
    n_batches = math.ceil(len(canvas) / batch_size)
    bar = tqdm(total=n_batches * _expected_calls(sampler, kw, n_masked), unit="call", disable=not progress,
               desc=desc or sampler, leave=False)

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        bar.update(1)
        return im.model_fn(x)

    if cfg_weight:
        model_fn = _guided(model_fn, sampler, cfg_weight, cond, mid, V)

    outs, stats = [], []
    for i in range(0, len(canvas), batch_size):
        x = canvas[i : i + batch_size]
        t0 = time.perf_counter()
        out = fn(model_fn, x, mask_id=mid, vocab_size=V, generator=gen, **kw)
        if im.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if bool((out.tokens == mid).any()):
            raise MegadiffError(f"sampler {sampler!r} left [MASK] tokens in its output (a sampler bug)")
        outs.append(out.tokens)
        stats += [{"steps": int(out.steps), "nfe": int(out.nfe_rows[r]), "seconds": round(dt, 4)}
                  for r in range(len(x))]
    bar.close()
    return torch.cat(outs).cpu(), stats


def _guided(model_fn: Any, sampler: str, w: float, cond: Optional[torch.Tensor], mask_id: int, V: int) -> Any:
    from megadiff.diffusion.catalog import SAMPLERS
    from megadiff.diffusion.guidance import guided_model_fn

    if w < 0:
        raise MegadiffError(f"--cfg-weight {w}: the guidance weight must be >= 0 (0 = no guidance)")
    if SAMPLERS.traits(sampler).needs_denoiser:
        raise MegadiffError(f"--cfg-weight: sampler {sampler!r} calls the network through its KV-cached denoiser, "
                            "which guidance does not wrap; use --sampler ancestral, first_hitting, llada or block")
    if cond is None or not bool(cond.any()):
        raise MegadiffError("--cfg-weight needs conditioning text to guide towards: give --prompt or --infill "
                            "(unconditional samples have nothing to mask)")
    return guided_model_fn(model_fn, prompt=cond, w=w, mask_id=mask_id, vocab_size=V)


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ids with special tokens kept visible (an [EOS] in a sample is shown, not hidden)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)


# ----------------------------------------------------------------------------- scorers


def _is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "megadiff.json").is_file()


def check_scorer(path: str) -> None:
    """Cheap checks of --scorer (no model load): a megadiff checkpoint must be an `ar` one."""
    if _is_hf_dir(path):
        return
    from megadiff.checkpoint.inference import resolve_checkpoint
    from megadiff.config import from_yaml_text

    cfg = from_yaml_text((resolve_checkpoint(path) / "config.yaml").read_text())
    from megadiff.diffusion.catalog import OBJECTIVES

    if not OBJECTIVES.traits(cfg.diffusion.objective).is_autoregressive:
        raise MegadiffError(f"--scorer {path}: trained with diffusion.objective={cfg.diffusion.objective}; the scorer "
                            f"must be an autoregressive model (diffusion.objective=ar) or a local Hugging Face "
                            f"causal LM directory")


class ARScorer:
    """A megadiff checkpoint trained with ``diffusion.objective=ar``."""

    def __init__(self, path: str):
        from megadiff.checkpoint.inference import load_for_inference

        self.im = load_for_inference(path)
        if not self.im.traits.is_autoregressive:
            raise MegadiffError(f"--scorer {path}: trained with diffusion.objective={self.im.cfg.diffusion.objective}; "
                                f"the scorer must be an autoregressive model (diffusion.objective=ar) or a local "
                                f"Hugging Face causal LM directory")
        ck = Path(self.im.ckpt_dir).resolve()
        self.name = f"megadiff-ar:{ck.parent.parent if ck.parent.name == 'checkpoints' else ck}"
        self.max_len = int(self.im.cfg.model.max_seq_len)
        self.tokenizer_sha256 = self.im.info.tokenizer_sha256

    def encode(self, text: str) -> list[int]:
        return self.im.tokenizer.encode(text).ids

    @torch.no_grad()
    def nll(self, seqs: list[list[int]], batch_size: int = 8) -> list[tuple[float, int]]:
        from megadiff.diffusion.objectives import next_token_ce

        def chunk_nll(x: torch.Tensor) -> float:
            ce = next_token_ce(self.im.model_fn(x), x, self.im.info.vocab_size, self.im.info.mask_id)
            return float(ce.to(torch.float64).sum())

        return _chunked_nll(seqs, self.max_len, self.im.device, chunk_nll)


class HFScorer:
    """A local Hugging Face causal LM directory (config + weights + tokenizer); nothing is downloaded."""

    def __init__(self, path: str, device: torch.device):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise MegadiffError("--scorer as a Hugging Face directory needs `transformers` (pip install transformers), "
                                "or pass a megadiff checkpoint trained with diffusion.objective=ar") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        except Exception as e:
            raise MegadiffError(f"--scorer {path}: not a loadable Hugging Face causal LM directory "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
        self.device = device
        self.name = f"hf:{Path(path).resolve()}"
        self.max_len = int(getattr(self.model.config, "n_positions", None)
                           or getattr(self.model.config, "max_position_embeddings", 1024))
        self.tokenizer_sha256 = None
        self.bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ([self.bos] if self.bos is not None else []) + ids  # the first real token is scored too

    @torch.no_grad()
    def nll(self, seqs: list[list[int]], batch_size: int = 8) -> list[tuple[float, int]]:
        def chunk_nll(x: torch.Tensor) -> float:
            logits = self.model(x).logits.float()
            return float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))

        return _chunked_nll(seqs, self.max_len, self.device, chunk_nll)


def _chunked_nll(seqs: list[list[int]], max_len: int, device: torch.device,
                 chunk_nll: Any) -> list[tuple[float, int]]:
    """(sum of next-token NLL, tokens scored) per sequence; long ones are scored in max_len chunks that
    overlap by one token, so every token after the first is scored exactly once."""
    out = []
    for ids in seqs:
        tot, n = 0.0, 0
        for s in range(0, max(1, len(ids) - 1), max_len - 1):
            chunk = ids[s : s + max_len]
            if len(chunk) < 2:
                break
            tot += chunk_nll(torch.tensor([chunk], dtype=torch.int64, device=device))
            n += len(chunk) - 1
        out.append((tot, n))
    return out


def load_scorer(path: str, im: Any):
    p = Path(path)
    if _is_hf_dir(p):
        return HFScorer(path, im.device)
    if not p.exists():
        raise MegadiffError(f"--scorer {p}: no such file or directory")
    return ARScorer(path)


# ----------------------------------------------------------------------------- metrics


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the token frequency distribution of one sequence."""
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def score_samples(scorer: Any, im: Any, token_rows: Sequence[Sequence[int]]) -> dict:
    """Generative perplexity and mean unigram entropy of sampled id rows (the diffusion model's tokenizer)."""
    same_tok = scorer.tokenizer_sha256 is not None and scorer.tokenizer_sha256 == im.info.tokenizer_sha256
    rows = [list(map(int, r)) for r in token_rows]
    seqs = rows if same_tok else [scorer.encode(decode(im.tokenizer, r)) for r in rows]
    nl = scorer.nll(seqs)
    tot = sum(a for a, _ in nl)
    n = sum(b for _, b in nl)
    if n == 0:
        raise MegadiffError("no tokens to score (samples too short)")
    per = [a / b for a, b in nl if b]
    ent = [unigram_entropy(r) for r in rows]
    return {"gen_ppl": math.exp(min(tot / n, 700)), "gen_nll": tot / n,
            "gen_nll_sem": float(np.std(per) / math.sqrt(len(per))) if len(per) > 1 else float("nan"),
            "entropy": float(np.mean(ent)), "entropy_sem": float(np.std(ent) / math.sqrt(len(ent))) if len(ent) > 1
            else float("nan"), "scored_tokens": int(n), "retokenized": not same_tok}


def gen_quality(im: Any, scorer: Any, samplers: Sequence[str], steps_list: Sequence[int], num: int = 16,
                length: Optional[int] = None, batch_size: int = 8, seed: int = 0, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, block_length: Optional[int] = None,
                reference: Optional[np.ndarray] = None, progress: bool = True) -> dict:
    """Unconditional samples per (sampler, steps), scored; ``reference``: real [N, L] windows for comparison."""
    from megadiff.diffusion.catalog import SAMPLERS
    from megadiff.eval.zeroshot import model_seq_len

    L = length or model_seq_len(im)
    if L > im.cfg.model.max_seq_len:
        raise MegadiffError(f"--length {L} exceeds the model's max_seq_len={im.cfg.model.max_seq_len}")
    canvas = torch.full((num, L), im.info.mask_id, dtype=torch.int64)
    rows = []
    for sampler in samplers:
        for steps in ([None] if SAMPLERS.traits(sampler).stepless else steps_list):
            kw = sampler_kwargs(im, sampler, steps=steps, block_length=block_length, temperature=temperature,
                                top_k=top_k, top_p=top_p, length=L)
            t0 = time.perf_counter()
            toks, st = run_sampler(im, canvas, sampler, kw, seed=seed, batch_size=batch_size, progress=progress,
                                   desc=f"{sampler} steps={steps if steps else '-'}")
            secs = time.perf_counter() - t0
            q = score_samples(scorer, im, toks.tolist())
            rows.append({"sampler": sampler, "steps": steps, "nfe": float(np.mean([s["nfe"] for s in st])),
                         "seconds": round(secs, 3), "num": num, "length": L, **q,
                         "example": decode(im.tokenizer, toks[0].tolist())[:300]})
    out = {"checkpoint": str(im.ckpt_dir), "step": im.step, "scorer": scorer.name, "seed": seed,
           "temperature": temperature, "top_k": top_k, "top_p": top_p, "results": rows}
    if reference is not None and len(reference):
        ref = score_samples(scorer, im, reference[:, :L].tolist())
        out["reference"] = {"num": int(len(reference)), "length": L, **ref}
    return out


def plot_gen_quality(res: dict, path: str | Path) -> Path:
    """Two panels vs NFE (log x): generative perplexity (log y) and unigram entropy; reference as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megadiff.utils.io import atomic_output_file

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    by: dict[str, list[dict]] = {}
    for r in res["results"]:
        by.setdefault(r["sampler"], []).append(r)
    for k, (name, rs) in enumerate(sorted(by.items())):
        rs = sorted(rs, key=lambda r: r["nfe"])
        x = [r["nfe"] for r in rs]
        kw = dict(marker="os^Dv"[k % 5], lw=1.5, ms=6, label=name, color=f"C{k}")
        a1.plot(x, [r["gen_ppl"] for r in rs], **kw)
        a2.plot(x, [r["entropy"] for r in rs], **kw)
        for r in rs:
            if r["steps"]:
                a1.annotate(f"T={r['steps']}", (r["nfe"], r["gen_ppl"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=f"C{k}")
    ref = res.get("reference")
    if ref:
        a1.axhline(ref["gen_ppl"], ls="--", color="gray", lw=1, label="held-out data")
        a2.axhline(ref["entropy"], ls="--", color="gray", lw=1, label="held-out data")
    for ax, yl in ((a1, "generative perplexity (lower is better)"), (a2, "unigram entropy, nats / sample")):
        ax.set_xscale("log")
        ax.set_xlabel("network calls per sample (NFE)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    a1.set_yscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for axis in (a1.xaxis, a2.xaxis, a1.yaxis):  # plain numbers at 1-2-5 steps, no overlapping minor labels
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    scorer = res["scorer"]
    fig.suptitle(f"step {res['step']}: sample quality vs NFE (scorer {Path(scorer.split(':', 1)[-1]).name}, "
                 f"temperature {res['temperature']})", fontsize=10)
    fig.tight_layout()
    with atomic_output_file(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)
