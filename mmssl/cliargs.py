"""Argument parsing for every `mmssl` CLI: bad input is one line and exit code 2.

argparse prints its usage block before the error; the house rule is one line naming the
problem (`PROG: error: argument --size: invalid int value: 'x'`), so every CLI builds its
parser from `ArgumentParser` here (subcommand parsers inherit it).  `check_numbers`
rejects what argparse's `int` and `float` let through: NaN, infinities, integers beyond
64 bits and values outside an option's range.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

INT64 = 2**63


def tolerant_streams() -> None:
    """stdout and stderr write what the locale's encoding cannot hold as escapes: under an
    ASCII locale (LC_ALL=C without Python's UTF-8 mode) a summary's "±" or a class name's
    "é" ended a finished command in UnicodeEncodeError.  Files are written in UTF-8."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # absent on a replaced stream
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph as one line: a CLI's `--help` description."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print `PROG: error: MESSAGE` on one line and exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_problem(value: Any) -> str | None:
    """Why an int/float option value is unusable whatever its range (None if it is usable)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and not -INT64 <= value < INT64:
        return f"must fit in 64 bits, got {value}"
    return None


def check_numbers(
    args: argparse.Namespace, rules: dict[str, tuple[Callable[[Any], bool], str]]
) -> str | None:
    """The first problem among the numeric options of `args` as `--name must ...`, or None.

    rules: option dest -> (predicate on a non-None value, what it must be, e.g. ">= 1")."""
    for dest, value in sorted(vars(args).items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + dest.replace("_", "-")
        problem = number_problem(value)
        if problem:
            return f"{flag} {problem}"
        if dest in rules and not rules[dest][0](value):
            return f"{flag} must be {rules[dest][1]}, got {value}"
    return None


def out_dir_problem(path: str | Path) -> tuple[Path, str] | None:
    """Why directory `path` cannot be made or written: (the path at fault, what is wrong with
    it), or None.  Its nearest existing path must be a directory that a trial directory can
    be made in (removed at once: os.access says yes to root on /sys or a read-only mount),
    and no name still to make may be longer than its file system allows."""
    full = Path(os.path.abspath(path))
    there = full
    while not os.path.lexists(there):  # lexists: a dangling symlink is in the way too
        there = there.parent
    if not there.is_dir():
        return there, "is not a directory"
    name_max = os.pathconf(there, "PC_NAME_MAX")
    parts = full.relative_to(there).parts
    for i, name in enumerate(parts):
        try:
            size = len(os.fsencode(name))
        except UnicodeEncodeError:  # an ASCII locale (LC_ALL=C) names files in ASCII only
            encoding = sys.getfilesystemencoding()
            return there.joinpath(*parts[: i + 1]), (
                f"has a name this locale's file-name encoding ({encoding}) cannot hold; set a "
                "UTF-8 locale (LC_ALL=C.UTF-8) or PYTHONUTF8=1"
            )
        if size > name_max:
            return there.joinpath(*parts[: i + 1]), f"has a name longer than {name_max} bytes"
    try:
        os.rmdir(tempfile.mkdtemp(dir=there))
    except OSError as err:
        return there, f"is not writable ({err.strerror})"
    return None
