"""megadiff: distributed pretraining of masked-diffusion language models on megatron-core."""

__version__ = "0.1.0"


EXIT_BAD_INPUT = 2  # a MegadiffError: the message names the input and the fix
EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint saved, please requeue (preemption, time budget, chunked jobs)


class MegadiffError(RuntimeError):
    """An error caused by user input (config, files, layout), with a message that names the fix."""
