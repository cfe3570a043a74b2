"""megadiff: distributed pretraining of masked-diffusion language models on megatron-core."""

__version__ = "0.1.0"


class MegadiffError(RuntimeError):
    """An error caused by user input (config, files, layout), with a message that names the fix."""

    exit_code = 2  # what `megadiff` exits with; subclasses name other documented codes (74: disk full)
