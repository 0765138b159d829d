"""benchmarks/gpu_check.py at toy sizes on the CPU, under the Triton interpreter: every section runs and prints its
JSON line, the budget skips what starts too late, and the script imports the package from the checkout where it is
not installed (as on the device machines)."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ["environment", "correctness", "autotune", "kernels", "gptq", "published", "decode"]


def run_script(*args, code=None, cwd=None):
    """The script's JSON lines; `code` runs the script through these lines of Python instead of directly."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, str(SCRIPT), *args] if code is None else [sys.executable, "-c", code, *args]
    child = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=cwd)
    return [json.loads(line) for line in child.stdout.splitlines()]


def test_gpu_check_runs_every_section_under_the_triton_interpreter(tmp_path):
    lines = run_script("--toy", "--json", str(tmp_path / "all.json"), "--jsonl", str(tmp_path / "lines.jsonl"))
    assert [line["section"] for line in lines] == SECTIONS
    result = {line["section"]: line for line in lines}
    for section, line in result.items():
        assert "error" not in line and "skipped" not in line, (section, line)
    assert [json.loads(line) for line in (tmp_path / "lines.jsonl").read_text().splitlines()] == lines
    assert json.loads((tmp_path / "all.json").read_text()) == result
    assert result["environment"]["toy"] is True and result["environment"]["copy_GB_per_s"] > 0

    correctness = result["correctness"]
    assert correctness["passed"] and correctness["worst_relative_error"] <= correctness["tolerance"]
    layouts = {(c["bits"], c["group_size"], c["act_order"], c["symmetric"]) for c in correctness["cases"]}
    assert layouts == {(b, g, a, True) for b in (4, 8) for g in (128, 32, -1) for a in (False, True)
                       if not (a and g == -1)} | {(4, 128, True, False), (8, 128, True, False)}
    assert {c["route"] for c in correctness["cases"]} == {"kernel", "dense"}
    assert [row["equal"] for row in correctness["compiled"]] == [True, True]

    autotune = result["autotune"]
    assert autotune["entries"] == 8 and not any(row["failures"] for row in autotune["rows"])
    assert set(autotune["table"]["gpus"]["toy"]) == {row["key"] for row in autotune["rows"]}
    assert not autotune["path"].startswith(str(SCRIPT.parents[1]))  # the toy never writes the package's table

    rows = result["kernels"]["rows"]
    assert {row["M"] for row in rows} == {1, 16, 64, 96} and {row["act_order"] for row in rows} == {False, True}
    assert all(row[k] > 0 for row in rows for k in ("us", "fp16_us", "host_us", "copy_fraction"))

    assert result["gptq"]["seconds_per_block"] > 0 and result["gptq"]["mean_gptq_rtn_ratio"] < 1

    published = result["published"]["rows"]
    assert [(row["size"], row["precision"]) for row in published] == [
        (size, p) for size in ("1.8B", "7B", "14B") for p in ("bf16", "int8", "int4")]
    assert published[2]["published_tokens_per_s"] == 71.07 and published[2]["published_gib"] == 2.91
    assert all(row["tokens_per_s"] > 0 and row["published_scaled_tokens_per_s"] > 0 for row in published)

    decode = result["decode"]["rows"]
    assert [(row["precision"], row["compiled"]) for row in decode] == [
        ("int4", False), ("bf16", False), ("int8", False), ("int4", True)]
    assert all(row["tokens_per_s"] > 0 for row in decode)
    assert decode[3]["leading_tokens_equal_to_eager"] == 3  # the compiled step decodes what eager decodes


def test_gpu_check_budget_skips_what_would_start_late(tmp_path):
    lines = run_script("--toy", "--budget", "0", "--sections", "environment,decode")
    assert [line["section"] for line in lines] == ["environment", "decode"]
    assert all("past the budget of 0 s" in line["skipped"] for line in lines)


def test_gpu_check_imports_the_package_from_the_checkout_where_it_is_not_installed(tmp_path):
    """The device machines have no install: with the editable install's finder removed, the script still imports
    qwen_quant (and its kernels/ and calibration/ subpackages) from the checkout."""
    code = ("import importlib.util, runpy, sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
            "assert importlib.util.find_spec('qwen_quant') is None, 'qwen_quant is still importable'\n"
            f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            "import qwen_quant.kernels, qwen_quant.calibration\n"
            f"assert qwen_quant.kernels.__file__.startswith({str(SCRIPT.parents[1])!r})\n")
    lines = run_script("--toy", "--sections", "environment", code=code, cwd=tmp_path)  # not the checkout's root
    assert lines[0]["section"] == "environment" and "error" not in lines[0]
