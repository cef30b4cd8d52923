"""Logging set-up: rank 0 (or every rank, on request) to the console, every rank to its own file.

Library code only calls `logging.getLogger(__name__)`; this is the one place that decides where the
records go, from the rank information of `pretrain.dist`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pretrain.dist import RankInfo

ROOT_LOGGERS = ("pretrain", "data_pipeline", "__main__")


def setup_logging(
    info: RankInfo, log_dir: Path | None, *, console_all_ranks: bool = False, level: int = logging.INFO
) -> None:
    """Route the project's loggers: console on rank 0 (or all ranks), a file `rank<R>.log` per rank."""
    prefix = f"[rank {info.rank}] " if info.world_size > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []
    if info.is_main or console_all_ranks:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        handlers.append(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_dir / f"rank{info.rank}.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s"))
        handlers.append(file)
    for name in ROOT_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    # DeepSpeed logs a lot at INFO on every rank; keep its warnings.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
