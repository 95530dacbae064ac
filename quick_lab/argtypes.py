"""argparse types shared by every ``quick-lab`` subcommand: comma-separated lists."""
from __future__ import annotations

import argparse


def int_list(text: str) -> tuple[int, ...]:
    """``"1,16,256"`` -> (1, 16, 256); positive integers only."""
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def shape_list(text: str) -> tuple[tuple[int, int], ...]:
    """``"8192x8192,4096x4096"`` -> ((8192, 8192), (4096, 4096)), each K x N."""
    shapes = []
    for item in text.split(","):
        try:
            K, N = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shapes look like 8192x28672 (K x N), got {item!r}") from None
        shapes.append((K, N))
    return tuple(shapes)


def choice_list(allowed, what: str):
    """An argparse type: a comma-separated list whose items are all in ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        if not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s")
        for n in names:
            if n not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {what} {n!r}; have {', '.join(allowed)}")
        return names
    return parse
