"""`coatnet-data`: build, index, audit, preview and bench webdataset shards for the CoAtNet loaders."""

from __future__ import annotations

import argparse
import sys

from data_pipeline.config import DataConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coatnet-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="image folder tree or list file -> shards + indexes + manifest")
    p.add_argument(
        "src", help="ImageNet-style folder (SRC/<class>/<image>) or a list file '<path> <label>...'"
    )
    p.add_argument("out", help="output directory (gets train/ and, with --val-fraction, val/)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction held out, by path hash")
    p = sub.add_parser("index", help="write DALI indexes + a manifest for existing webdataset shards")
    p.add_argument("dir", help="directory of *.tar shards")
    p.add_argument("--out", default=None, help="write indexes and manifest here (read-only shards)")
    p = sub.add_parser("audit", help="decode every sample once; write blocklist.json")
    p.add_argument("dir", help="dataset directory (with manifest.json)")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("preview", help="grid of augmented training samples with labels")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--randaugment", type=int, nargs=2, default=(0, 9), metavar=("LAYERS", "MAGNITUDE"))
    p.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha")
    p = sub.add_parser("bench", help="training loader images/s")
    p.add_argument("dir")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=20)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `coatnet-data`."""
    args = _parser().parse_args(argv)
    if args.command == "build":
        from data_pipeline.build import build

        for split, path in build(
            args.src,
            args.out,
            shard_size=args.shard_size,
            workers=args.workers,
            val_fraction=args.val_fraction,
        ).items():
            from data_pipeline.manifest import load_manifest

            manifest = load_manifest(path)[0]
            print(
                f"{split}: {path} ({manifest.num_samples} samples, {len(manifest.shards)} shards, {manifest.stats})"
            )
    elif args.command == "index":
        from data_pipeline.existing import index_existing

        print(f"manifest: {index_existing(args.dir, args.out)}")
    elif args.command == "audit":
        from data_pipeline.audit import audit

        report = audit(args.dir, num_threads=args.threads)
        print(report.summary())
        return 1 if report.corrupt or report.truncated else 0
    elif args.command == "preview":
        from data_pipeline.preview import preview

        cfg = DataConfig(
            train=args.dir,
            randaugment_layers=args.randaugment[0],
            randaugment_magnitude=args.randaugment[1],
            mixup_alpha=args.mixup,
            output_dtype="fp32",
        )
        print(f"wrote {preview(cfg, args.out, image_size=args.image_size, count=args.count)}")
    elif args.command == "bench":
        from data_pipeline.preview import bench

        cfg = DataConfig(train=args.dir, batch_size=args.batch_size, num_threads=args.threads)
        rate = bench(cfg, image_size=args.image_size, batches=args.batches)
        print(f"{rate:.0f} images/s ({args.threads} threads, batch {args.batch_size}, {args.image_size}px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
