"""The errors that end a command with one line (`dist_cifar: error: ...`), never a traceback."""


class ConfigError(ValueError):
    """A user mistake in the configuration, naming the key."""


class DataError(RuntimeError):
    """The dataset is missing or broken, naming the path."""


class CheckpointError(RuntimeError):
    """A checkpoint or model file cannot be written, read, or used for this run, naming the file."""


class RunError(RuntimeError):
    """A problem with the run itself (launch, output folder, a diverged or failed run)."""
