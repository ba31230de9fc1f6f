"""The one exception type prefopt raises for bad input: its message names what to change."""


class PrefoptError(Exception):
    """A problem with the user's config, data or environment, stated with its fix.

    The CLI prints the message without a traceback and exits with status 2.
    """
