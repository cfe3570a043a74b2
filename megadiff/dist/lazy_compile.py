"""Start-up: megatron-core's ``jit_fuser`` compiles when first called, not when megatron is imported.

``megatron.core.jit`` sets ``jit_fuser = torch.compile`` and megatron decorates its fused kernels
(bias-GeLU, bias-SwiGLU, bias-GeGLU, ...) with it at import time. Creating a ``torch.compile`` wrapper
imports torch._dynamo and torch._inductor: several seconds in every training process, also on a CPU
where those fusions are switched off and never run. :func:`install` puts an import hook in front of
``megatron.core.jit`` so that, while that one module executes, ``torch.compile`` is a lazy decorator:
the real ``torch.compile`` is applied, with the same arguments, on the first call of a decorated
function. Nothing else changes (``torch.compile`` is restored right after; a fusion that runs compiles as
before, at its first call — which is also when ``torch.compile`` itself compiles).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

TARGET = "megatron.core.jit"


def lazy(real_compile):
    """A stand-in for ``torch.compile`` that defers the real one to the first call."""

    def compile_later(fn=None, **kwargs):
        if fn is None:  # used as @torch.compile(**kwargs)
            return lambda f: compile_later(f, **kwargs)
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(fn, **kwargs)
            return compiled(*args, **kw)

        call.__megadiff_lazy_compile__ = True
        return call

    return compile_later


class _JitHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one-shot: find the real spec without us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            torch = sys.modules.get("torch")
            if torch is None:  # megatron imports torch first; without it there is nothing to defer
                return real_exec(module)
            real = torch.compile
            torch.compile = lazy(real)
            try:
                real_exec(module)
            finally:
                torch.compile = real

        spec.loader.exec_module = exec_module
        return spec


def install() -> bool:
    """Install the hook unless megatron's jit module is already imported (then it is too late)."""
    if TARGET in sys.modules or any(isinstance(f, _JitHook) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _JitHook())
    return True
