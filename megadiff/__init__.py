"""megadiff: distributed pretraining of masked-diffusion language models on megatron-core."""

__version__ = "0.1.0"


EXIT_BAD_INPUT = 2  # a MegadiffError: the message names the input and the fix
EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint saved, please requeue (preemption, time budget, chunked jobs)
EXIT_DISK_FULL = 74  # EX_IOERR: a checkpoint could not be written, the disk is full (partial save removed)


class MegadiffError(RuntimeError):
    """An error caused by user input (config, files, layout), with a message that names the fix."""

    exit_code = EXIT_BAD_INPUT  # what `megadiff` exits with; subclasses name other codes (EXIT_DISK_FULL)
