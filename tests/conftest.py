import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks and the tests build SmolLM2-135M with one helper
from common import shared_data_dir, smollm2_dir as build_smollm2  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The team's real data (../shared/data beside the checkout, or $QWEN_QUANT_DATA). Missing data fails, never skips."""
    try:
        return shared_data_dir()
    except SystemExit as missing:
        pytest.fail(str(missing), pytrace=False)


@pytest.fixture(scope="session")
def stories_dir(data_dir) -> Path:
    return data_dir / "stories260k_qwen"


@pytest.fixture(scope="session")
def tiktoken_file(data_dir) -> Path:
    return data_dir / "qwen_tiktoken" / "qwen.tiktoken"


@pytest.fixture(scope="session")
def smollm2_dir(data_dir) -> Path:
    """SmolLM2-135M-Instruct in the Qwen v1 layout, built from the shared GGUF once and cached outside the checkout."""
    try:
        return build_smollm2(data_dir)
    except (FileNotFoundError, RuntimeError) as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def smollm2_qwen2_dir(data_dir) -> Path:
    """The same SmolLM2-135M-Instruct in the Qwen2 layout (Qwen2ForCausalLM's names, separate q/k/v with zero biases,
    9 heads over 3 kv heads, tied embeddings), built and cached as smollm2_dir is."""
    try:
        return build_smollm2(data_dir, layout="qwen2")
    except (FileNotFoundError, RuntimeError) as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Every test starts from the same global random state: a draw a test does not seed itself (torch.randn without a
    generator, numpy's or Python's global functions) is the same on every run and every machine."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(params=["0", "1"], ids=["fp32-blocks", "bf16-blocks"])
def cpu_bf16(request, monkeypatch) -> bool:
    """Both CPU arithmetic routes on either kind of machine: the test runs as on a CPU without bf16 matmuls (bf16
    checkpoints' blocks compute in fp32, the cpu backend's long prompts in fp32 tiles) and as on one with them."""
    from qwen_quant.cpu import BF16_ENV

    monkeypatch.setenv(BF16_ENV, request.param)
    return request.param == "1"


# Triton runs on the CPU only through its interpreter, which must be chosen before any @triton.jit is defined.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_two_blocks(smollm2_dir, tmp_path_factory):
    """SmolLM2's real embedding, first two blocks and head with its tokenizer: fp/ in full precision and int4/ its RTN
    Int4 g64 (all 30 blocks take minutes to quantize on 2 cores)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen_quant.quantize import quantize

    root = tmp_path_factory.mktemp("smollm2_two_blocks")
    (root / "fp").mkdir()
    config = json.loads((smollm2_dir / "config.json").read_text())
    (root / "fp" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(smollm2_dir / name, root / "fp")
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        kept = {n: f.get_tensor(n) for n in f.keys() if not n.startswith("transformer.h.") or int(n.split(".")[2]) < 2}
    save_file(kept, root / "fp" / "model.safetensors", metadata={"format": "pt"})
    quantize(root / "fp", root / "int4", method="rtn", group_size=64, mse=False, progress=False)
    return root
