"""A resumed run trains at the speed of an uninterrupted one: the ZeRO-3 side of it, counted, not timed.

After a resume the canary's eval forward is the process's first forward. Left to ZeRO-3 it becomes the
recorded trace, and the release decisions made for it (memoised in deepspeed 0.19.8) make every later
step gather each module's parameters again (on the smoke model: 37 all-gathers per step instead of 1,
0.4-0.6x the speed). `pretrain.engine.untraced_forward` drops that recording. Counting all-gathers makes the
check independent of the machine's load; benchmarks/resume_speed.py measures the speed itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.launch import run_script

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "helpers" / "zero3_trace_probe.py"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_canary_forward_before_training_leaves_zero3_prefetching_as_in_a_fresh_process(
    tmp_path: Path,
) -> None:
    proc = run_script(PROBE, str(tmp_path), nproc=2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        steady = {name: c[-3:] for name, c in counts.items()}  # steps 1-2 record and complete the trace
        assert all(n >= 1 for n in steady["fresh"]), counts
        assert steady["canary_untraced"] == steady["fresh"], counts
        # The hazard the helper guards against; if this starts failing, DeepSpeed no longer reuses release
        # decisions across traces and `untraced_forward` may have become unnecessary.
        assert sum(steady["canary_plain"]) > 5 * sum(steady["fresh"]), counts
