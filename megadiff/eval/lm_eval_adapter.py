"""EleutherAI lm-evaluation-harness adapter (optional: ``pip install lm-eval``).

    import megadiff.eval.lm_eval_adapter                       # registers model type "megadiff"
    lm_eval --model megadiff --model_args pretrained=runs/tiny,mc_samples=64 --tasks hellaswag
    # or in Python: MegadiffLM(pretrained="runs/tiny").loglikelihood([...Instance...])

* ``loglikelihood(context, continuation)``: Monte Carlo NELBO over the continuation, as LLaDA / SMDM do:
  for each of ``mc_samples`` draws, l ~ U{1..n} of the n continuation tokens are masked (uniformly
  chosen positions; the context is never masked) and the estimate is (n / l) sum_{masked} log p(x_i | x_t).
  Its expectation is the ELBO of the continuation given the context (a lower bound on the log-likelihood).
  Draws are seeded per request (hash of the text), so results are reproducible and order-independent.
  ``is_greedy``: the one-shot argmax with the whole continuation masked equals the continuation.
  For ``ar`` checkpoints the exact causal log-likelihood is returned instead.
* ``loglikelihood_rolling``: the same estimate over consecutive max-length windows of the text.
* ``generate_until``: a registered sampler (``sampler=``, ``steps=``) fills ``max_gen_toks`` masks after
  the context; the text is cut at the first stop string and at EOS. Greedy by default
  (``temperature=0``), as the harness expects.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

from megadiff import MegadiffError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("megadiff.eval.lm_eval_adapter needs lm-evaluation-harness: pip install lm-eval") from e


def _seed_of(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "little") & (2**63 - 1)


@register_model("megadiff")
class MegadiffLM(LM):
    def __init__(self, pretrained: str, mc_samples: int = 32, batch_size: int = 16, sampler: str = "ancestral",
                 steps: Optional[int] = None, temperature: float = 0.0, max_gen_toks: int = 64, device: str = "auto",
                 seed: int = 0, **_: Any):
        super().__init__()
        from megadiff.checkpoint.inference import load_for_inference

        self.im = load_for_inference(pretrained, device=device)
        if self.im.traits.block_diffusion:
            raise MegadiffError(f"{pretrained}: the lm-eval adapter scores with the plain MDLM ELBO, which does not "
                                "apply the block-diffusion (BD3-LM) layout; block-diffusion checkpoints are not "
                                "supported by lm-eval yet (use `megadiff eval` for the block NELBO)")
        self.mc = int(mc_samples)
        self.bs = int(batch_size)
        self.sampler, self.steps, self.temperature = sampler, steps, float(temperature)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.max_len = int(self.im.cfg.model.max_seq_len)
        self.ar = self.im.traits.is_autoregressive
        self.V, self.mask = self.im.info.vocab_size, self.im.info.mask_id

    # ------------------------------------------------------------------ helpers
    def _enc(self, s: str) -> list[int]:
        return self.im.tokenizer.encode(s).ids if s else []

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        from megadiff.diffusion.objectives import restrict_logits

        outs = [self.im.model_fn(x[i : i + self.bs]) for i in range(0, len(x), self.bs)]
        return torch.log_softmax(restrict_logits(torch.cat(outs), self.V, self.mask).to(torch.float64), -1)

    def _score(self, ctx: list[int], cont: list[int], seed: int) -> tuple[float, bool]:
        """(log-likelihood estimate of cont given ctx, is_greedy)."""
        if not cont:
            return 0.0, True
        ids = (ctx + cont)[-self.max_len :]
        n = min(len(cont), len(ids))
        P = len(ids) - n
        x0 = torch.tensor(ids, dtype=torch.int64, device=self.im.device)
        tgt = x0[P:]
        if self.ar:
            if P == 0:  # no context left: the first token is not predicted (no BOS in training)
                x0, P, n = x0, 1, n - 1
                tgt = x0[1:]
            lp = self._logits(x0[None])[0, P - 1 : -1]
            tok_lp = lp.gather(-1, tgt[:, None]).squeeze(-1)
            return float(tok_lp.sum()), bool((lp.argmax(-1) == tgt).all())
        g = torch.Generator().manual_seed(seed)
        ls = torch.randint(1, n + 1, (self.mc,), generator=g)
        rows = x0.repeat(self.mc + 1, 1)
        for k in range(self.mc):
            pos = torch.randperm(n, generator=g)[: int(ls[k])] + P
            rows[k, pos.to(self.im.device)] = self.mask
        rows[self.mc, P:] = self.mask  # greedy check: everything masked
        lp = self._logits(rows)[:, P:]
        tok_lp = lp.gather(-1, tgt.expand(self.mc + 1, n)[..., None]).squeeze(-1)
        masked = rows[:, P:] == self.mask
        est = (tok_lp[: self.mc] * masked[: self.mc]).sum(-1) * (n / ls.to(tok_lp))
        greedy = bool((lp[self.mc].argmax(-1) == tgt).all())
        return float(est.mean()), greedy

    # ------------------------------------------------------------------ the LM API
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            ctx, cont = req.args[0], req.args[1]
            out.append(self._score(self._enc(ctx), self._enc(cont), _seed_of(str(self.seed), ctx, cont)))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            text = req.args[0]
            ids = self._enc(text) + [self.im.info.eos_id]
            total = 0.0
            for s in range(0, len(ids), self.max_len):
                total += self._score([], ids[s : s + self.max_len], _seed_of(str(self.seed), text, str(s)))[0]
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        from megadiff.eval.genquality import decode, run_sampler, sampler_kwargs

        out = []
        for req in requests:
            ctx, kw = req.args[0], dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            ids = self._enc(ctx)[-(self.max_len - n):] if n < self.max_len else []
            n = min(n, self.max_len - len(ids))
            canvas = torch.tensor([ids + [self.mask] * n], dtype=torch.int64)
            skw = sampler_kwargs(self.im, self.sampler, steps=self.steps, length=n,
                                 temperature=float(kw.get("temperature", self.temperature)))
            toks, _ = run_sampler(self.im, canvas, self.sampler, skw, seed=_seed_of(str(self.seed), ctx) % 2**31,
                                  progress=False)
            gen = toks[0, len(ids):].tolist()
            if self.im.info.eos_id in gen:
                gen = gen[: gen.index(self.im.info.eos_id)]
            text = decode(self.im.tokenizer, gen)
            cut = min([text.find(u) for u in until if u and u in text], default=len(text))
            out.append(text[:cut])
        return out

    @property
    def tokenizer_name(self) -> str:
        return f"megadiff:{self.im.info.tokenizer_sha256[:12]}"


__all__ = ["MegadiffLM"]
