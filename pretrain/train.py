"""coatnet-train: pre-train or fine-tune a CoAtNet from a config file.

Runs as one plain process, under torchrun, under the `deepspeed` launcher (which calls
`python -m pretrain.train`), and under Slurm through cluster/pretrain.sbatch.

    coatnet-train --config configs/smoke.yaml optim.lr=5e-4 data.batch_size=16
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings

from pretrain.config import ConfigError, config_docs_markdown, load_config
from pretrain.configlib import dump_yaml

EXIT_CONFIG_ERROR = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="coatnet-train",
        description="Pre-train or fine-tune a CoAtNet with DeepSpeed ZeRO-3 on DALI-fed webdataset shards.",
        epilog="Every config key is documented in docs/config.md (or: coatnet-train --help-config).",
    )
    parser.add_argument(
        "--config",
        action="append",
        help="YAML config file (may name a base file to compose with); several compose in order",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides applied after the file, e.g. optim.lr=5e-4 data.batch_size=64",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and exit without writing anything",
    )
    parser.add_argument("--help-config", action="store_true", help="print every config key with its meaning")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.config and not args.help_config:
        parser.error("--config FILE is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        sys.stdout.write(config_docs_markdown())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"coatnet-train: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0

    from pretrain.checkpoint import ResumeRefused, SaveFailed
    from pretrain.run_dir import RunRefused
    from pretrain.signing import Untrusted
    from pretrain.trainer import Trainer  # heavy imports (deepspeed, DALI) only for a real run

    # torch 2.13 warns on every ZeRO-3 step that DeepSpeed calls renamed collectives (all_gather_into_tensor,
    # reduce_scatter_tensor); nothing for users to do.
    warnings.filterwarnings("ignore", message=r".*_tensor.* is deprecated", category=FutureWarning)

    try:
        trainer = Trainer.build(cfg)
    except (ConfigError, FileNotFoundError, RunRefused, ResumeRefused, Untrusted) as exc:
        print(f"coatnet-train: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    outcome: int | BaseException | None = None  # tells the MLflow run how the job ended
    try:
        outcome = trainer.fit()
        return outcome
    except SaveFailed as exc:  # disk full: one line naming the folder and the bytes needed
        outcome = exc
        print(f"coatnet-train: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        outcome = exc
        # Said before `close`: tearing down the process group lets the other ranks fail, and their
        # launcher then kills this process before it could print why it failed (seen: an undecodable
        # JPEG met by rank 1 only, whose message never reached the job's output).
        logging.getLogger("pretrain.train").error("training failed: %s", exc)
        traceback.print_exc()
        return 1
    except BaseException as exc:
        outcome = exc
        raise
    finally:
        trainer.close(outcome)


def cli() -> None:
    """`coatnet-train` and `python -m pretrain.train`: `main`, then an exit that gloo's threads cannot abort."""
    import faulthandler

    from pretrain import dist

    # A crash in native code (DALI, gloo/NCCL, a CUDA kernel) prints every thread's Python stack to
    # stderr, which the launchers forward: the job's output then says where a rank died.
    faulthandler.enable()
    dist.run_and_exit(main)


if __name__ == "__main__":
    cli()
