"""coatnet-plan: its memory model against DeepSpeed (estimator and real allocations), its activation
measurement, its speed and traffic arithmetic, and the command line.

The real-allocation check runs this file as a script in a fresh process (DeepSpeed on the CPU
accelerator, world size 1), like tests/test_model_zero3.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from pretrain import plan
from pretrain.config import EngineConfig, ModelConfig, load_config
from pretrain.dist import free_port
from pretrain.model import create_model
from tests.helpers.launch import CONFIGS, REPO

SMALL = {"depths": [1, 1, 1, 2, 1], "dims": [32, 32, 64, 128, 256], "head_dim": 32}
H100 = plan.Cluster(
    nodes=8,
    gpus_per_node=8,
    gpu_memory=80 * 2**30,
    peak_tflops=989.0,
    mfu=0.4,
    link_gbytes=50.0,
    reserve=4 * 2**30,
)


def small_model_config(image_size: int = 64) -> ModelConfig:
    return ModelConfig(name="coatnet_0", image_size=image_size, **SMALL)


# ---------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GiB", 80 * 2**30),
        ("80GB", 80 * 10**9),
        ("141 gb", 141 * 10**9),
        ("0.5TiB", 2**39),
        ("512MiB", 2**29),
    ],
)
def test_parse_memory_units(text, expected):
    assert plan.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80", "80 gigs", "GiB", ""])
def test_parse_memory_rejects_sizes_without_a_unit(text):
    with pytest.raises(ValueError, match="expected a number and a unit"):
        plan.parse_memory(text)


# ---------------------------------------------------------------------------------------------- DeepSpeed's estimator


def test_parameter_counts_match_deepspeeds_model_to_params():
    """Total and largest-layer parameters are counted exactly as DeepSpeed's estimator counts them."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = create_model("coatnet_0", num_classes=10, image_size=64, **SMALL)  # real CPU tensors
    total, _, largest = plan.model_parameter_stats(model)
    assert (total, largest) == model_to_params(model)


@pytest.mark.parametrize("name", ["coatnet5_jft", "coatnet6_jft", "coatnet7_jft"])
def test_model_states_agree_with_deepspeeds_estimator(name):
    """Term by term: DeepSpeed's 18 B/param/world + 4 B x largest layer is our bf16 parameters (2),
    fp32 master + Adam (12) and the fp32 gradients of the step (4), plus the gathered bf16 parameters
    and gradients of the largest layer. Our extra bf16 gradient partition (2 B/param/world) is what
    DeepSpeed really keeps beside them (checked against a real engine below)."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

    cfg = load_config(CONFIGS / f"{name}.yaml", ["engine.param_persistence_threshold=0"])
    profile = plan.profile_model(cfg.model, cfg.model.num_classes, 0)
    states = plan.model_states(profile, cfg.engine, H100.world_size)
    ours = (
        states.params_bf16
        + states.master_and_adam
        + states.step_fp32_grads
        + 4 * profile.largest_layer_params
    )
    _, deepspeed_bytes, _ = estimate_zero3_model_states_mem_needs(
        profile.params, profile.largest_layer_params, 8, 8, cpu_offload=False, cpu_offload_params=False
    )
    assert abs(ours - deepspeed_bytes) <= 18  # ceil() of three shards
    assert plan.deepspeed_estimate(profile, H100.world_size) == deepspeed_bytes  # the row the CLI prints

    # The figure DeepSpeed prints itself (its "GB" are GiB), for the no-offload, zero.Init case.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        estimate_zero3_model_states_mem_needs_all_cold(
            profile.params, profile.largest_layer_params, num_gpus_per_node=8, num_nodes=8
        )
    line = next(
        x
        for x in printed.getvalue().splitlines()
        if "offload_param=none, offload_optimizer=none, zero_init=1" in x
    )
    deepspeed_gib = float(re.findall(r"([0-9.]+)GB", line)[1])
    assert deepspeed_gib == pytest.approx(ours / 2**30, abs=0.006)
    # Beside the activations we keep 16 B/param/world: the 18 above minus the step's fp32 gradients,
    # plus the bf16 gradient partition.
    partitioned = states.during_backward - states.gathered_params - states.gathered_grads
    assert partitioned == pytest.approx(16 * profile.params / 64, rel=1e-6)


# ---------------------------------------------------------------------------------------------- real allocations


def measure_engine_bytes() -> dict[str, int]:
    """One ZeRO-3 bf16 step of a small CoAtNet; bytes of each model state DeepSpeed allocated."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = create_model("coatnet_0", num_classes=10, image_size=64, **SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    x, y = torch.randn(2, 3, 64, 64).bfloat16(), torch.tensor([1, 2])
    engine.backward(torch.nn.functional.cross_entropy(engine(x).float(), y))
    engine.step()
    zero = engine.optimizer

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    adam = [s[k] for s in zero.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {
        "params": sum(p.ds_numel for p in model.parameters()),
        "params_bf16": nbytes(zero.fp16_partitioned_groups_flat),
        "master_and_adam": nbytes(zero.fp32_partitioned_groups_flat) + nbytes(adam),
        "grads_bf16": nbytes([zero.grad_partitions_flat_buffer]),
    }


def test_model_states_match_what_a_real_zero3_engine_allocates():
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "engine-bytes"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])

    profile = plan.profile_model(small_model_config(), 10, 0)
    assert profile.params == measured["params"]
    states = plan.model_states(profile, EngineConfig(param_persistence_threshold=0), world_size=1)
    for key in ("params_bf16", "master_and_adam", "grads_bf16"):
        # DeepSpeed pads each partition to an alignment of a few elements.
        assert measured[key] == pytest.approx(getattr(states, key), rel=1e-3), key


