"""Errors a user can fix. The CLI prints their message on one line and exits non-zero, without a
stack trace; this module imports nothing heavy so that a bad params file fails fast."""

import signal


class UserError(Exception):
    """Base of every error whose message tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A params file that cannot drive a run; the message names the key and what is allowed."""


class DataError(UserError, ValueError):
    """The source cannot give the subsets asked for; the message says why."""


class ModelError(UserError, ValueError):
    """A model or tokenizer that cannot be loaded; the message says which and why."""


class SaveError(UserError, OSError):
    """Writing an output failed; the previous output, if any, is left intact."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, KL explosion, missing input); the message names the step."""


class PaperError(UserError, RuntimeError):
    """The figures or paper stage cannot build its outputs (missing metric, missing LaTeX toolchain)."""


class Preempted(Exception):
    """A training loop stopped by SIGTERM after saving a checkpoint (preemption.py); not a UserError:
    nothing is wrong. The CLI exits with `exit_code`, what a shell reports for a process that SIGTERM
    ended (128 + 15): the same status whether the signal came inside the training loop or outside it
    (where it still ends the process), apart from 1 (training error) and 2 (bad params)."""

    exit_code = 128 + signal.SIGTERM
