"""Module boundaries the design depends on, checked on the source (AST), so a violation fails CI.

- Model code knows nothing about distribution: no torch.distributed, DeepSpeed, logging set-up or ranks.
- Only pretrain/dist.py imports or calls torch.distributed (its helpers put tensors on the backend's
  device; a direct call elsewhere would be correct under gloo and crash under NCCL).
- The trainer never checks ranks itself (RunDir, the tracker and dist decide).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pretrain.model
from tests.helpers.launch import REPO

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


def distributed_uses(source: str) -> list[str]:
    """Imports of torch.distributed and `torch.distributed.*` attribute chains in one file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("torch.distributed")
            ]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("torch.distributed") or (
                module == "torch" and any(a.name == "distributed" for a in node.names)
            ):
                found.append(f"{node.lineno}: from {module} import ...")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_distributed_checker_catches_each_form():
    for source in (
        "import torch.distributed as dist",
        "import torch.distributed",
        "from torch import distributed",
        "from torch.distributed import all_reduce",
        "import torch\ntorch.distributed.barrier()",
    ):
        assert distributed_uses(source), source
    assert distributed_uses("from pretrain import dist\ndist.barrier()") == []


def test_only_dist_py_touches_torch_distributed():
    files = sorted([*(REPO / "pretrain").rglob("*.py"), *(REPO / "data_pipeline").rglob("*.py")])
    assert len(files) > 30
    found = {
        str(f.relative_to(REPO)): v
        for f in files
        if f != REPO / "pretrain" / "dist.py" and (v := distributed_uses(f.read_text()))
    }
    assert found == {}
    assert distributed_uses((REPO / "pretrain" / "dist.py").read_text())  # and dist.py really is the one


def test_trainer_does_not_check_ranks():
    """It hands the rank to the components that need it (loaders, state) but never branches on it."""
    tree = ast.parse((REPO / "pretrain" / "trainer.py").read_text())
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "is_main" not in attrs and "get_rank" not in attrs
    compared = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare) and "rank" in ast.unparse(n).replace("ranks", "")
    ]
    assert compared == []
