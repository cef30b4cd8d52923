"""`coatnet-data`: build, index, audit, preview and bench webdataset shards for the CoAtNet loaders.

A user mistake (a bad argument, a missing or malformed input, an output that cannot be written) ends the
command with one line on stderr naming the argument or file, exit status 2, and nothing written. The
library functions raise ValueError / OSError for those; this module turns them into that line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

from data_pipeline.config import DataConfig

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block), so that every mistake reads the same."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bounded(kind: type, low: float | None = None, high: float | None = None, *, open_high: bool = False):
    """An argparse type: `kind` within [low, high] (or [low, high) with open_high)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        too_high = high is not None and (value >= high if open_high else value > high)
        if math.isnan(value) or (low is not None and value < low) or too_high:
            if high is None:
                raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
            raise argparse.ArgumentTypeError(
                f"must be in [{low}, {high}{')' if open_high else ']'}, got {text}"
            )
        return value

    return parse


def _config_range(name: str) -> Callable[[str], object]:
    """An argparse type with the range DataConfig declares for field `name` (one place for each bound)."""
    meta = {f.name: f for f in dataclasses.fields(DataConfig)}[name]
    kind = int if meta.type in ("int", int) else float
    return _bounded(kind, meta.metadata.get("min"), meta.metadata.get("max"))


POSITIVE = _bounded(int, 1)


