"""Second hostile pass, odds and ends: tensor-parallel claims follow vLLM's GPTQ rule exactly (on one GPU too), --tp is
an integer, `demo --overwrite` works, and a pickle folder's weights are Hugging Face's pytorch_model*.bin files only."""
import json
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from qwen_quant import QwenForCausalLM
from qwen_quant.checkpoint import WeightReader
from qwen_quant.cli import main
from qwen_quant.quantize import quantize, summary_table
from qwen_quant.synthetic import save_random_checkpoint
from qwen_quant.tensor_parallel import TP_DEGREES, check_tp, padded_ffn, split_problem, tp_summary
from tiny_model import tiny_config


# Finding 1: every tensor-parallel claim comes from vLLM's rule, which holds on one GPU too.

def vllm_accepts(hidden, heads, ffn, bits, group_size, tp) -> bool:
    """vLLM's conditions, restated literally: Qwen's attention needs heads % tp == 0; each GPTQ linear
    (GPTQLinearMethod.create_weights) needs its inputs per GPU to be whole groups (group -1: no check) and whole packed
    words (qweight's rows), and its outputs per GPU, part by part, whole packed words (qzeros' columns)."""
    pack = 32 // math.gcd(32, bits)
    if heads % tp:
        return False
    # (inputs, inputs split?, output parts, outputs split?): c_attn (q, k, v), attn.c_proj, w1 + w2 merged, mlp.c_proj
    for inputs, inputs_split, parts, outputs_split in ((hidden, False, [hidden] * 3, True),
                                                       (hidden, True, [hidden], False),
                                                       (hidden, False, [ffn, ffn], True),
                                                       (ffn, True, [hidden], False)):
        if inputs_split and inputs % tp:
            return False
        per_gpu = inputs // tp if inputs_split else inputs
        if group_size != -1 and per_gpu % group_size:
            return False
        if per_gpu % pack:
            return False
        for part in parts:
            if outputs_split and part % tp:
                return False
            if (part // tp if outputs_split else part) % pack:
                return False
    return True


def random_shape(rng: random.Random) -> tuple:
    heads = rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 20, 32, 40, 64])
    hidden = heads * rng.choice([8, 16, 24, 32, 64, 96, 128])
    ffn = rng.randrange(1, 200) * rng.choice([8, 16, 32, 48, 64, 128])
    return hidden, heads, ffn, rng.choice([2, 3, 4, 8]), rng.choice([-1, 8, 16, 24, 32, 48, 64, 96, 128, 256])


def test_tp_claims_follow_vllms_rule_for_random_shapes():
    rng = random.Random(0)
    verdicts = []
    for _ in range(300):
        hidden, heads, ffn, bits, group = shape = random_shape(rng)
        accepted = [tp for tp in TP_DEGREES if vllm_accepts(*shape, tp)]
        for tp in TP_DEGREES:
            verdicts.append(split_problem(*shape, tp) is None)
            assert verdicts[-1] == (tp in accepted), (shape, tp, split_problem(*shape, tp))
        line = tp_summary(SimpleNamespace(ffn_size=ffn), SimpleNamespace(hidden_size=hidden, num_attention_heads=heads,
                          ffn_size=ffn), SimpleNamespace(bits=bits, group_size=group), None)
        claimed = re.search(r"the largest degree vLLM accepts for this checkpoint is (\d+)", line)
        assert (int(claimed.group(1)) if claimed else None) == max(accepted, default=None), (shape, line)
        assert ("refuses this checkpoint, even on one GPU" in line) == (not accepted), (shape, line)
        # A width whose MLP passes whatever the bits and group: what --tp cannot fix stays.
        for tp in TP_DEGREES:
            free_mlp = tp * 64 * max(group, 1)
            try:
                check_tp(tp, hidden, heads, bits, group)
            except ValueError:
                assert not vllm_accepts(hidden, heads, free_mlp, bits, group, tp), (shape, tp)
                continue
            width = padded_ffn(ffn, group, tp)
            assert vllm_accepts(hidden, heads, width, bits, group, tp), (shape, tp)
            assert width >= ffn and width % (64 * tp) == 0
            assert not any(vllm_accepts(hidden, heads, w, bits, group, tp) for w in range(width - 64 * tp, ffn - 1,
                                                                                            -64 * tp))
        promised = re.search(r"quantize with --tp (\d+) to make it", line)
        if promised:
            tp = int(promised.group(1))
            assert vllm_accepts(hidden, heads, padded_ffn(ffn, group, tp), bits, group, tp), (shape, line)
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8  # the cases cover both verdicts


def test_group_that_does_not_divide_hidden_is_refused_even_on_one_gpu(tmp_path):
    folder = save_random_checkpoint(tmp_path / "fp", tiny_config())  # hidden_size 64
    report = quantize(folder, tmp_path / "g48", method="rtn", group_size=48, progress=False)
    why = "hidden_size 64 inputs per GPU of attn.c_attn is not a whole number of groups of 48"
    for text in (summary_table(report), (tmp_path / "g48" / "README.md").read_text(encoding="utf-8")):
        assert f"vLLM refuses this checkpoint, even on one GPU: {why}; no --tp can fix it" in text
        assert "largest degree vLLM accepts" not in text
    with pytest.raises(ValueError, match=f"--tp 1: {why}.* is refused by vLLM at every --tp"):
        check_tp(1, 64, 4, 4, 48)


