"""An argparse parser that writes to given streams and raises instead of exiting: the commands
are called as functions (tests, ``clproxy``'s dispatcher) and must never ``sys.exit`` mid-way."""

import argparse
import math
import sys
from typing import Any, Callable, Optional, TextIO, Type


class UsageExit(Exception):
    """argparse wanted to exit (``--help``, a usage error) with ``code``."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def writing_parser(stdout: TextIO, stderr: TextIO) -> Type[argparse.ArgumentParser]:
    """An ``ArgumentParser`` class whose help goes to ``stdout``, whose errors go to ``stderr``
    (usage line plus one error line, exit code 2) and that raises :class:`UsageExit`."""

    class Parser(argparse.ArgumentParser):
        def _print_message(self, message: str, file: Any = None) -> None:
            if message:
                (stdout if file is sys.stdout else stderr).write(message)

        def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
            if message:
                stderr.write(message)
            raise UsageExit(status)

        def error(self, message: str) -> None:  # type: ignore[override]
            stderr.write(self.format_usage())
            stderr.write(f"{self.prog}: error: {message}\n")
            raise UsageExit(2)

    return Parser


def positive_number(unit: str) -> Callable[[str], float]:
    """An argparse ``type``: a positive, finite number of ``unit`` (``nan`` or ``inf`` would
    never be reached, ``0`` or less means nothing)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number of {unit}, got {text[:20]!r}")
        return value
    return parse


#: seconds to wait (``nan`` would wait for ever, ``0`` or less not at all)
seconds = positive_number("seconds")
