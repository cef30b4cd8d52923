"""`coatnet-data build` and `index` on real images: quirks, determinism, resume, published tar formats."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.build import build
from data_pipeline.config import DataConfig
from data_pipeline.existing import index_existing
from data_pipeline.loader import build_train_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.sample_data import write_digits_folder, write_quirk_images
from data_pipeline.tarindex import read_index


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def read_all(dataset: Path) -> dict[str, dict]:
    manifest, shard_dir, _ = load_manifest(dataset)
    samples = {}
    for shard in manifest.shards:
        for sample in wds.WebDataset(str(shard_dir / shard.name), shardshuffle=False):
            samples[f"{shard.name}/{sample['__key__']}"] = sample
    return samples


@pytest.fixture(scope="module")
def quirk_build(tmp_path_factory):
    src = write_digits_folder(tmp_path_factory.mktemp("quirk_src"), image_size=40, limit=30)
    quirks = write_quirk_images(src / "3")
    before = tree_hash(src)
    out = build(src, tmp_path_factory.mktemp("quirk_wds"), shard_size=8, workers=2)
    return src, quirks, before, out["train"]


def test_quirky_images_become_rgb_jpeg_and_are_counted(quirk_build):
    src, _, before, train = quirk_build
    manifest = load_manifest(train)[0]
    assert manifest.stats == {
        "converted_cmyk_jpeg": 1,
        "converted_grayscale_jpeg": 1,
        "converted_png": 2,  # the RGB and the RGBA PNG
        "converted_png_named_jpeg": 1,
        "stored": 30,
        "unreadable": 1,  # the truncated JPEG is left out
    }
    skipped = json.loads((train / "skipped.json").read_text())
    assert list(skipped) == ["3/quirk_truncated.jpg"]
    assert skipped["3/quirk_truncated.jpg"].startswith("unreadable: cannot decode image")
    samples = read_all(train)
    assert len(samples) == manifest.num_samples == 35
    stems = {p.stem for p in src.rglob("*") if p.is_file()} - {"quirk_truncated"}
    assert {k.split("/")[1] for k in samples} == stems, "every sample keeps its source file's stem as key"
    for sample in samples.values():
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
    assert tree_hash(src) == before, "inputs are never modified"


def test_index_matches_dalis_own_wds2idx(quirk_build, tmp_path):
    train = quirk_build[3]
    shard = load_manifest(train)[0].shards[0]
    theirs = tmp_path / "theirs.idx"
    subprocess.run(
        [str(Path(sys.executable).parent / "wds2idx"), str(train / shard.name), str(theirs)],
        check=True,
        capture_output=True,
    )
    assert read_index(theirs) == read_index(train / shard.index)


def test_build_is_deterministic_and_resumable(quirk_build, tmp_path):
    src, _, _, train = quirk_build
    first = load_manifest(train)[0]
    out = build(src, tmp_path / "again", shard_size=8)["train"]
    assert [s.sha256 for s in load_manifest(out)[0].shards] == [s.sha256 for s in first.shards]
    victim = out / first.shards[1].name
    victim.unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    build(src, tmp_path / "again", shard_size=8)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in mtimes} == mtimes
    assert victim.is_file(), "the missing shard is written again"
    assert load_manifest(out)[0].shards == first.shards


def test_split_depends_only_on_paths(digit_images, tmp_path):
    a = build(digit_images, tmp_path / "a", shard_size=50, val_fraction=0.25)
    b = build(digit_images, tmp_path / "b", shard_size=7, val_fraction=0.25)
    labels_a = sorted(s["cls"] for s in read_all(a["val"]).values())
    labels_b = sorted(s["cls"] for s in read_all(b["val"]).values())
    assert labels_a == labels_b and 20 < len(labels_a) < 80
    assert load_manifest(a["train"])[0].num_samples + len(labels_a) == 200


def write_pax_shards(src_tar_dir: Path, out: Path) -> None:
    """Re-pack built shards with Python's tarfile in PAX format (long member names force PAX headers)."""
    out.mkdir()
    for tar in sorted(src_tar_dir.glob("*.tar")):
        with tarfile.open(tar) as inp, tarfile.open(out / tar.name, "w", format=tarfile.PAX_FORMAT) as dst:
            for member in inp:
                data = inp.extractfile(member).read()
                key, ext = member.name.split(".", 1)
                info = tarfile.TarInfo(f"{'sample_' * 12}{key}.{ext}")
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))


def write_gnu_shards(src_tar_dir: Path, out: Path, scratch: Path) -> None:
    """Re-pack built shards with GNU tar (`tar --format=gnu`), as many published datasets are."""
    out.mkdir()
    for tar in sorted(src_tar_dir.glob("*.tar")):
        folder = scratch / tar.stem
        folder.mkdir(parents=True)
        with tarfile.open(tar) as inp:
            names = [m.name for m in inp]
            inp.extractall(folder, filter="data")
        subprocess.run(
            ["tar", "--format=gnu", "-cf", str(out / tar.name), "-C", str(folder), *names], check=True
        )


@pytest.mark.parametrize("kind", ["gnu", "pax"])
def test_index_published_read_only_shards(digit_wds, tmp_path, kind):
    shards = tmp_path / "published"
    if kind == "gnu":
        write_gnu_shards(digit_wds["val"], shards, tmp_path / "scratch")
    else:
        write_pax_shards(digit_wds["val"], shards)
    os.chmod(shards, 0o555)
    try:
        index_existing(shards, tmp_path / "indexed")
    finally:
        os.chmod(shards, 0o755)
    assert not list(shards.glob("*.idx")), "read-only shards are left alone"
    manifest = load_manifest(tmp_path / "indexed")[0]
    assert manifest.num_samples == load_manifest(digit_wds["val"])[0].num_samples
    cfg = DataConfig(train=str(tmp_path / "indexed"), batch_size=4, num_threads=1, output_dtype="fp32")
    loader = build_train_loader(cfg, image_size=32, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    seen = set()
    for _ in range(loader.micro_steps_per_epoch):
        images, labels = next(loader)
        seen.update(loader.last_ids)
        assert torch.isfinite(images).all() and labels.max() < manifest.num_classes
    loader.close()
    assert len(seen) == manifest.num_samples


def test_cli_preview_and_audit(digit_wds, tmp_path, copy_dataset):
    cli = str(Path(sys.executable).parent / "coatnet-data")
    grid = tmp_path / "grid.png"
    args = ["preview", str(digit_wds["train"]), "--out", str(grid), "--image-size", "64", "--count", "6"]
    subprocess.run([cli, *args, "--randaugment", "2", "9", "--mixup", "0.8"], check=True, capture_output=True)
    with Image.open(grid) as im:
        assert im.size == (3 * 64, 2 * (64 + 14))
        assert len(set(im.convert("L").getdata())) > 50, "the grid shows real pictures, not a blank canvas"
    audit = subprocess.run(
        [cli, "audit", str(copy_dataset(digit_wds["val"]))], capture_output=True, text=True
    )
    assert audit.returncode == 0 and "0 undecodable" in audit.stdout
