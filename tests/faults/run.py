"""`make faults`: N random SIGKILLs plus every other fault trial, then the fault table.

    python -m tests.faults.run --n 20 [--seed 0] [--root runs/faults] [--only kill,corrupt,...]

Exits non-zero when any trial lost a step beyond its last committed checkpoint, logged a loss that
differs from the uninterrupted reference, or never finished.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

from data_pipeline.sample_data import digit_shards
from tests.faults import harness, trials


def table(results: list[harness.Result]) -> str:
    head = ("trial", "launches", "exit statuses", "steps redone", "steps lost", "losses equal", "s", "note")
    rows = [
        (
            r.trial,
            str(r.launches),
            ",".join(map(str, r.statuses)),
            str(r.redone),
            str(r.lost),
            "yes" if r.losses_equal else "NO",
            f"{r.seconds:.0f}",
            r.note.strip(),
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="random SIGKILL trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("runs/faults"))
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: kill,{','.join(trials.OTHER)}"
    )
    parser.add_argument(
        "--reference", type=Path, help="reuse this finished reference run folder (same code, same command)"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve() / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    shards = digit_shards(args.root.resolve() / "data", image_size=32, label_set="digits")  # reused if built
    ctx = harness.Context(root=root, shards=shards, reference={})
    print(f"fault trials under {root}; reference run first", flush=True)
    if args.reference:
        shutil.copytree(args.reference, root / "reference", ignore=shutil.ignore_patterns("LOCK"))
    ctx.reference = harness.make_reference(root, shards)
    only = set(filter(None, args.only.split(",")))
    rng = random.Random(args.seed)
    results: list[harness.Result] = []

    def record(result: harness.Result) -> None:
        results.append(result)
        status = "ok" if result.ok else "FAILED"
        print(f"{status:6} {result.trial}: {result.note.strip()} ({result.seconds:.0f} s)", flush=True)

    if not only or "kill" in only:
        for i in range(args.n):
            record(harness.random_kill(ctx, rng, i))
    for name, trial in trials.OTHER.items():
        if not only or name in only:
            record(trial(ctx))
    print()
    print(table(results))
    bad = [r.trial for r in results if not r.ok]
    print(
        f"\n{len(results) - len(bad)}/{len(results)} trials ok"
        + (f"; failed: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
