"""The documentation is true as printed: the files it points to exist and its local commands run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pretrain.dist import free_port
from tests.helpers.launch import BIN, REPO, tail

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".sh", ".sbatch", ".toml"}


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if Path(line).suffix in TEXT_SUFFIXES]


def test_every_cited_document_exists() -> None:
    files = tracked_text_files()
    assert len(files) > 50
    cited = {
        (f.relative_to(REPO), ref)
        for f in files
        for ref in re.findall(r"\bdocs/[\w./-]+\.md\b", f.read_text(errors="replace"))
    }
    missing = sorted((str(f), ref) for f, ref in cited if not (REPO / ref).is_file())
    assert cited and missing == []
    outside = [
        str(f.relative_to(REPO))
        for f in files
        if f != Path(__file__) and "shared/" + "notes" in f.read_text(errors="replace")
    ]
    assert outside == [], "cites notes that are not in the repository"


def test_markdown_links_point_to_files() -> None:
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster" / "README.md"]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}"


def readme_block(heading: str) -> list[str]:
    """The command lines of the first bash block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    block = section[
        section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)
    ]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    first = text[text.index("```bash") : text.index("```", text.index("```bash") + 7)]
    assert [line.split("#")[0].strip() for line in first.splitlines()[1:]] == ["make demo", "make test"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_readme_local_run_commands_work_as_printed(tmp_path: Path, digits_shards: Path) -> None:
    """In a folder laid out as a checkout after `make demo` (configs, and the digits shards under
    demo_out/data/), every line of the README's "Local runs" block, exactly as printed."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "demo_out" / "data").mkdir(parents=True)
    (tmp_path / "demo_out" / "data" / "digits").symlink_to(digits_shards)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    lines = readme_block("## Local runs")
    assert len(lines) >= 4 and lines[0].startswith("coatnet-train --config configs/smoke.yaml")
    for line in lines:
        args = shlex.split(line)
        if args[0] == "deepspeed":
            args[1:1] = ["--master_port", str(free_port())]  # parallel test runs must not collide
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{line}\n{tail(proc)}"
    assert (tmp_path / "runs" / "smoke" / "metrics.jsonl").exists()
    assert (tmp_path / "runs" / "smoke-2" / "metrics.jsonl").exists()
    assert (tmp_path / "runs" / "smoke-export.safetensors").exists()