# Finding 2: tp is an integer, and a wrong type is named as such.

@pytest.mark.parametrize("tp", [2.0, "2", True])
def test_tp_of_another_type_is_a_type_error_naming_it(tp, tmp_path):
    with pytest.raises(TypeError, match=re.escape(f"tp={tp!r} ({type(tp).__name__}) is not an integer")):
        check_tp(tp, 64, 8, 4, 32)
    folder = save_random_checkpoint(tmp_path / "fp", tiny_config())
    with pytest.raises((TypeError, ValueError)) as e:  # quantize() may check its arguments' types before check_tp
        quantize(folder, tmp_path / "out", method="rtn", group_size=32, tp=tp, progress=False)
    assert "tp" in str(e.value) and repr(tp) in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# Finding 3: `demo --output DIR --overwrite` replaces the demo's previous output.

def test_demo_overwrites_its_previous_output(tmp_path, capsys):
    out = tmp_path / "demo-int4"
    assert main(["demo", "--output", str(out)]) == 0
    assert main(["demo", "--output", str(out)]) == 2  # refused before any work
    assert "already exists: pass --overwrite to replace it" in capsys.readouterr().err
    (out / "model.safetensors").write_bytes(b"stale")
    assert main(["demo", "--output", str(out), "--overwrite"]) == 0
    assert "Int4 GPTQ: perplexity" in capsys.readouterr().out
    assert load_file(out / "model.safetensors")  # the new output replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-int4"]


# Finding 4: pickle weights are pytorch_model.bin, the shards its index lists, or pytorch_model-*.bin shards.

@pytest.fixture
def pickle_folder(tmp_path, stories_dir):
    """A tiny checkpoint as pytorch_model.bin, beside a tokenizer and training arguments that are no weights."""
    folder = save_random_checkpoint(tmp_path / "fp", tiny_config())
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "tok512.bin").write_bytes((stories_dir / "tok512.bin").read_bytes())
    (folder / "training_args.bin").write_bytes(b"\x80\x04 not a state dict")
    return folder, state


def shard(folder, state) -> dict:
    """Split pytorch_model.bin into two shards and their index, as transformers writes them; returns the index."""
    (folder / "pytorch_model.bin").unlink()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return index


def loads_exactly(folder, state):
    reader = WeightReader(folder, allow_pickle=True)
    assert sorted(reader.names()) == sorted(state)
    assert all(torch.equal(reader.get(n), t) for n, t in state.items())
    model = QwenForCausalLM.from_pretrained(folder, allow_pickle=True)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


def test_pickle_folder_reads_only_pytorch_model_bin(pickle_folder, tmp_path, capsys):
    folder, state = pickle_folder
    loads_exactly(folder, state)
    with pytest.raises(ValueError, match=r"holds only pickle weights \(pytorch_model.bin\)"):
        WeightReader(folder)
    assert main([str(folder), "--method", "rtn", "--group-size", "32", "--output", str(tmp_path / "out")]) == 2
    assert "holds only pickle weights (pytorch_model.bin)" in capsys.readouterr().err


def test_pickle_shards_from_their_index_or_their_names(pickle_folder):
    folder, state = pickle_folder
    shard(folder, state)
    loads_exactly(folder, state)
    (folder / "pytorch_model.bin.index.json").unlink()  # without the index: the shards by name, in order
    loads_exactly(folder, state)
    with pytest.raises(ValueError, match=r"holds only pickle weights \(pytorch_model-00001-of-00002.bin\)"):
        WeightReader(folder)


@pytest.mark.parametrize("entry, message", [
    ("../outside.bin", "is not the name of a .bin file inside the model folder"),
    ("/tmp/outside.bin", "is not the name of a .bin file inside the model folder"),
    ("model.safetensors", "is not the name of a .bin file inside the model folder"),
    ("linked/pytorch_model-00001-of-00002.bin", "leads out of the model folder through a link"),
])
def test_pickle_index_pointing_outside_the_folder_is_refused(pickle_folder, tmp_path, entry, message):
    folder, state = pickle_folder
    index = shard(folder, state)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    torch.save(state, outside / "pytorch_model-00001-of-00002.bin")
    (folder / "linked").symlink_to(outside)
    index["weight_map"]["lm_head.weight"] = entry
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(message)):
        WeightReader(folder, allow_pickle=True)


def test_pickle_index_naming_a_missing_shard_and_a_folder_without_weights(pickle_folder):
    folder, state = pickle_folder
    shard(folder, state)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="lists pytorch_model-00002-of-00002.bin, which is missing"):
        WeightReader(folder, allow_pickle=True)
    for path in folder.glob("pytorch_model*"):
        path.unlink()
    for allow_pickle in (False, True):  # tok512.bin and training_args.bin are no weights
        with pytest.raises(FileNotFoundError, match=r"no weights in .*: expected model.safetensors or "
                           r"model.safetensors.index.json \(or, with allow_pickle, pytorch_model.bin"):
            WeightReader(folder, allow_pickle=allow_pickle)
