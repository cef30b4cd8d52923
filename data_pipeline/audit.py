"""`coatnet-data audit`: decode every sample once with the loader's decoder; write the blocklist.

Checks, per shard: the checksum against the manifest; every index entry lies inside the tar (a truncated
shard would otherwise crash DALI with SIGSEGV); every image decodes with DALI's decoder (one corrupt JPEG
otherwise ends the whole pipeline, or the process: see `data_pipeline.decode_probe`). Samples that fail go
to `blocklist.json` next to the manifest; the loaders drop them from the sample universe, so they never
reach a decoder.

`data_pipeline.decode_probe.find_undecodable` is also what the training loader uses to name the culprit
when a pipeline fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.decode_probe import DecodeProbe, find_undecodable
from data_pipeline.manifest import MANIFEST_NAME, Blocklist, load_manifest, save_blocklist, sha256_file
from data_pipeline.tarindex import check_bounds, read_index, read_member


@dataclass
class AuditReport:
    """What the audit found; `blocklist` is what it wrote."""

    shards: int = 0
    samples: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    truncated: list[tuple[str, str]] = field(default_factory=list)
    checksum_mismatch: list[str] = field(default_factory=list)
    blocklist: Path | None = None

    def summary(self, show: int = 5) -> str:
        """A few lines for the terminal, naming the first `show` bad samples of each kind."""
        lines = [
            f"audited {self.samples} samples in {self.shards} shards: {len(self.corrupt)} undecodable, "
            f"{len(self.truncated)} past the end of a truncated shard, {len(self.checksum_mismatch)} shards "
            f"with a checksum that differs from the manifest; blocklist: {self.blocklist}"
        ]
        for what, found in (("undecodable", self.corrupt), ("truncated", self.truncated)):
            if found:
                names = ", ".join(f"{shard}/{key}" for shard, key in found[:show])
                more = f" and {len(found) - show} more" if len(found) > show else ""
                lines.append(f"  {what}: {names}{more}")
        if self.checksum_mismatch:
            more = (
                f" and {len(self.checksum_mismatch) - show} more"
                if len(self.checksum_mismatch) > show
                else ""
            )
            lines.append(f"  checksum differs: {', '.join(self.checksum_mismatch[:show])}{more}")
        return "\n".join(lines)


def check_files(dataset_dir: str | Path) -> None:
    """Raise FileNotFoundError naming the first shard or index file of `dataset_dir` that is missing
    (before an audit starts, so that a failing audit writes nothing)."""
    manifest, shard_dir, index_dir = load_manifest(dataset_dir)
    for info in manifest.shards:
        for path in (shard_dir / info.name, index_dir / info.index):
            if not path.is_file():
                raise FileNotFoundError(f"{path}, listed in {Path(dataset_dir) / MANIFEST_NAME}, is missing")


def audit(
    dataset_dir: str | Path, *, decoder: str = "cpu", device_id: int | None = None, num_threads: int = 2
) -> AuditReport:
    """Audit every shard of `dataset_dir` and (re)write its blocklist.json."""
    from tqdm import tqdm

    check_files(dataset_dir)
    manifest, shard_dir, index_dir = load_manifest(dataset_dir)
    report, blocklist = AuditReport(), Blocklist()
    with DecodeProbe(decoder, device_id, num_threads) as probe:
        for info in tqdm(manifest.shards, desc="audit", unit="shard", disable=None):
            tar, entries = shard_dir / info.name, read_index(index_dir / info.index)
            report.shards += 1
            report.samples += len(entries)
            if sha256_file(tar) != info.sha256:
                report.checksum_mismatch.append(info.name)
            outside = set(check_bounds(entries, tar))
            for key in sorted(outside):
                blocklist.add(info.name, key, "truncated: data past the end of the tar")
                report.truncated.append((info.name, key))
            inside = [e for e in entries if e.key not in outside]
            blobs = []
            for entry in inside:
                comp = entry.component(manifest.image_ext)
                blobs.append(read_member(tar, comp) if comp else b"")
            for i in find_undecodable(blobs, probe):
                blocklist.add(info.name, inside[i].key, "undecodable image")
                report.corrupt.append((info.name, inside[i].key))
    report.blocklist = save_blocklist(blocklist, dataset_dir)
    return report


def report_json(report: AuditReport) -> str:
    """The report as JSON (for scripts)."""
    return json.dumps(
        {
            "shards": report.shards,
            "samples": report.samples,
            "corrupt": report.corrupt,
            "truncated": report.truncated,
            "checksum_mismatch": report.checksum_mismatch,
            "blocklist": str(report.blocklist),
        },
        indent=1,
    )
