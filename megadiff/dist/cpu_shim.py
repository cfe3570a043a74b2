"""CPU shim for megatron-core 0.16: redirect its hard-coded CUDA calls when there is no GPU.

megatron-core assumes CUDA in code paths that are otherwise device-agnostic. On a machine without
a GPU (CI, the CPU demo, tests under gloo) these calls fail, so :func:`install` redirects them —
and only them — to the CPU. It is applied only when training on CPU (``megadiff.dist.parallel``
calls it when the device is CPU); on a GPU nothing is patched.

What is redirected, and where megatron calls it (0.16.1):

===========================================  ===================================================
megatron call                                 redirection
===========================================  ===================================================
``torch.cuda.current_device()``               ``"cpu"`` — rotary embeddings, p2p shape exchange,
                                              param/grad buffers, distributed optimizer, ckpt
``torch.cuda.synchronize()``, ``Stream``      no-op — p2p communication, checkpoint saving, DDP
``torch.zeros/tensor/empty/... device='cuda'``  CPU tensors — pipeline schedules' token counter,
                                              grad clipping, optimizer scalars, ckpt exchange
``Tensor.cuda()``                             identity — distributed optimizer, tied embeddings
``Tensor.type() == 'torch.cuda.FloatTensor'`` CPU tensors report the CUDA type name — asserts in
                                              grad clipping and the (distributed) optimizer
CUDA RNG tracker (``model_parallel_cuda_     the tracker forks the CPU generator instead
manual_seed``, ``get_cuda_rng_tracker``)
===========================================  ===================================================

The redirection is scoped: megatron modules get a proxy ``torch`` object whose factories and
``torch.cuda`` namespace are rewritten; every other library sees the real torch. The two
``Tensor`` methods are patched globally (a CPU-only process has no CUDA tensors for them to
confuse). Results are real computation on the CPU, never faked: tests compare TP/PP/DP layouts
against single-process runs numerically.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import torch

_INSTALLED = False

# megatron modules whose CUDA calls matter on our path; imported before patching so their
# module-level `torch` name can be swapped for the proxy.
_MODULES = [
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.module",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.validation",
]


def _cpu_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int):
        return torch.device("cpu")
    d = torch.device(dev) if isinstance(dev, str) else dev
    return torch.device("cpu") if isinstance(d, torch.device) and d.type == "cuda" else dev


def _on_cpu(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapped


class _CudaNamespace(types.ModuleType):
    """``torch.cuda`` as megatron sees it on a CPU-only process."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*_a, **_k):
        return None

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def get_rng_state(*_a, **_k):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *_a, **_k):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    class Stream:  # noqa: D106 - a CPU stand-in: work on the CPU is synchronous
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, *_a):
            pass

        def synchronize(self):
            pass

    @staticmethod
    def current_stream(*_a, **_k):
        return _CudaNamespace.Stream()

    @staticmethod
    def stream(_s):
        return contextlib.nullcontext()

    @staticmethod
    def memory_allocated(*_a, **_k):
        return 0

    @staticmethod
    def max_memory_allocated(*_a, **_k):
        return 0


class _TorchProxy(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaNamespace()
        for name in ("zeros", "ones", "empty", "full", "tensor", "empty_like", "zeros_like", "ones_like",
                     "full_like", "arange", "randn", "rand", "as_tensor"):
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_CUDA_TYPE = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def install() -> None:
    """Apply the redirections (idempotent). Call before building the model/optimizer on CPU."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    proxy = _TorchProxy()
    for name in _MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    # any already-imported megatron module referencing torch gets the proxy too
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(mod, "torch", None) is torch:
            mod.torch = proxy

    orig_type = torch.Tensor.type

    def cpu_type(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE:
            return _CUDA_TYPE[self.dtype]
        return orig_type(self, *args, **kwargs)

    torch.Tensor.type = cpu_type  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    # The model-parallel RNG tracker forks the CUDA generator; on CPU fork the CPU generator.
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    rnd._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    rnd._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    _INSTALLED = True


def installed() -> bool:
    return _INSTALLED
