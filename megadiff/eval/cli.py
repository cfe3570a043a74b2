"""`megadiff sample`, `megadiff eval` and `megadiff lm-eval`: generate from a checkpoint; zero-shot likelihood and sample quality.

    megadiff sample runs/tiny --prompt "ROMEO:" --num 2 --sampler first_hitting --out samples.jsonl
    megadiff sample runs/tiny --infill "To be, or [MASK:6] to be" --num 3
    megadiff eval runs/tiny --data runs/data/wiki:valid --text notes.txt --n-t 8 --out eval.json --mlflow
    megadiff eval runs/tiny --gen-quality --scorer runs/ar --samplers ancestral,first_hitting --steps 16,64
    megadiff lm-eval runs/tiny --tasks my_task --include-path tasks/ --mc-samples 64

CKPT is a run directory (its checkpoints/latest) or a checkpoints/step_XXXXXX directory.
Argument parsers only: the handlers live in sample_cmd.py, eval_cmd.py and lm_eval_cmd.py and are
imported when a command runs (fast --help).
"""

from __future__ import annotations

import argparse
import importlib


def _handler(module: str, name: str):
    """The command's handler, imported when it runs (keeps --help fast)."""

    def run(args) -> int:
        return getattr(importlib.import_module(f"megadiff.eval.{module}"), name)(args)

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="run directory (uses checkpoints/latest) or a step directory")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data-dir", default=None,
                   help="dataset directory holding the run's tokenizer (default: the run's data.train[0].path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _sampling_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--block-length", type=int, default=None,
                   help="block length for llada (default: one block) and block (default: min(32, length))")


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate text from a checkpoint",
        description="Generate samples (unconditional, after a prompt, or infilling [MASK] spans) and print them; "
                    "also written as JSONL records {prompt, sample, steps, nfe, seconds, ...}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt prefix (repeatable; default: unconditional)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line (\\n escapes allowed)")
    p.add_argument("--infill", action="append", default=[],
                   help="text with [MASK] spans to fill (repeatable); [MASK] = --span-length tokens, [MASK:n] = n")
    p.add_argument("--span-length", type=int, default=8, help="tokens generated for each bare [MASK] of --infill")
    p.add_argument("--num", type=int, default=1, help="samples per prompt / infill text")
    p.add_argument("--length", type=int, default=None,
                   help="tokens to generate after the prompt (default: fill the model's context)")
    p.add_argument("--sampler", default="ancestral", help="ancestral | first_hitting | llada | block | bd3lm "
                   "(bd3lm: block-diffusion checkpoints)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps: total for ancestral (default: length), per block for llada/block/bd3lm")
    p.add_argument("--no-cache", action="store_true",
                   help="ancestral/block: call the network every step; bd3lm: recompute the prefix every call")
    p.add_argument("--threshold", type=float, default=None,
                   help="bd3lm: Fast-dLLM parallel decoding, keep every token whose probability >= this per call")
    p.add_argument("--remasking", default="low_confidence", help="llada: low_confidence | random")
    p.add_argument("--cfg-weight", type=float, default=0.0,
                   help="unsupervised classifier-free guidance weight w >= 0 (SMDM): each call also scores the "
                        "canvas with the prompt/fixed text masked and samples from (1+w) log p(.|prompt) - "
                        "w log p(.|masked); 0 = off. Needs --prompt or --infill; not with bd3lm")
    _sampling_opts(p)
    p.add_argument("--out", default="samples.jsonl", help="JSONL output ('' = do not write)")
    p.add_argument("--quiet", action="store_true", help="do not print the samples")
    p.set_defaults(func=_handler("sample_cmd", "run_sample"))

    e = sub.add_parser(
        "eval", help="zero-shot NELBO perplexity bound; generation quality",
        description="Zero-shot likelihood of a checkpoint on held-out shard sets (--data) and raw text files "
                    "(--text, tokenized with the run's tokenizer, packed into seq_len windows): the NELBO in "
                    "nats/token and its perplexity bound exp(NELBO) for diffusion objectives, the exact NLL for "
                    "`ar`. With --gen-quality: generative perplexity under --scorer and unigram entropy of "
                    "unconditional samples per sampler and step count, plus a PNG of quality vs NFE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(e)
    e.add_argument("--data", action="append", default=[], metavar="DIR[:split]",
                   help="tokenized dataset split (repeatable; split default 'valid'); with neither --data nor --text: "
                        "the run's data.valid")
    e.add_argument("--text", action="append", default=[], metavar="FILE", help="raw UTF-8 text file (repeatable)")
    e.add_argument("--n-t", type=int, default=8, help="time points per sequence for the NELBO")
    e.add_argument("--t-mode", default="antithetic", choices=("antithetic", "grid"),
                   help="antithetic: unbiased; grid: midpoint rule (same t for every sequence)")
    e.add_argument("--batches", type=int, default=16, help="batches of --batch-size sequences per dataset (0 = all)")
    e.add_argument("--out", default=None, help="JSON result (default: <run_dir>/eval/eval-step<N>.json)")
    e.add_argument("--mlflow", action="store_true", help="log the results to the run's MLflow run")
    g = e.add_argument_group("generation quality")
    g.add_argument("--gen-quality", action="store_true", help="score samples instead of held-out likelihood")
    g.add_argument("--scorer", default=None,
                   help="megadiff checkpoint trained with diffusion.objective=ar, or a local HF causal LM directory")
    g.add_argument("--samplers", default="ancestral,first_hitting", help="comma-separated sampler names")
    g.add_argument("--steps", default="16,64,256", help="comma-separated step counts (first_hitting runs once)")
    g.add_argument("--num", type=int, default=16, help="samples per (sampler, steps)")
    g.add_argument("--length", type=int, default=None, help="sample length (default: the run's seq_len)")
    g.add_argument("--plot", default=None, help="PNG (default: next to the JSON, .png)")
    _sampling_opts(g)
    e.set_defaults(func=_handler("eval_cmd", "run_eval"))

    h = sub.add_parser(
        "lm-eval", help="run EleutherAI lm-evaluation-harness tasks on a checkpoint",
        description="Run lm-evaluation-harness tasks (pip install lm-eval, or the `lmeval` extra) through "
                    "megadiff's adapter: loglikelihood = Monte Carlo ELBO of the continuation (LLaDA/SMDM), "
                    "generate_until through a sampler. Tasks come from the harness or from YAML files in "
                    "--include-path (a local task over a JSONL file needs no network).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    h.add_argument("checkpoint", metavar="CKPT", help="run directory (uses checkpoints/latest) or a step directory")
    h.add_argument("--tasks", required=True, help="comma-separated task names")
    h.add_argument("--include-path", default=None, help="folder of extra task YAML files")
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction if < 1)")
    h.add_argument("--mc-samples", type=int, default=32, help="Monte Carlo draws per loglikelihood request")
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--sampler", default="ancestral", help="sampler for generate_until")
    h.add_argument("--steps", type=int, default=None, help="sampler steps for generate_until (default: length)")
    h.add_argument("--max-gen-toks", type=int, default=64)
    h.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--out", default=None, help="JSON result (default: <run_dir>/eval/lm-eval-step<N>.json)")
    h.set_defaults(func=_handler("lm_eval_cmd", "run_lm_eval"))
