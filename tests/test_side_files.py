"""The published folder is complete: remote code, kernels, tokenizers and licenses travel byte for byte, never run."""
import json
import os
import sys

import pytest
import torch

from qwen_quant import QwenForCausalLM
from qwen_quant.checkpoint import copy_side_files
from qwen_quant.quantize import quantize, summary_table
from qwen_quant.synthetic import save_random_checkpoint
from tiny_model import tiny_config

AUTO_MAP = {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
SIDE = ["configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "tokenization_qwen.py",
        "cpp_kernels.py", "cache_autogptq_cuda_kernel_256.cu", "cache_autogptq_cuda_256.cpp", "qwen.tiktoken",
        "tokenizer_config.json", "generation_config.json", "tokenizer.json", "LICENSE", "NOTICE"]


@pytest.fixture
def source(tmp_path, tiktoken_file):
    """A model folder as on the Hub, plus traps: code that leaves a marker when imported, a link leading outside,
    a folder named like a side file, and pickle weights."""
    folder = save_random_checkpoint(tmp_path / "Qwen-Tiny", tiny_config(extra={"auto_map": AUTO_MAP}))
    marker = tmp_path / "IMPORTED"
    trap = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('this file was imported')\n"
    for name in SIDE:
        path = folder / name
        if name.endswith(".py"):
            path.write_text(f"# {name}\n{trap}")
        elif name == "qwen.tiktoken":
            path.write_bytes(tiktoken_file.read_bytes())
        elif name == "generation_config.json":
            continue  # written by save_random_checkpoint
        else:
            path.write_bytes(f"{name}\n".encode() + bytes(range(256)))  # every byte value must survive
    (tmp_path / "outside.py").write_text(trap)
    (folder / "secret.py").symlink_to(tmp_path / "outside.py")
    (folder / "NOTICE.inside").symlink_to(folder / "NOTICE")  # a link that stays inside: copied as its content
    (folder / "extra.py").mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights")
    return folder, marker


def test_quantized_folder_is_complete_and_nothing_is_run(source, tmp_path):
    folder, marker = source
    out = tmp_path / "Qwen-Tiny-Int4"
    report = quantize(folder, out, method="rtn", group_size=32, progress=False)
    for name in SIDE + ["NOTICE.inside"]:
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
        assert not (out / name).is_symlink()
    for name in ("secret.py", "extra.py", "pytorch_model.bin"):
        assert not (out / name).exists(), name
    assert (out / "model.safetensors").read_bytes() != (folder / "model.safetensors").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["quantization_config"]["bits"] == 4
    assert "auto_map" not in summary_table(report)
    assert not marker.exists()
    for backend in ("torch", "cpu", "triton"):
        model = QwenForCausalLM.from_pretrained(out, backend=backend)
        assert model(torch.tensor([[1, 2, 3]])).isfinite().all()
    assert not marker.exists()
    assert not any(name in sys.modules for name in ("modeling_qwen", "configuration_qwen", "tokenization_qwen"))


def test_source_without_auto_map_is_noted(tmp_path):
    folder = save_random_checkpoint(tmp_path / "plain", tiny_config())
    report = quantize(folder, tmp_path / "out", method="rtn", group_size=32, progress=False)
    assert "has no auto_map" in summary_table(report)
    assert "has no auto_map" in (tmp_path / "out" / "README.md").read_text()
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_hub_cache_snapshot_links_are_followed_into_its_blobs(tmp_path):
    # huggingface_hub stores models--ORG--NAME/snapshots/REV/FILE as links to ../../blobs/HASH.
    repo = tmp_path / "models--Qwen--Qwen-Tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "aaa").write_bytes(b"# modeling code\n")
    (repo / "blobs" / "bbb").write_bytes(b"Tongyi Qianwen LICENSE AGREEMENT\n")
    os.symlink("../../blobs/aaa", snapshot / "modeling_qwen.py")
    os.symlink("../../blobs/bbb", snapshot / "LICENSE")
    (tmp_path / "stolen").write_text("not part of the model")
    os.symlink(tmp_path / "stolen", snapshot / "NOTICE")
    out = tmp_path / "out"
    out.mkdir()
    assert copy_side_files(snapshot, out) == ["LICENSE", "modeling_qwen.py"]
    assert (out / "modeling_qwen.py").read_bytes() == b"# modeling code\n"
