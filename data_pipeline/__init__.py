"""Input pipeline of the CoAtNet pre-training system: webdataset shards read by NVIDIA DALI.

Modules, in the order data flows through them:
- sources.py, build.py, outdir.py / existing.py: image folders, list files or published shards -> shards,
  DALI indexes, manifest (sources: what is read; outdir: the output folder, checks and leftovers).
- audit.py: decode everything once with DALI's decoder; blocklist what fails or lies past a truncation.
- manifest.py, tarindex.py, dataset.py: the on-disk formats and the sample universe (minus the blocklist).
- order.py: the epoch order, a pure function of (seed, epoch), and its cut into per-rank batches.
- segment.py: that order written as DALI index files, so DALI plays exactly the planned samples.
- pipeline.py: the DALI graphs (train: random resized crop, flip, RandAugment, normalise; eval: resize +
  center crop) and `placement`, the one place where CPU and GPU decoding differ.
- loader.py: TrainLoader / EvalLoader, the iterators and resumable state the trainer uses.
- mixup.py, preview.py, cli.py (`coatnet-data`), sample_data.py (real image corpora for tests and demos).

`config.DataConfig` is the `data:` section of the run config and imports neither DALI nor torch.
"""
