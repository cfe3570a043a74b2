"""`megadiff doctor`: what this machine offers a training run.

Reports torch (version, CUDA build), the GPUs it sees (name, memory, compute capability, bf16,
datasheet peak used for MFU), NCCL, megatron-core, and the optional kernels flash-attn,
transformer-engine and apex; then the attention backend ``model.attention_backend=auto`` picks,
the precision ``trainer.precision=auto`` picks and the megatron fusions that will be used.
On a machine without a GPU it says so plainly. Exit code 0; with ``--require-gpu`` 1 when no
usable CUDA GPU is present (the last step of ``make setup-gpu``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import sys


def register(sub) -> None:
    p = sub.add_parser("doctor", help="report torch/CUDA/GPUs/flash-attn/TE/apex and what training will use",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--require-gpu", action="store_true", help="exit 1 unless a CUDA GPU is usable")
    p.set_defaults(func=run)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _probe(module: str, dists: tuple[str, ...]) -> str:
    """'not installed' | 'VERSION' | 'installed but fails to import: ...' (a wheel built for another torch)."""
    if importlib.util.find_spec(module) is None:
        return "not installed"
    version = next((v for d in dists if (v := _version(d))), "?")
    try:
        importlib.import_module(module)
    except Exception as e:  # ABI mismatch with this torch, missing CUDA libs, ...
        return f"{version}, installed but fails to import: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return version


def gather() -> dict:
    """Everything the report prints, as data (used by the test and by `--json` callers)."""
    import torch

    from megadiff.model.attention import resolve_backend
    from megadiff.model.flops import peak_tflops_for

    info: dict = {
        "python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda_build": torch.version.cuda,
        "megatron_core": _version("megatron-core"), "cuda_available": torch.cuda.is_available(), "gpus": [],
        "flash_attn": _probe("flash_attn", ("flash-attn", "flash_attn")),
        "transformer_engine": _probe("transformer_engine", ("transformer-engine", "transformer_engine")),
        "apex": _probe("apex", ("apex",)),
    }
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}", "peak_tflops_bf16": peak_tflops_for(p.name)})
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
    device = "cuda" if info["cuda_available"] else "cpu"
    info["device"] = device
    info["attention_backend"] = resolve_backend("auto", device)
    info["precision"] = "bf16" if device == "cuda" else "fp32"
    info["fusions"] = _fusions(device)
    return info


def _fusions(device: str) -> dict[str, bool] | None:
    """The megatron fusions a run on ``device`` switches on (None: this build has no per-device choice)."""
    try:
        from megadiff.model import build
    except ImportError:
        return None
    chooser = getattr(build, "fusion_settings", None)
    return dict(chooser(device)) if chooser else None


def run(args) -> int:
    info = gather()
    print(f"python {info['python']} · torch {info['torch']} (CUDA build: {info['torch_cuda_build'] or 'none, CPU-only'})"
          f" · megatron-core {info['megatron_core']}")
    if info["cuda_available"]:
        for i, g in enumerate(info["gpus"]):
            peak = f"{g['peak_tflops_bf16']:g} TFLOP/s bf16 peak (for MFU)" if g["peak_tflops_bf16"] else \
                "peak unknown: MFU not reported unless trainer.peak_tflops is set"
            print(f"GPU {i}: {g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}, {peak}")
        print(f"bf16: {'yes' if info['bf16'] else 'no'} · NCCL {info.get('nccl') or 'not found'}")
    else:
        why = "this torch is a CPU-only build" if not info["torch_cuda_build"] else \
            "torch was built with CUDA but sees no GPU (driver, CUDA_VISIBLE_DEVICES?)"
        print(f"NO GPU: no CUDA device is usable ({why}). Training runs on the CPU under gloo (tests, the demo); "
              f"on a GPU node run `make setup-gpu`.")
    for name in ("flash_attn", "transformer_engine", "apex"):
        print(f"{name.replace('_', '-')}: {info[name]}")
    print(f"model.attention_backend=auto -> {info['attention_backend']} · trainer.precision=auto -> "
          f"{info['precision']} · parallel.backend=auto -> {'nccl' if info['device'] == 'cuda' else 'gloo'}")
    fus = info["fusions"]
    if fus is None:
        print("megatron fusions: all off in this build (bias-activation, RoPE, persistent layer norm, masked softmax, "
              "gradient-accumulation fusion)")
    else:
        on = [k for k, v in fus.items() if v] or ["none"]
        print(f"megatron fusions on {info['device']}: {', '.join(on)}")
    if args.require_gpu and not info["cuda_available"]:
        return 1
    return 0