# ---------------------------------------------------------------------------------------------- activations


def test_meta_measurement_equals_a_real_forward():
    """The meta device records the tensors real CPU tensors save (no meta artefacts), up to LayerNorm's
    per-row statistics: fp32 on meta as on CUDA, bf16 on CPU (a few hundred bytes per block)."""
    with torch.device("meta"):
        meta = create_model("coatnet_0", num_classes=10, image_size=64, **SMALL).to(torch.bfloat16)
    real = create_model("coatnet_0", num_classes=10, image_size=64, **SMALL).to(torch.bfloat16)
    saved_meta, sizes_meta = plan._measure(meta.train(), 3, 64)
    saved_real, sizes_real = _measure_real(real.train(), 3)
    assert sizes_meta == sizes_real and saved_meta.keys() == saved_real.keys()
    for name, meta_bytes in saved_meta.items():
        assert saved_real[name] <= meta_bytes <= 1.01 * saved_real[name], name
    assert set(saved_meta) >= {"stages.0.blocks.0", "stages.3.blocks.1", "head"}


def _measure_real(model, batch):
    recorder = plan._SavedTensorRecorder(model)
    sizes = {}
    handles = []
    for name, unit in plan._blocks(model):
        handles.append(
            unit.register_forward_pre_hook(lambda m, i, name=name: setattr(recorder, "current", name))
        )
        handles.append(
            unit.register_forward_hook(
                lambda m, i, o, name=name: sizes.update({name: (i[0].numel(), o.numel())})
            )
        )
    x = torch.randn(batch, 3, 64, 64, dtype=torch.bfloat16)
    with (
        torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t),
        plan._MemoryEfficientAttention(recorder),
    ):
        model(x)
    for h in handles:
        h.remove()
    recorder.saved.pop("other", None)
    return recorder.saved, sizes


def test_attention_is_accounted_like_the_memory_efficient_kernel():
    """A Transformer block keeps its (heads, N, N) bias once, independent of the batch, and no per-image
    N x N attention matrix, which the meta device's reference SDPA would keep."""
    profile = plan.profile_model(small_model_config(128), 10, 0)
    blocks = {b.name: b for b in profile.blocks}
    block = blocks["stages.3.blocks.1"]  # S3 at 128 pixels: 8 x 8 tokens, 128 wide, 4 heads of 32
    heads, n = 128 // 32, 8 * 8
    assert block.saved_fixed == heads * n * n * plan.BF16
    # At least q, k, v and the output (4 x N x 128 bf16) and the fp32 log-sum-exp (heads x N) per image.
    assert block.saved_per_image >= 4 * n * 128 * plan.BF16 + heads * n * plan.FP32
    first = blocks["stages.3.blocks.0"]  # the downsampling block: 16 x 16 x 64 -> 8 x 8 x 128
    assert first.input_per_image == 16 * 16 * 64 * plan.BF16 and first.output_per_image == n * 128 * plan.BF16

    with torch.device("meta"):
        model = create_model("coatnet_0", num_classes=10, image_size=128, **SMALL).to(torch.bfloat16).train()
    reference = [plan._measure(model, b, 128, efficient_attention=False)[0][block.name] for b in (1, 2)]
    assert reference[1] - reference[0] >= block.saved_per_image + heads * n * n * plan.BF16


