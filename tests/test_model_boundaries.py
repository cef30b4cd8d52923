"""Model code knows nothing about distribution: no torch.distributed, DeepSpeed, logging set-up or ranks."""

from __future__ import annotations

import ast
from pathlib import Path

import pretrain.model

MODEL_DIR = Path(pretrain.model.__file__).parent
FORBIDDEN_MODULES = ("torch.distributed", "deepspeed", "logging")
FORBIDDEN_NAMES = {"get_rank", "get_world_size", "is_initialized", "RANK", "LOCAL_RANK", "WORLD_SIZE"}


def violations(source: str) -> list[str]:
    """Forbidden imports, attribute chains (``torch.distributed.x``) and rank names in one file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith(FORBIDDEN_MODULES)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith(FORBIDDEN_MODULES) or (
                module == "torch" and any(a.name == "distributed" for a in node.names)
            ):
                found.append(module)
        elif isinstance(node, ast.Attribute):
            chain = ast.unparse(node)
            if chain.startswith(FORBIDDEN_MODULES) or node.attr in FORBIDDEN_NAMES:
                found.append(chain)
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.Constant) and node.value in FORBIDDEN_NAMES:
            found.append(repr(node.value))  # os.environ["RANK"]
    return found


def test_checker_catches_each_kind_of_violation():
    bad = [
        "import torch.distributed as dist",
        "from torch import distributed",
        "from deepspeed import zero",
        "import logging",
        "import torch\nx = torch.distributed.get_rank()",
        "import os\nr = os.environ['LOCAL_RANK']",
        "from x import get_rank\nget_rank()",
    ]
    for source in bad:
        assert violations(source), source
    assert violations("import torch\nfrom torch import nn\nx = torch.zeros(1)") == []


def test_model_package_is_free_of_distribution_code():
    files = sorted(MODEL_DIR.glob("*.py"))
    assert len(files) >= 5  # the scan really looks at the package
    found = {f.name: v for f in files if (v := violations(f.read_text()))}
    assert found == {}
