"""End-of-training samples as a training callback (``trainer.num_samples`` > 0)."""

from __future__ import annotations

import json

from megadiff.checkpoint.inference import model_fn_of
from megadiff.diffusion.catalog import OBJECTIVES
from megadiff.train.callbacks import Callback


class EndOfRunSamples(Callback):
    """Unconditional samples once training is done, written to <run_dir>/samples.jsonl by rank 0.

    Every rank runs the sampler with the same seed, so TP peers feed identical inputs to the
    sharded model. Skipped under pipeline parallelism (use `megadiff sample` on the checkpoint).
    """

    def __init__(self, num: int, steps: int, seed: int):
        self.num, self.steps, self.seed = num, steps, seed

    def on_train_end(self, trainer, reason: str) -> None:
        if reason == "done" and self.num > 0:
            self._generate(trainer)

    def _generate(self, trainer) -> None:
        from megadiff.data.tokenizer import load_from_dir
        from megadiff.eval.generate import generate

        if trainer.ctx.pp > 1:
            if trainer.ctx.rank == 0:
                print("samples skipped under pipeline parallelism; run `megadiff sample` on the checkpoint", flush=True)
            return
        if not OBJECTIVES.traits(trainer.cfg.diffusion.objective).absorbing:
            if trainer.ctx.rank == 0:
                print(f"samples skipped: no sampler for diffusion.objective={trainer.cfg.diffusion.objective} "
                      f"(its noise is not [MASK]-only)", flush=True)
            return
        tokenizer, _ = load_from_dir(trainer.cfg.data.train[0].path)
        model = trainer.built.model
        model.eval()
        out = trainer.run_dir / "samples.jsonl" if trainer.ctx.rank == 0 else None
        sampler, kw = "ancestral", {"steps": self.steps}
        if OBJECTIVES.traits(trainer.cfg.diffusion.objective).block_diffusion:  # BD3-LM layout + KV cache
            from megadiff.model.block_lm import MegatronDenoiser

            bs = int(trainer.cfg.diffusion.block_size)
            sampler, kw = "bd3lm", {"block_length": bs, "denoiser": MegatronDenoiser(model, bs)}
        from megadiff.diffusion.shift import aligned_model_fn

        recs = generate(aligned_model_fn(model_fn_of(model), trainer.cfg.diffusion), tokenizer, [""] * self.num, gen_length=trainer.seq_len,
                        sampler=sampler, sampler_kwargs=kw, batch_size=self.num,
                        seed=self.seed, vocab_size=trainer.info.vocab_size, mask_id=trainer.info.mask_id,
                        device=trainer.ctx.device, out_path=None, progress=False)
        model.train()
        if out is not None:
            from megadiff.utils.io import atomic_write_text

            atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in recs))
            for i, r in enumerate(recs):
                print(f"--- sample {i} ({r['nfe']} network calls, {r['seconds']:.1f} s)\n{r['sample'][:600]}", flush=True)