def test_activations_are_affine_in_the_batch_and_checkpointing_keeps_less():
    profile = plan.profile_model(small_model_config(), 10, 0)
    saved5, _ = plan._measure(
        create_model("coatnet_0", num_classes=10, image_size=64, **SMALL).to(
            device="meta", dtype=torch.bfloat16
        ),
        5,
        64,
    )
    for block in profile.blocks:
        assert block.saved(5) == saved5.get(block.name, 0), block.name
    for batch in (1, 8, 64):
        full = plan.activation_bytes(profile, batch, checkpointing=False)
        ckpt = plan.activation_bytes(profile, batch, checkpointing=True)
        assert sum(b.saved(batch) for b in profile.blocks) < full
        assert ckpt < full
        assert ckpt >= sum(b.input_per_image for b in profile.blocks[:-1]) * batch
    # With CoAtNet-0's 15 blocks, checkpointing keeps a fraction of the activations.
    c0 = plan.profile_model(ModelConfig(name="coatnet_0"), 1000, 0)
    assert plan.activation_bytes(c0, 32, checkpointing=True) < plan.activation_bytes(c0, 32, False) / 2


# ---------------------------------------------------------------------------------------------- the plan


@pytest.fixture(scope="module")
def c7_plan() -> plan.Plan:
    cfg = load_config(CONFIGS / "coatnet7_jft.yaml")
    return plan.make_plan(cfg, H100, "coatnet7_jft.yaml")


def test_largest_micro_batch_is_the_boundary_of_fitting(c7_plan):
    p = c7_plan
    for ckpt in (False, True):
        best = p.max_batch[ckpt]
        assert plan.peak_bytes(p.profile, p.states, H100, best, ckpt) <= H100.gpu_memory
        assert plan.peak_bytes(p.profile, p.states, H100, best + 1, ckpt) > H100.gpu_memory
        assert 64 % p.max_usable_batch[ckpt] == 0 and p.max_usable_batch[ckpt] <= best
    assert p.max_batch[True] > 4 * p.max_batch[False]
    smaller = plan.Cluster(**{**vars(H100), "gpu_memory": 24 * 2**30})
    assert plan.largest_fitting_batch(p.profile, p.states, smaller, False) < p.max_batch[False]


def test_speed_and_traffic_follow_macs_peak_and_mfu(c7_plan):
    p = c7_plan
    assert p.profile.params == 2_529_839_209  # 2.44B published + the 29,593-class JFT head
    assert p.global_batch == 4096 and p.accumulation == 1 and p.micro_batch == 64
    flops = 64 * 6 * p.profile.macs_per_image  # images per GPU per step x 6 x MACs
    assert p.step_seconds == pytest.approx(flops / (989e12 * 0.4))
    assert p.images_per_second == pytest.approx(4096 / p.step_seconds)
    whole = p.profile.persistent_params
    assert 0 < whole < p.profile.params / 100
    assert p.profile.gather_units == 0 and p.profile.hooked_modules == p.profile.hooked_modules_per_layer
    # The gather-unit rule: every block but the stem, up to engine.gather_unit_elements.
    cfg = load_config(CONFIGS / "coatnet7_jft.yaml", ["engine.gather_unit_elements=150000000"])
    units = plan.make_plan(cfg, H100, "coatnet7_jft.yaml")
    assert units.profile.gather_units == 2 + 4 + 8 + 42 + 2  # CoAtNet-7: the blocks of S1-S5
    assert 100e6 < units.profile.largest_unit_params <= 150_000_000  # S5's
    assert units.profile.hooked_modules < units.profile.hooked_modules_per_layer / 3
    assert f"gather units                 {units.profile.gather_units} blocks" in plan.format_plan(units)
    assert units.comm_bytes_per_step == p.comm_bytes_per_step  # units change collectives, not bytes
    traffic = (3 * 2 * (p.profile.params - whole) + 2 * 2 * whole) * 63 / 64
    assert p.comm_bytes_per_step == pytest.approx(traffic, rel=1e-9)
    assert p.peak[False] <= H100.gpu_memory  # the recipe's own choice fits
    assert p.total_steps is None  # an epoch schedule needs the corpus size
    cfg = load_config(CONFIGS / "coatnet7_jft.yaml")
    sized = plan.make_plan(cfg, H100, "coatnet7_jft.yaml", train_images=300_000_000)
    assert sized.total_steps == round(14 * 300_000_000 / 4096)


