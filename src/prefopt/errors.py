"""The exceptions prefopt raises for what a user or a machine did: each message names what to do."""


class PrefoptError(Exception):
    """A problem with the user's config, data or environment, stated with its fix.

    The CLI prints the message without a traceback and exits with status 2. `echo=False` on the
    processes other than the first one, which already said it.
    """

    def __init__(self, message: str, echo: bool = True):
        super().__init__(message)
        self.echo = echo


class MissingSplit(PrefoptError):
    """A local dataset has no split of the name asked for: a type, so that a caller with its own
    advice (`prefopt eval`'s --split) can catch this and no other error, whatever the wording."""

    def __init__(self, message: str, path: str, split: str, found: list[str]):
        super().__init__(message)
        self.path, self.split, self.found = path, split, list(found)


class NonFinite(PrefoptError):
    """Training stopped at a step whose loss or gradients were not finite: a type, so that
    `prefopt sweep` can mark that trial diverged and go on to the next, whatever the wording."""


class Stopped(BaseException):
    """The run was stopped by a signal (SIGTERM, SIGINT); the CLI exits with 128 + its number.

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
