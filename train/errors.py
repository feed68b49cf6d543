"""User errors vs bugs.

A :class:`UserError` is something the user can fix (a config key, a data file, a template). The CLI
prints its message as one paragraph, without a traceback, and exits with :data:`EXIT_USER_ERROR`.
Anything else is a bug and exits with :data:`EXIT_INTERNAL_ERROR`. ``assert`` is for internal
invariants only.
"""

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3  # the trainer checkpointed on SIGTERM/SIGUSR1 or max_time; Slurm scripts requeue on it


class UserError(Exception):
    """Base class of errors the user can fix. The message says what, where and how to fix it."""


class ConfigError(UserError):
    """A run config, mixture file or override is wrong (unknown key, wrong type, impossible combination)."""


class DataError(UserError):
    """A dataset, template or task cannot produce valid examples."""


class TemplateError(DataError):
    """A prompt template fails to load or render."""


class TrainingError(UserError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


class CheckpointError(UserError):
    """A checkpoint cannot be written or loaded safely (damaged, needs unpickling, or the config changed)."""