def test_gathered_parameters_are_what_zero3_keeps_from_forward_to_backward():
    """Measured (benchmarks/memory_breakdown.py): with prefetching or reuse on, the whole partitioned model,
    up to max_live_parameters; with both off, only the running layer."""
    profile = plan.profile_model(ModelConfig(name="coatnet_0"), 1000, 100_000)
    partitioned = profile.params - profile.persistent_params
    assert plan.gathered_parameter_elements(profile, EngineConfig()) == partitioned  # defaults: 1e9 > 27M
    capped = EngineConfig(max_live_parameters=5_000_000, prefetch_bucket_size=1_000_000)
    assert plan.gathered_parameter_elements(profile, capped) == 5_000_000
    # The running layer and one prefetch bucket, when they exceed the cap.
    small_cap = EngineConfig(max_live_parameters=1_000_000, prefetch_bucket_size=1_000_000)
    assert plan.gathered_parameter_elements(profile, small_cap) == profile.largest_layer_params + 1_000_000
    off = EngineConfig(prefetch_bucket_size=0, max_reuse_distance=0)
    assert plan.gathered_parameter_elements(profile, off) == profile.largest_layer_params
    states = plan.model_states(profile, EngineConfig(), 8)
    assert states.gathered_params == 2 * partitioned


# ---------------------------------------------------------------------------------------------- budgets


def test_decode_budget_splits_hardware_and_cpu_work_and_warns_when_either_is_short():
    cfg = load_config(CONFIGS / "coatnet7_jft.yaml")
    world = H100.world_size
    b = plan.budgets(cfg, H100, 10**9, step_seconds=1.0, images_s=100.0 * world)
    assert b.images_s_per_gpu == pytest.approx(100) and b.hw_capacity == pytest.approx(7000)
    assert b.cpu_images_s == pytest.approx(100 * (1 - cfg.data.hw_decoder_load))  # the share DALI keeps off
    assert b.cores_needed == pytest.approx(b.cpu_images_s * 0.18 / plan.CPU_DECODE_MPIX_S)
    assert b.decode_fits and not b.warnings()

    # No hardware decoder, fast steps: every JPEG is CPU work, more than 13 free cores per GPU can do.
    bare = plan.Cluster(**{**vars(H100), "jpeg_engines": 0})
    b = plan.budgets(cfg, bare, 10**9, step_seconds=1.0, images_s=5000.0 * world)
    assert b.cpu_images_s == pytest.approx(5000) and b.cores_free == 13
    assert not b.decode_fits and "CPU cores per GPU" in " ".join(b.warnings())
    # Larger source JPEGs cost proportionally more.
    big = plan.budgets(cfg, bare, 10**9, 1.0, 5000.0 * world, jpeg_megapixels=0.36)
    assert big.cores_needed == pytest.approx(2 * b.cores_needed)

    # Hardware decoders sent more than they decode: the warning names the share that would fit.
    b = plan.budgets(cfg, H100, 10**9, step_seconds=1.0, images_s=20000.0 * world)
    assert b.hw_oversubscribed and not b.decode_fits
    assert f"data.hw_decoder_load={7000 / 20000:.2f}" in " ".join(b.warnings())