class _RandAugment(argparse.Action):
    """--randaugment LAYERS MAGNITUDE, each within the range DataConfig declares for it."""

    FIELDS = ("randaugment_layers", "randaugment_magnitude")

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        parsed = []
        for name, text in zip(self.FIELDS, values):
            try:
                parsed.append(_config_range(name)(text))
            except argparse.ArgumentTypeError as exc:
                parser.error(f"argument {option_string} {name.split('_')[1].upper()}: {exc}")
        setattr(namespace, self.dest, tuple(parsed))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="coatnet-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="image folder tree or list file -> shards + indexes + manifest")
    p.add_argument(
        "src", help="ImageNet-style folder (SRC/<class>/<image>) or a list file '<path> <label>...'"
    )
    p.add_argument("out", help="output directory (gets train/ and, with --val-fraction, val/)")
    p.add_argument("--shard-size", type=POSITIVE, default=1000, help="samples per shard")
    p.add_argument("--workers", type=POSITIVE, default=1, help="parallel shard writers")
    p.add_argument(
        "--val-fraction",
        type=_bounded(float, 0.0, 1.0, open_high=True),
        default=0.0,
        help="fraction held out, by path hash, in [0, 1)",
    )
    p = sub.add_parser("index", help="write DALI indexes + a manifest for existing webdataset shards")
    p.add_argument("dir", help="directory of *.tar shards")
    p.add_argument("--out", default=None, help="write indexes and manifest here (read-only shards)")
    p = sub.add_parser("audit", help="decode every sample once; write blocklist.json")
    p.add_argument("dir", help="dataset directory (with manifest.json), or a build's output (train/, val/)")
    p.add_argument("--threads", type=_config_range("num_threads"), default=2)
    for name, help_text in (
        ("preview", "grid of augmented training samples with labels"),
        ("bench", "training loader images/s"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("dir", help="dataset directory (with manifest.json)")
        p.add_argument("--image-size", type=POSITIVE, default=224)
        if name == "preview":
            p.add_argument("--out", required=True, help="PNG file to write")
            p.add_argument("--count", type=POSITIVE, default=16, help="images in the grid")
            p.add_argument(
                "--randaugment",
                action=_RandAugment,
                nargs=2,
                default=(DataConfig.randaugment_layers, DataConfig.randaugment_magnitude),
                metavar=("LAYERS", "MAGNITUDE"),
            )
            p.add_argument("--mixup", type=_config_range("mixup_alpha"), default=0.0, help="Mixup alpha")
        else:
            p.add_argument("--batch-size", type=_config_range("batch_size"), default=64)
            p.add_argument("--threads", type=_config_range("num_threads"), default=2)
            p.add_argument(
                "--batches", type=POSITIVE, default=20, help="timed batches (after 3 warm-up ones)"
            )
    return parser


def _one_dataset(path: str) -> Path:
    """`path` itself when it holds a manifest; otherwise say which of its subfolders to pass."""
    from data_pipeline.manifest import dataset_dirs

    found = dataset_dirs(path)
    if found != [Path(path)]:
        names = " or ".join(str(p) for p in found)
        raise ValueError(f"{path} holds no manifest.json of its own but datasets in subfolders: pass {names}")
    return found[0]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _words(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items())


def _build_summary(split: str, path: Path) -> str:
    """What a built split holds, in words, with the first skipped files."""
    from data_pipeline.manifest import load_manifest
    from data_pipeline.outdir import SKIPPED_NAME

    manifest = load_manifest(path)[0]
    stats = manifest.stats
    converted = {k.removeprefix("converted_"): n for k, n in stats.items() if k.startswith("converted_")}
    skipped = {k: n for k, n in stats.items() if k in ("missing", "unreadable")}
    lines = [
        f"{split}: {_n(manifest.num_samples, 'sample')} in {_n(len(manifest.shards), 'shard')} in {path} "
        f"({manifest.num_classes} classes, {manifest.label_kind}-label)",
        f"  {stats.get('stored', 0)} stored as they were, {sum(converted.values())} converted to RGB JPEG"
        + (f" ({_words(converted)})" if converted else ""),
    ]
    if skipped:
        listed = json.loads((path / SKIPPED_NAME).read_text())
        count = _n(sum(skipped.values()), "file")
        lines.append(f"  skipped {count} ({_words(skipped)}), all listed in {path / SKIPPED_NAME}:")
        lines += [f"    {name}: {why}" for name, why in list(listed.items())[:5]]
        if len(listed) > 5:
            lines.append(f"    and {len(listed) - 5} more")
    return "\n".join(lines)


def _check_png_out(out: str) -> None:
    target = Path(out)
    if target.is_dir():
        raise ValueError(f"--out {target} is a directory; name the PNG file to write")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--out {target}: folder {target.parent} does not exist")


def _build(args: argparse.Namespace) -> int:
    from data_pipeline.build import build

    splits = build(
        args.src, args.out, shard_size=args.shard_size, workers=args.workers, val_fraction=args.val_fraction
    )
    for split, path in splits.items():
        print(_build_summary(split, path))
    return 0


def _index(args: argparse.Namespace) -> int:
    from data_pipeline.existing import index_existing
    from data_pipeline.manifest import load_manifest

    path = index_existing(args.dir, args.out)
    manifest = load_manifest(path.parent)[0]
    print(
        f"indexed {_n(manifest.num_samples, 'sample')} in {_n(len(manifest.shards), 'shard')} of "
        f"{args.dir} ({manifest.num_classes} classes, {manifest.label_kind}-label, labels from "
        f".{manifest.label_ext}); manifest: {path}"
    )
    return 0


def _audit(args: argparse.Namespace) -> int:
    """Exit 1 (not 2) when the audit finds bad samples: the data is damaged, the command was right."""
    from data_pipeline.audit import audit, check_files
    from data_pipeline.manifest import dataset_dirs

    datasets = dataset_dirs(args.dir)
    for dataset in datasets:
        check_files(dataset)  # all of them first: a failing audit writes nothing
    bad = False
    for dataset in datasets:
        report = audit(dataset, num_threads=args.threads)
        print(f"{dataset}: {report.summary()}")
        bad |= bool(report.corrupt or report.truncated)
    return 1 if bad else 0


def _preview(args: argparse.Namespace) -> int:
    dataset = _one_dataset(args.dir)
    _check_png_out(args.out)
    from data_pipeline.preview import preview

    layers, magnitude = args.randaugment
    cfg = DataConfig(
        train=str(dataset),
        randaugment_layers=layers,
        randaugment_magnitude=magnitude,
        mixup_alpha=args.mixup,
        output_dtype="fp32",
    )
    print(f"wrote {preview(cfg, args.out, image_size=args.image_size, count=args.count)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    dataset = _one_dataset(args.dir)
    from data_pipeline.preview import bench

    cfg = DataConfig(train=str(dataset), batch_size=args.batch_size, num_threads=args.threads)
    rate = bench(cfg, image_size=args.image_size, batches=args.batches)
    print(f"{rate:.0f} images/s ({args.threads} threads, batch {args.batch_size}, {args.image_size}px)")
    return 0


COMMANDS = {"build": _build, "index": _index, "audit": _audit, "preview": _preview, "bench": _bench}
NOTES = logging.StreamHandler(sys.stdout)  # what the commands report besides their result


def main(argv: list[str] | None = None) -> int:
    """Entry point of `coatnet-data`."""
    parser = _parser()
    args = parser.parse_args(argv)
    notes = logging.getLogger("data_pipeline")
    notes.setLevel(logging.INFO)
    if NOTES not in notes.handlers:
        notes.addHandler(NOTES)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception's text holds
        print(f"coatnet-data {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
