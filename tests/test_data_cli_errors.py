"""`coatnet-data` on user mistakes: one line on stderr naming the file or argument, exit 2, nothing written.

Every mistake runs through the real command (`python -m data_pipeline.cli` in a subprocess) on real
images (scikit-learn's digit scans, tiny). The other tests pin the behaviour that replaced a crash or a
surprise: the val split checked before writing, missing list entries skipped and listed, stale shards of
an earlier build removed, keys that lead back to the source file, `.json` labels in `index`, unsafe tar
member names refused, `audit` on a build's output folder.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from data_pipeline.build import build
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.manifest import Blocklist, label_ids, load_manifest, save_blocklist
from data_pipeline.sample_data import write_digits_folder
from data_pipeline.tarindex import read_index, read_member, scan_tar

ROOT = Path(__file__).resolve().parents[1]


def coatnet_data(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time (files) or 0, 0 (folders)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (0, 0)
        for p in root.rglob("*")
    }


def assert_refused(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, exactly one line on stderr that names each of `names`, no traceback; return the line."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """24 digit scans of 24 px in 10 class folders (only ever read)."""
    return write_digits_folder(tmp_path_factory.mktemp("cli_digits"), image_size=24, limit=24)


@pytest.fixture(scope="module")
def built(tmp_path_factory, digits) -> Path:
    """The output folder of a build with a val split (train/, val/); only ever read."""
    out = tmp_path_factory.mktemp("cli_built")
    build(digits, out, shard_size=8, val_fraction=0.3)
    return out


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg_of(digits: Path) -> bytes:
    return sorted(digits.rglob("*.jpg"))[0].read_bytes()


# -- every mistake: one line, exit 2, nothing written ---------------------------------------------------
def _make_mistake(kind: str, tmp: Path, digits: Path, built: Path) -> tuple[list, list[str]]:
    """Lay out what mistake `kind` needs under `tmp`; return (arguments, names the message must hold)."""
    out = tmp / "out"
    if kind == "missing source":
        return ["build", tmp / "no_such_folder", out], ["no_such_folder"]
    if kind == "folder without class folders":
        (tmp / "flat").mkdir()
        (tmp / "flat" / "0.jpg").write_bytes(jpeg_of(digits))
        return ["build", tmp / "flat", out], ["flat", "class"]
    if kind == "class folders without images":
        for name in ("cat", "dog"):
            (tmp / "src" / name).mkdir(parents=True)
            (tmp / "src" / name / "notes.txt").write_text("no images here")
        return ["build", tmp / "src", out], ["src", "no images"]
    if kind == "val fraction 1.5":
        return ["build", digits, out, "--val-fraction", "1.5"], ["--val-fraction", "1.5"]
    if kind == "val fraction leaves val empty":
        return ["build", digits, out, "--val-fraction", "0.001"], ["--val-fraction", "val split"]
    if kind == "val fraction leaves val empty, over an earlier build":
        build(digits, out, shard_size=8, val_fraction=0.3)
        return ["build", digits, out, "--val-fraction", "0.001"], ["--val-fraction", "val split"]
    if kind == "output is a file":
        (tmp / "out.txt").write_text("precious")
        return ["build", digits, tmp / "out.txt"], ["out.txt", "not a directory"]
    if kind == "output inside the source":
        src = tmp / "src"
        for path in sorted(digits.rglob("*.jpg"))[:4]:
            (src / path.parent.name).mkdir(parents=True, exist_ok=True)
            (src / path.parent.name / path.name).write_bytes(path.read_bytes())
        return ["build", src, src / "shards"], ["shards", "inside the source"]
    if kind == "list file that is an image":
        return ["build", sorted(digits.rglob("*.jpg"))[0], out], ["not a text list file"]
    if kind == "list file naming a path twice":
        image = sorted(digits.rglob("*.jpg"))[0]
        (tmp / "list.txt").write_text(f"{image} 1\n{image} 2\n")
        return ["build", tmp / "list.txt", out], ["list.txt line 2", "line 1"]
    if kind == "workers 0":
        return ["build", digits, out, "--workers", "0"], ["--workers"]
    if kind == "shard size 0":
        return ["build", digits, out, "--shard-size", "0"], ["--shard-size"]
    if kind == "index on an empty folder":
        (tmp / "shards").mkdir()
        return ["index", tmp / "shards"], ["shards", "*.tar"]
    if kind == "index on a missing folder":
        return ["index", tmp / "nowhere"], ["nowhere"]
    if kind == "index --out is a file":
        (tmp / "shards").mkdir()
        write_tar(tmp / "shards" / "a.tar", {"k.jpg": jpeg_of(digits), "k.cls": b"1"})
        (tmp / "taken").write_text("")
        return ["index", tmp / "shards", "--out", tmp / "taken"], ["--out", "taken"]
    if kind == "index on a shard that is not a tar":
        (tmp / "shards").mkdir()
        (tmp / "shards" / "bad.tar").write_bytes(b"not a tar" * 100)
        return ["index", tmp / "shards"], ["bad.tar"]
    if kind == "index on a sample without a label":
        (tmp / "shards").mkdir()
        write_tar(tmp / "shards" / "a.tar", {"k1.jpg": jpeg_of(digits), "k1.cls": b"1"})
        write_tar(tmp / "shards" / "b.tar", {"k2.jpg": jpeg_of(digits), "k2.txt": b"a caption"})
        return ["index", tmp / "shards"], ["b.tar", "label"]
    if kind == "audit without manifest":
        (tmp / "data").mkdir()
        return ["audit", tmp / "data"], [str(tmp / "data" / "manifest.json")]
    if kind == "audit with a missing index":
        data = tmp / "data"
        subprocess.run(["cp", "-r", str(built / "train"), str(data)], check=True)
        victim = load_manifest(data)[0].shards[-1].index
        (data / victim).unlink()
        return ["audit", data], [victim, "missing"]
    if kind == "audit --threads 0":
        return ["audit", built, "--threads", "0"], ["--threads"]
    if kind == "preview without manifest":
        (tmp / "data").mkdir()
        return ["preview", tmp / "data", "--out", tmp / "grid.png"], ["manifest.json"]
    if kind == "preview on a build's output folder":
        return ["preview", built, "--out", tmp / "grid.png"], [str(built / "train"), str(built / "val")]
    if kind == "preview --count 0":
        return ["preview", built / "train", "--out", tmp / "grid.png", "--count", "0"], ["--count"]
    if kind == "preview --out in a missing folder":
        return ["preview", built / "train", "--out", tmp / "no" / "grid.png"], [str(tmp / "no")]
    if kind == "preview --randaugment out of range":
        return ["preview", built / "train", "--out", tmp / "g.png", "--randaugment", "9", "9"], ["LAYERS"]
    if kind == "bench --batch-size 0":
        return ["bench", built / "train", "--batch-size", "0"], ["--batch-size"]
    if kind == "bench --batches 0":
        return ["bench", built / "train", "--batches", "0"], ["--batches"]
    if kind == "bench --threads 0":
        return ["bench", built / "train", "--threads", "0"], ["--threads"]
    raise AssertionError(kind)


MISTAKES = [
    "missing source",
    "folder without class folders",
    "class folders without images",
    "val fraction 1.5",
    "val fraction leaves val empty",
    "val fraction leaves val empty, over an earlier build",
    "output is a file",
    "output inside the source",
    "list file that is an image",
    "list file naming a path twice",
    "workers 0",
    "shard size 0",
    "index on an empty folder",
    "index on a missing folder",
    "index --out is a file",
    "index on a shard that is not a tar",
    "index on a sample without a label",
    "audit without manifest",
    "audit with a missing index",
    "audit --threads 0",
    "preview without manifest",
    "preview on a build's output folder",
    "preview --count 0",
    "preview --out in a missing folder",
    "preview --randaugment out of range",
    "bench --batch-size 0",
    "bench --batches 0",
    "bench --threads 0",
]


@pytest.mark.parametrize("kind", MISTAKES)
def test_mistake_is_one_line_exit_2_and_writes_nothing(kind, tmp_path, digits, built):
    args, names = _make_mistake(kind, tmp_path, digits, built)
    before, built_before = snapshot(tmp_path), snapshot(built)
    assert_refused(coatnet_data(*args, cwd=tmp_path), *names)
    assert snapshot(tmp_path) == before, "nothing is written, nothing is changed"
    assert snapshot(built) == built_before
    assert not list(tmp_path.rglob("*.tmp"))


# -- what replaced the crashes and surprises ------------------------------------------------------------
def test_val_split_size_is_checked_before_anything_is_written(tmp_path, digits):
    result = coatnet_data("build", digits, tmp_path / "out", "--val-fraction", "0.001", cwd=tmp_path)
    assert_refused(result, "--val-fraction 0.001", f"{len(list(digits.rglob('*.jpg')))} images", "val split")
    assert not (tmp_path / "out").exists()
    val = build(digits, tmp_path / "out", val_fraction=0.3)["val"]
    assert load_manifest(val)[0].num_samples > 0, "a fraction that does hold images builds"


def test_missing_and_unreadable_list_entries_are_skipped_counted_and_listed(tmp_path, digits):
    images = sorted(digits.rglob("*.jpg"))[:6]
    (tmp_path / "garbage.jpg").write_bytes(b"not a jpeg at all")
    lines = [f"{p} {p.parent.name}" for p in images] + ["gone/absent.jpg 3", "garbage.jpg 4"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    result = coatnet_data("build", tmp_path / "list.txt", tmp_path / "out", "--shard-size", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train = tmp_path / "out" / "train"
    manifest = load_manifest(train)[0]
    assert manifest.num_samples == 6
    assert manifest.stats == {"missing": 1, "stored": 6, "unreadable": 1}
    skipped = json.loads((train / "skipped.json").read_text())
    assert set(skipped) == {"gone/absent.jpg", "garbage.jpg"}
    assert skipped["gone/absent.jpg"].startswith("missing") and skipped["garbage.jpg"].startswith(
        "unreadable"
    )
    assert "gone/absent.jpg" in result.stdout and "garbage.jpg" in result.stdout, result.stdout
    assert "BytesIO" not in result.stdout + result.stderr
    assert "{" not in result.stdout, "the summary is words, not a Python dict"
    assert "6 samples in 3 shards" in result.stdout and "2 files (1 missing, 1 unreadable)" in result.stdout
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_build_where_nothing_is_readable_leaves_nothing(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "list.txt").write_text("garbage.jpg 0\nabsent.jpg 1\n")
    with pytest.raises(ValueError, match=r"none of the 2 images .* garbage\.jpg"):
        build(tmp_path / "list.txt", tmp_path / "out" / "deep")
    assert not (tmp_path / "out").exists()


def shard_files(split_dir: Path) -> set[str]:
    return {p.name for p in split_dir.iterdir() if p.name.endswith((".tar", ".idx", ".done.json", ".tmp"))}


def test_rebuild_with_another_shard_size_removes_stale_shards_and_blocklist(tmp_path, digits):
    out = tmp_path / "out"
    build(digits, out, shard_size=3, val_fraction=0.3)
    train = out / "train"
    save_blocklist(Blocklist({"train-000007.tar": {"00001": "undecodable image"}}), train)
    (train / "notes.txt").write_text("the user's own file")
    result = coatnet_data("build", digits, out, "--shard-size", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(train)[0]
    listed = {s.name for s in manifest.shards} | {s.index for s in manifest.shards}
    assert shard_files(train) == listed | {s.name + ".done.json" for s in manifest.shards}
    assert manifest.num_samples == len(list(digits.rglob("*.jpg"))), "the val split is folded back in"
    assert not (train / "blocklist.json").exists(), "an audit of other shards no longer applies"
    assert (train / "notes.txt").read_text() == "the user's own file"
    assert not (out / "val").exists(), "the val split of the earlier build is removed, not left to leak"
    assert "stale shards" in result.stdout and "blocklist.json" in result.stdout, result.stdout


def test_rerun_of_the_same_build_keeps_its_blocklist(tmp_path, digits):
    out = tmp_path / "out"
    build(digits, out, shard_size=8)
    save_blocklist(Blocklist({"train-000000.tar": {"00001": "undecodable image"}}), out / "train")
    build(digits, out, shard_size=8)
    assert (out / "train" / "blocklist.json").is_file(), "same shards, same audit"


def test_keys_are_the_source_stems(tmp_path, digits):
    """Keys lead back to the file: its stem, dots and spaces replaced, repeated stems made unique."""
    jpegs = sorted(digits.rglob("*.jpg"))[:4]
    names = {
        "cat/img.v1.jpg": jpegs[0],
        "dog/img.v1.jpg": jpegs[1],  # the same stem in another class
        "dog/photo 1.jpg": jpegs[2],
        "dog/ok-name_2.jpg": jpegs[3],
    }
    for rel, source in names.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(source.read_bytes())
    train = build(tmp_path / "src", tmp_path / "out", shard_size=2)["train"]
    manifest = load_manifest(train)[0]
    by_key = {}
    for shard in manifest.shards:
        for sample in read_index(train / shard.index):
            by_key[sample.key] = read_member(train / shard.name, sample.component("jpg"))
    assert {"photo_1", "ok-name_2"} <= set(by_key)
    twins = sorted(k for k in by_key if k.startswith("img_v1_"))
    assert len(twins) == 2 and len(by_key) == 4
    for key, data in by_key.items():
        # RGB JPEGs are stored byte for byte: each key's image is the file whose stem the key carries
        sources = [rel for rel in names if key.startswith(Path(rel).stem.replace(".", "_").replace(" ", "_"))]
        assert any(names[rel].read_bytes() == data for rel in sources), key


def test_keys_do_not_change_with_the_shard_size(tmp_path, digits):
    def keys(out: Path) -> set[str]:
        train = out / "train"
        return {s.key for sh in load_manifest(train)[0].shards for s in read_index(train / sh.index)}

    build(digits, tmp_path / "a", shard_size=5)
    build(digits, tmp_path / "b", shard_size=7)
    assert keys(tmp_path / "a") == keys(tmp_path / "b") == {p.stem for p in digits.rglob("*.jpg")}


def test_list_entries_outside_the_list_folder_get_safe_member_names(tmp_path, digits):
    (tmp_path / "lists").mkdir()
    image = sorted(digits.rglob("*.jpg"))[0]
    rel = os.path.relpath(image, tmp_path / "lists")
    assert rel.startswith("..")
    (tmp_path / "lists" / "list.txt").write_text(f"{rel} 0\n")
    train = build(tmp_path / "lists" / "list.txt", tmp_path / "out")["train"]
    with tarfile.open(train / "train-000000.tar") as tar:
        assert sorted(tar.getnames()) == [f"{image.stem}.cls", f"{image.stem}.jpg"]


@pytest.mark.parametrize(
    "labels, kind, num_classes",
    [
        ({"a": b'{"label": 3}', "b": b'{"label": 0, "file": "b.jpg"}'}, "single", 4),
        ({"a": b"2", "b": b"5"}, "single", 6),
        ({"a": b'{"labels": [1, 4]}', "b": b"[2]"}, "multi", 5),
    ],
)
def test_index_accepts_json_labels(tmp_path, digits, labels, kind, num_classes):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (key, label) in enumerate(labels.items()):
        write_tar(shards / f"part-{i}.tar", {f"{key}.jpg": jpeg_of(digits), f"{key}.json": label})
    result = coatnet_data("index", shards, "--out", tmp_path / "indexed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "labels from .json" in result.stdout, result.stdout
    manifest, shard_dir, index_dir = load_manifest(tmp_path / "indexed")
    assert (manifest.label_kind, manifest.label_ext, manifest.num_classes) == (kind, "json", num_classes)
    for info, (key, label) in zip(manifest.shards, labels.items()):
        (sample,) = read_index(index_dir / info.index)
        assert sample.key == key
        blob = read_member(shard_dir / info.name, sample.component(manifest.label_ext))
        assert label_ids(blob, manifest.label_encoding) == label_ids(label, "json")
    # The training loader reads them too (the same parser).
    cfg = DataConfig(train=str(tmp_path / "indexed"), batch_size=2, num_threads=1, output_dtype="fp32")
    loader = build_train_loader(cfg, image_size=32, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    try:
        _, got = next(loader)
        for row, sample_id in zip(got, loader.last_ids):
            ids = label_ids(labels[sample_id.split("/")[-1]], "json")
            assert (row.item() == ids[0]) if kind == "single" else (row.nonzero().flatten().tolist() == ids)
    finally:
        loader.close()


def test_index_refuses_a_json_label_that_is_not_class_ids(tmp_path, digits):
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "a.tar", {"k.jpg": jpeg_of(digits), "k.json": b'{"caption": "a cat"}'})
    assert_refused(coatnet_data("index", tmp_path / "shards", cwd=tmp_path), "a.tar", "sample k", ".json")
    assert (
        not list((tmp_path / "shards").glob("*.idx*"))
        and not (tmp_path / "shards" / "manifest.json").exists()
    )


@pytest.mark.parametrize("member", ["../escape.jpg", "/etc/escape.jpg", "sub/../../escape.jpg"])
def test_unsafe_tar_member_names_are_refused(tmp_path, digits, member):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "fine.tar", {"k.jpg": jpeg_of(digits), "k.cls": b"1"})
    write_tar(shards / "evil.tar", {member: jpeg_of(digits), member.replace(".jpg", ".cls"): b"1"})
    before = snapshot(tmp_path)
    assert_refused(coatnet_data("index", shards, cwd=tmp_path), "evil.tar", member)
    assert snapshot(tmp_path) == before, "no index of the earlier, fine shard is left either"
    with pytest.raises(ValueError, match=r"evil\.tar.*unsafe member name"):
        scan_tar(shards / "evil.tar")  # what `build` runs on every shard it writes


def test_audit_of_a_build_output_audits_both_splits_and_names_bad_samples(tmp_path, digits, built):
    out = tmp_path / "out"
    subprocess.run(["cp", "-r", str(built), str(out)], check=True)
    manifest = load_manifest(out / "train")[0]
    entry = read_index(out / "train" / manifest.shards[0].index)[1]
    _, offset, size, _ = entry.component("jpg")
    with open(out / "train" / manifest.shards[0].name, "r+b") as f:
        f.seek(offset + size // 3)
        f.write(bytes(size - size // 3))
    result = coatnet_data("audit", out, "--threads", "1", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # found bad data: not a usage error
    assert f"{out / 'train'}: audited" in result.stdout and f"{out / 'val'}: audited" in result.stdout
    assert f"undecodable: {manifest.shards[0].name}/{entry.key}" in result.stdout, result.stdout
    assert (out / "train" / "blocklist.json").is_file() and (out / "val" / "blocklist.json").is_file()
    assert any(p.stem == entry.key for p in digits.rglob("*.jpg")), "the reported key is a source stem"
