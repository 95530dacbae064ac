"""The command-line preamble of the target programs the measuring runners start under a tool
(``python -m <module> CASES.json``: conflicts_target under Nsight Compute, sanitizer_target under
compute-sanitizer): one argument, a case list that the program's own reader parses."""
from __future__ import annotations

import sys

USAGE_EXIT = 2  # a wrong command line or an unreadable case list


def read_case_argument(argv, module: str, read):
    """``read(path)`` of the program's one argument: ``(value, None)``, or ``(None, USAGE_EXIT)`` after
    printing the usage (not exactly one argument) or why the list could not be read."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print(f"usage: python -m {module} CASES.json", file=sys.stderr)
        return None, USAGE_EXIT
    try:
        return read(argv[0]), None
    except (OSError, ValueError) as exc:
        print(f"{module}: cannot read the case list: {exc}", file=sys.stderr)
        return None, USAGE_EXIT
