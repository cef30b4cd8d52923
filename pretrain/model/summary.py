"""``coatnet-model``: inspect the CoAtNet variants without building them in memory.

    coatnet-model list
    coatnet-model summary coatnet_7 --image-size 512

The summary counts parameters and multiply-accumulates per stage on the meta device (see macs.py).
"""

from __future__ import annotations

import argparse
import sys

from .config import VARIANTS
from .factory import list_models
from .macs import MacCount, count_macs


def format_summary(count: MacCount) -> str:
    """A fixed-width table: one row per stage, the head, and the totals."""
    header = f"{'stage':<6} {'type':<12} {'blocks':>6} {'width':>6} {'grid':>9} {'params':>11} {'MACs':>11}"
    lines = [f"{count.name} at {count.image_size}x{count.image_size}", header, "-" * len(header)]
    for row in count.stages:
        grid = f"{row.grid[0]}x{row.grid[1]}" if row.kind != "head" else ""
        blocks = str(row.blocks) if row.kind != "head" else ""
        lines.append(
            f"{row.label:<6} {row.kind:<12} {blocks:>6} {row.width:>6} {grid:>9} "
            f"{_human(row.params):>11} {_human(row.macs):>11}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<6} {'':<12} {'':>6} {'':>6} {'':>9} {_human(count.params):>11} {_human(count.macs):>11}"
    )
    lines.append(f"({count.params:,} parameters, {count.macs:,} multiply-accumulates per image)")
    notes = VARIANTS[count.name].notes if count.name in VARIANTS else ""
    if notes:
        lines.append(f"note: {notes}")
    return "\n".join(lines)


def _human(value: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coatnet-model", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the registered variant names")
    summary = commands.add_parser("summary", help="parameters and MACs per stage of one variant")
    summary.add_argument("name", choices=list_models(), help="variant name")
    summary.add_argument("--image-size", type=int, default=224, help="input side in pixels (divisible by 32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``coatnet-model``."""
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print("\n".join(list_models()))
        return 0
    try:
        count = count_macs(args.name, args.image_size)
    except ValueError as err:
        print(f"coatnet-model: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(count))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
