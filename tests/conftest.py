import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks and the tests build SmolLM2-135M with one helper
from common import smollm2_dir as build_smollm2  # noqa: E402


def shared_data_dir() -> Path:
    """The team's real data (../shared/data beside the checkout, or $QWEN_QUANT_DATA). Missing data fails, never skips."""
    root = Path(os.environ.get("QWEN_QUANT_DATA", REPO.parent / "shared" / "data"))
    if not (root / "stories260k_qwen" / "config.json").is_file():
        pytest.fail(f"shared data not found at {root}: set QWEN_QUANT_DATA to the folder holding stories260k_qwen/, "
                    "qwen_tiktoken/, wikitext2/", pytrace=False)
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


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


# Triton runs on the CPU only through its interpreter, which must be chosen before any @triton.jit is defined.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
