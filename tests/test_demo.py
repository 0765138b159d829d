"""`qwen-quantize demo`: a newcomer's first command runs the whole job offline on the model shipped in the package."""
import os
import subprocess
import sys
from pathlib import Path

import qwen_quant
from qwen_quant.demo import DEMO_MODEL


def test_demo_runs_offline_without_shared_data(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    env = {**os.environ, "QWEN_QUANT_DATA": str(empty), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "demo-int4"
    command = Path(sys.executable).with_name("qwen-quantize")  # the console script that the install made
    run = subprocess.run([str(command), "demo", "--output", str(out)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert Path(qwen_quant.__file__).parent in DEMO_MODEL.parents
    assert "full precision: perplexity" in text and "Int4 GPTQ: perplexity" in text
    fp, int4 = (float(line.split("perplexity ")[1].split()[0]) for line in text.splitlines()
                if ": perplexity " in line)
    assert 1 < fp < int4 < fp * 1.25  # Int4 costs this 64-wide model a little, never a lot
    assert text.count("greedy story: Once upon a time") == 2
    assert "Qwen-72B" in text and "published" in text
    assert (out / "model.safetensors").is_file()
    assert (out / "LICENSE").read_bytes() == (DEMO_MODEL / "LICENSE").read_bytes()  # the MIT license travels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-int4", "no-data"]  # nothing else left behind


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    demo, tests = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()[:2]
    assert demo.endswith(" && qwen-quantize demo") and tests.endswith(" && python -m pytest -q")
    assert demo.rsplit(" && ", 1)[0] == tests.rsplit(" && ", 1)[0]  # the same install in both
    ci = (repo / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci and ci.index(tests) < ci.index("python benchmarks/run_all.py")
