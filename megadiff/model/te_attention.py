"""The ``te`` attention backend: transformer-engine's ``TEDotProductAttention`` (imported only when chosen)."""

from megatron.core.extensions.transformer_engine import TEDotProductAttention

from megadiff.model.catalog import ATTENTION_BACKENDS

ATTENTION_BACKENDS.register("te")(TEDotProductAttention)