def test_checkpoint_budget_is_the_shard_bytes_at_the_slower_bandwidth_against_the_warning_lead():
    cfg = load_config(CONFIGS / "coatnet7_jft.yaml", ["ema.decay=0", "checkpoint.every_steps=100"])
    params, world = 2_500_000_000, H100.world_size
    b = plan.budgets(cfg, H100, params, step_seconds=2.0, images_s=1000.0)
    shard = -(-params // world)
    assert b.save_bytes_per_rank == 12 * shard and b.save_bytes == 12 * shard * world
    node_bound = 12 * shard * 8 / 5e9  # 8 ranks per node at 5 GB/s beats 64 ranks at 20 GB/s
    assert b.save_seconds == pytest.approx(max(node_bound, 12 * shard * world / 20e9) / plan.SAVE_EFFICIENCY)
    # Async saves (the default) block for the host copy only, and cost host memory on each node.
    copy = 12 * shard / (plan.HOST_COPY_GBYTES * 1e9)
    assert b.blocked_seconds == pytest.approx(copy) and b.blocked_seconds < b.save_seconds / 10
    assert b.save_share == pytest.approx(copy / (copy + 100 * 2.0))
    assert b.host_bytes_per_node == 12 * shard * 8
    sync_cfg = load_config(
        CONFIGS / "coatnet7_jft.yaml",
        ["ema.decay=0", "checkpoint.every_steps=100", "checkpoint.async_save=false"],
    )
    sync = plan.budgets(sync_cfg, H100, params, step_seconds=2.0, images_s=1000.0)
    assert sync.save_share == pytest.approx(sync.save_seconds / (sync.save_seconds + 100 * 2.0))
    assert sync.host_bytes_per_node == 0 and sync.blocked_seconds == sync.save_seconds
    assert b.stop_latency_s == pytest.approx(cfg.run.stop_check_s + cfg.run.log_every * 2.0)
    with_ema = plan.budgets(
        load_config(CONFIGS / "coatnet7_jft.yaml", ["ema.decay=0.9999"]), H100, params, 2, 1
    )
    assert with_ema.save_bytes_per_rank == 16 * shard

    short = plan.Cluster(**{**vars(H100), "warning_lead_s": 30.0})
    b = plan.budgets(cfg, short, params, step_seconds=2.0, images_s=1000.0)
    assert not b.stop_fits and "more than the 30 s lead" in " ".join(b.warnings())


def test_warning_lead_is_read_from_the_sbatch_file(tmp_path):
    assert plan.warning_lead() == 180  # cluster/pretrain.sbatch: #SBATCH --signal=B:USR1@180
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --time=4:00:00\n#SBATCH --signal=B:USR1@600\n")
    assert plan.warning_lead(script) == 600
    assert plan.warning_lead(tmp_path / "missing.sbatch") == plan.DEFAULT_WARNING_LEAD_S


# ---------------------------------------------------------------------------------------------- command line


def test_cli_prints_the_plan(capsys):
    code = plan.main(["--config", str(CONFIGS / "smoke.yaml"), "--nodes", "1", "--gpus-per-node", "2",
                      "--gpu-memory", "16GiB", "--peak-tflops", "1", "model.num_classes=10"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for text in ("2 ranks", "fp32 master + Adam m, v", "DeepSpeed's estimator", "largest micro-batch",
                 "step time", "ZeRO-3 traffic per rank", "JPEG decoding per GPU", "CPU cores for the rest",
                 "stop + save after warning", "of Slurm's 180 s lead"):  # fmt: skip
        assert text in out, text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-memory", "80"], "expected a number and a unit"),
        (["--gpu-memory", "80GiB", "--mfu", "1.5"], "--mfu must be in"),
        (
            ["--gpu-memory", "80GiB", "--fs-gbytes", "0", "model.num_classes=10"],
            "--fs-gbytes must be positive",
        ),
        (["--gpu-memory", "80GiB"], "model.num_classes is null"),
        (["--gpu-memory", "80GiB", "model.nme=x"], "unknown key 'model.nme'"),
        # The trainer's own refusal, word for word (pretrain.ds_config.grad_accum_steps).
        (
            ["--gpu-memory", "80GiB", "model.num_classes=10", "engine.global_batch_size=96"],
            "engine.global_batch_size=96 is not a multiple of data.batch_size x world size = 32 x 2 = 64",
        ),
    ],
)
def test_cli_errors_name_what_is_wrong(capsys, args, message):
    argv = [
        "--config",
        str(CONFIGS / "smoke.yaml"),
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--peak-tflops",
        "1",
    ]
    assert plan.main(argv + args) == 2
    assert message in capsys.readouterr().err


def test_cli_help():
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.plan", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--gpu-memory" in proc.stdout and "--mfu" in proc.stdout


def _probe_main() -> None:
    assert sys.argv[1:] == ["engine-bytes"], sys.argv
    print(json.dumps(measure_engine_bytes()))


if __name__ == "__main__":
    from pretrain import dist

    dist.run_and_exit(_probe_main)
