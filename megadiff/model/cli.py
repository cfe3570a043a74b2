"""`megadiff model info`: parameters, FLOPs/token and the per-rank memory forecast for a preset and layout
(no torch; the forecast is megadiff/model/memory.py)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("model", help="model presets: sizes, FLOPs, memory")
    msub = p.add_subparsers(dest="model_cmd", metavar="SUBCOMMAND")
    i = msub.add_parser("info", help="parameters, FLOPs/token and memory estimate of a preset",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    i.add_argument("preset", nargs="?", help="preset name (omit with --list)")
    i.add_argument("--list", action="store_true", help="list all presets with their parameter counts")
    i.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    i.add_argument("--vocab", type=int, default=50304, help="vocab size incl. [MASK] (padded to 128 x TP)")
    i.add_argument("--seq", type=int, default=2048)
    i.add_argument("--micro-batch", type=int, default=8)
    i.add_argument("--tp", type=int, default=1)
    i.add_argument("--pp", type=int, default=1)
    i.add_argument("--dp", type=int, default=1)
    i.add_argument("--num-micro", type=int, default=1, help="micro batches per step (gradient accumulation)")
    i.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                   help="activation recomputation (model.recompute)")
    i.add_argument("--recompute-num-layers", type=int, default=None, help="full: layers per stage (default all)")
    i.add_argument("--fp32", action="store_true", help="fp32 weights/activations (default bf16)")
    i.add_argument("--no-distributed-optimizer", action="store_true", help="optimizer state not sharded over DP")
    i.add_argument("--loss-path", default="fused", choices=["fused", "logits"],
                   help="loss buffers of trainer.loss_path")
    i.add_argument("--untied", action="store_true", help="untied input/output embeddings")
    i.add_argument("--causal", action="store_true", help="FLOPs of the autoregressive baseline (causal attention)")
    i.set_defaults(func=info)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def info(args) -> int:
    from omegaconf import OmegaConf

    from megadiff import MegadiffError
    from megadiff.config import ModelConfig
    from megadiff.model.flops import count_params, flops_per_token
    from megadiff.model.memory import Layout, forecast, format_forecast
    from megadiff.model.presets import PRESETS, padded_vocab_size, resolve_shape

    def shape_of(name):
        mc = OmegaConf.structured(ModelConfig(preset=name, arch=args.arch, max_seq_len=args.seq,
                                              tie_embeddings=not args.untied))
        return resolve_shape(mc)

    vpad = padded_vocab_size(args.vocab, args.tp)
    if args.list or not args.preset:
        print(f"{'preset':>7} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} {'ffn':>6} {'params':>10} "
              f"{'non-emb':>10} {'GFLOP/tok':>10}   ({args.arch}, vocab {vpad}, seq {args.seq})")
        for name in PRESETS:
            s = shape_of(name)
            pc = count_params(s, vpad)
            print(f"{name:>7} {s.num_layers:>6} {s.hidden_size:>6} {s.num_attention_heads:>5} {s.num_query_groups:>3} "
                  f"{s.ffn_hidden_size:>6} {pc.total(s.num_layers):>10,} {pc.non_embedding(s.num_layers):>10,} "
                  f"{flops_per_token(s, vpad, args.seq, args.causal) / 1e9:>10.3f}")
        return 0
    if args.preset not in PRESETS:
        raise MegadiffError(f"unknown preset {args.preset!r}; allowed: {', '.join(PRESETS)}")
    s = shape_of(args.preset)
    pc = count_params(s, vpad)
    fpt = flops_per_token(s, vpad, args.seq, args.causal)
    layout = Layout(tp=args.tp, pp=args.pp, dp=args.dp, micro_batch=args.micro_batch, seq=args.seq,
                    num_micro=args.num_micro, recompute=args.recompute, recompute_num_layers=args.recompute_num_layers,
                    bf16=not args.fp32, distributed_optimizer=not args.no_distributed_optimizer,
                    loss_path=args.loss_path)
    mem = forecast(s, vpad, layout)
    print(f"preset {args.preset} ({args.arch}): {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} "
          f"heads ({s.num_query_groups} kv groups), ffn {s.ffn_hidden_size}, "
          f"{'tied' if s.tie_embeddings else 'untied'} embeddings")
    print(f"vocab            {args.vocab} -> padded {vpad} (multiple of 128 x TP={args.tp})")
    print(f"parameters       {pc.total(s.num_layers):,} total, {pc.non_embedding(s.num_layers):,} non-embedding, "
          f"{pc.embedding:,} embedding" + (f", {pc.output:,} output" if pc.output else ""))
    print(f"FLOPs/token      {fpt:.4g} (training, fwd+bwd, seq {args.seq}, "
          f"{'causal attention halved' if args.causal else 'bidirectional attention in full'})")
    print(f"layout           TP={args.tp} PP={args.pp} DP={args.dp}, micro batch {args.micro_batch} x {args.num_micro}, "
          f"{'fp32' if args.fp32 else 'bf16'}, recompute {args.recompute}, "
          f"{'' if layout.distributed_optimizer else 'no '}distributed optimizer, loss path {args.loss_path}")
    print("memory/GPU (forecast, per rank):")
    print(format_forecast(mem))
    return 0
