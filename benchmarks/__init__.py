"""Micro-benchmarks: each module runs with ``python -m benchmarks.<name>`` and ends with
a ``RESULT {json}`` line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
    errors: tuple[type[BaseException], ...],
) -> int:
    """A benchmark's ``main``: parse ``argv``, run, and turn ``errors`` into one line
    on stderr and exit status 1."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except errors as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 1
