"""argparse the prefopt way, for every command: an error is a PrefoptError naming the command
with its usage (exit 2, no traceback); --help prints and the command returns 0."""

import argparse
import sys

from .errors import PrefoptError

OVERRIDES = """\
Any config key can be given or overridden as --key value (or --key=value), in prefopt's
spelling or another tool's (TRL, the SimPO repository, alignment-handbook). Keys are checked
against the schema, a misspelt one refused with the nearest name; `prefopt config explain`
prints what they resolve to."""

class _Exit(Exception):
    """argparse has printed --help: the command ends with this status."""

    def __init__(self, status: int):
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse the prefopt way: a bad option is a PrefoptError naming the command, with its usage
    (exit 2, no traceback); --help prints and the command returns 0. Options are spelt out in
    full (no abbreviations), as config keys are."""

    def __init__(self, command: str, description: str, **kwargs):
        self.known = set()  # every option's spellings, filled by add_argument (also argparse's own -h)
        super().__init__(prog=f"prefopt {command}", description=description, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def add_argument(self, *names, **kwargs):
        self.known.update(names)
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args: list[str]) -> argparse.Namespace:
        # an unknown option is named before a missing one: `--out o` is a misspelt --output
        unknown = [a for a in args if a.startswith("--") and a.partition("=")[0] not in self.known]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_args(args)

    def error(self, message: str):
        raise PrefoptError(f"{self.prog}: {message}.\n{self.format_usage().rstrip()}")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, end="", file=sys.stderr)
        raise _Exit(status)


def boolean(value: str) -> bool:
    """true/false, 1/0, yes/no in any case; anything else is refused, never read as False."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: use true or false (or 1/0, yes/no)")


def _help_only(parser: _Parser, args: list[str]) -> bool:
    """For the commands whose --key value options are free-form: print the help if asked."""
    if "-h" in args or "--help" in args:
        parser.print_help()
        return True
    return False

def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 0")
    return int(value)

def _own_options(args: list[str], names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """A command's own `--name value` options apart from the config's free-form `--key value`s."""
    own, rest = [], []
    i = 0
    while i < len(args):
        name = args[i].partition("=")[0]
        takes = 1 if name in names and "=" not in args[i] else 0
        (own if name in names else rest).extend(args[i:i + 1 + takes])
        i += 1 + takes
    return own, rest
