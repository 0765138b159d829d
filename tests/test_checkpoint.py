import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_quant import QwenConfig, QwenForCausalLM
from qwen_quant.checkpoint import WeightReader, resolve_model_path, write_shards
from qwen_quant.published import SIZES, find_published
from qwen_quant.synthetic import save_random_checkpoint
from tiny_model import tiny_config


@pytest.fixture
def checkpoint(tmp_path):
    return save_random_checkpoint(tmp_path / "model", tiny_config())


def rewrite(folder, change):
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors")


def test_missing_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda s: s.pop("transformer.h.1.mlp.w2.weight"))
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.mlp\.w2\.weight is missing"):
        QwenForCausalLM.from_pretrained(checkpoint)


def test_wrongly_shaped_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda s: s.update({"transformer.h.0.attn.c_proj.weight": torch.zeros(64, 63)}))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj\.weight has shape \[64, 63\]"):
        QwenForCausalLM.from_pretrained(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda s: s.update({"transformer.h.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*transformer\.h\.0\.extra\.weight"):
        QwenForCausalLM.from_pretrained(checkpoint)


def test_truncated_file_is_named(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        QwenForCausalLM.from_pretrained(checkpoint)


def test_config_without_hidden_size(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    del cfg["hidden_size"]
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json lacks required field\(s\) \['hidden_size'\]"):
        QwenForCausalLM.from_pretrained(checkpoint)


def test_config_with_wrong_field(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_attention_heads='four' must be a positive integer"):
        QwenForCausalLM.from_pretrained(checkpoint)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        QwenForCausalLM.from_pretrained(tmp_path)


def test_pickle_refused_unless_opted_in(checkpoint):
    state = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    torch.save(state, checkpoint / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        QwenForCausalLM.from_pretrained(checkpoint)
    model = QwenForCausalLM.from_pretrained(checkpoint, allow_pickle=True)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


def test_stories_config_fields(stories_dir):
    cfg = QwenConfig.from_file(stories_dir)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.ffn_size, cfg.head_dim) == (64, 5, 192, 8)
    assert cfg.use_dynamic_ntk is False and cfg.layer_norm_epsilon == 1e-5
    assert cfg.extra["auto_map"]["AutoConfig"] == "configuration_qwen.QWenConfig"  # unknown fields are kept
    again = QwenConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_published_names_resolve():
    assert find_published("Qwen-14B-Chat").repo_id == "Qwen/Qwen-14B-Chat"
    assert find_published("Qwen-1.8B-Chat").repo_id == "Qwen/Qwen-1_8B-Chat"
    assert find_published("Qwen-1_8B-Chat").repo_id == "Qwen/Qwen-1_8B-Chat"
    assert find_published("Qwen/Qwen-14B-Chat").repo_id == "Qwen/Qwen-14B-Chat"
    assert find_published("qwen-72b-chat-int4").precision == "int4"
    assert find_published("Qwen-3B") is None
    assert [SIZES[s].speed_memory["int4"][1] for s in ("1.8B", "7B", "14B", "72B")] == [2.91, 8.21, 13.01, 48.86]


def test_published_configs_match_reference():
    # REFERENCE.md section 1: hidden, layers, heads, MLP width, vocab rows, seq_length, rotary base, NTK/logN.
    table = {"1.8B": (2048, 24, 16, 5504, 151936, 8192, 1e4, True), "7B": (4096, 32, 32, 11008, 151936, 8192, 1e4, True),
             "14B": (5120, 40, 40, 13696, 152064, 2048, 1e4, True),
             "72B": (8192, 80, 64, 24576, 152064, 8192, 1e6, False)}
    for name, row in table.items():
        c = SIZES[name].config()
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.ffn_size, c.vocab_size, c.seq_length,
                c.rotary_emb_base, c.use_dynamic_ntk) == row
        assert c.head_dim == 128 and c.intermediate_size == 2 * c.ffn_size


def test_unknown_name_and_offline_download(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a published Qwen model"):
        resolve_model_path("not-a-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RuntimeError, match="Qwen/Qwen-1_8B-Chat.*local folder"):
        resolve_model_path("Qwen-1.8B-Chat")


def test_published_names_resolve_through_modelscopes_cache(monkeypatch, tmp_path, checkpoint):
    import shutil

    import modelscope

    # ModelScope's cache layout: $MODELSCOPE_CACHE/models/<owner>/<name>/ (dots in the name written as ___).
    cached = tmp_path / "modelscope" / "models" / "Qwen" / "Qwen-1_8B-Chat"
    shutil.copytree(checkpoint, cached)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))
    assert resolve_model_path("Qwen-1.8B-Chat", hub="modelscope") == cached
    monkeypatch.setenv("QWEN_QUANT_HUB", "modelscope")
    assert resolve_model_path("Qwen/Qwen-1_8B-Chat") == cached
    assert QwenForCausalLM.from_pretrained("Qwen-1_8B-Chat").config.hidden_size == 64

    def offline(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            raise FileNotFoundError(f"{repo_id} is not cached")
        raise ConnectionError("modelscope.cn cannot be reached")

    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="Qwen/Qwen-7B-Chat from ModelScope.*ConnectionError.*local folder"):
        resolve_model_path("Qwen-7B-Chat")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # the library is not installed
    with pytest.raises(RuntimeError, match=re.escape("needs the modelscope library: pip install "
                                                     "'qwen_quant[modelscope]'")):
        resolve_model_path("Qwen-7B-Chat")
    monkeypatch.setenv("QWEN_QUANT_HUB", "hf-mirror")
    with pytest.raises(ValueError, match=r"hub 'hf-mirror' .*QWEN_QUANT_HUB.* not one of \('huggingface', "):
        resolve_model_path("Qwen-7B-Chat")


def test_write_shards_streams_and_indexes(tmp_path):
    tensors = [(f"t{i}", torch.full((100,), float(i))) for i in range(5)]
    total = write_shards(iter(tensors), tmp_path, max_shard_bytes=900)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert total == 2000 and index["metadata"]["total_size"] == 2000
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    reader = WeightReader(tmp_path)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors)
    assert not list(tmp_path.glob("*.tmp"))
    # The files are plain safetensors: the reference library reads them too.
    shard = load_file(tmp_path / "model-00002-of-00003.safetensors")
    assert list(shard) == ["t2", "t3"] and torch.equal(shard["t3"], tensors[3][1])


def test_write_single_file_of_mixed_dtypes(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.int32).view(2, 3), "b": torch.randn(5).bfloat16(),
               "c": torch.randn(3, 1).half(), "d": torch.zeros(0)}
    write_shards(iter(tensors.items()), tmp_path)
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_cli_hub_choice_reaches_the_resolution_without_the_environment(monkeypatch, tmp_path, checkpoint, capsys):
    import shutil

    import numpy as np

    from qwen_quant.cli import main

    cached = tmp_path / "modelscope" / "models" / "Qwen" / "Qwen-1_8B-Chat"
    shutil.copytree(checkpoint, cached)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))
    monkeypatch.delenv("QWEN_QUANT_HUB", raising=False)
    np.save(tmp_path / "ids.npy", np.arange(64) % 512)
    assert main(["eval", "Qwen-1.8B-Chat", "--hub", "modelscope", "--dataset", str(tmp_path / "ids.npy"),
                 "--seqlen", "16"]) == 0
    assert "Qwen-1.8B-Chat: perplexity" in capsys.readouterr().out
    assert "QWEN_QUANT_HUB" not in os.environ
