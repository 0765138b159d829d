"""benchmarks/gpu_check.py at toy sizes on the CPU, under the Triton interpreter: every section runs, kernels agree."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_every_section_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.run([sys.executable, str(SCRIPT), "--toy"], capture_output=True, text=True, env=env,
                           check=True)
    result = json.loads(child.stdout)
    assert result["toy"] is True
    for section in ("correctness", "kernels", "decode", "memory", "gptq"):
        assert "error" not in result[section], result[section]
    correctness = result["correctness"]
    assert correctness["passed"] and correctness["worst_relative_error"] <= correctness["tolerance"]
    cases = {(c["bits"], c["group_size"], c["act_order"]) for c in correctness["cases"]}
    assert cases == {(b, g, a) for b in (4, 8) for g in (128, 32, -1) for a in (False, True) if not (a and g == -1)}
    assert {row["M"] for row in result["kernels"]["rows"]} == {1, 16, 64, 96}
    assert all(row["ms"] > 0 and row["copy_fraction"] > 0 for row in result["kernels"]["rows"])
    assert [row["precision"] for row in result["decode"]["rows"]] == ["fp16", "int8", "int4"]
    # On the CPU the memory section compares the exact tensor bytes: the estimate must match them.
    assert all(abs(row["estimate_over_measured"] - 1) < 1e-9 for row in result["memory"]["rows"])
    assert result["gptq"]["seconds_per_block"] > 0 and result["gptq"]["mean_gptq_rtn_ratio"] < 1
