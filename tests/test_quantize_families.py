"""Quantization and export of the later Qwen generations (issue 24, items 2 and 3): qwen2 / qwen3 checkpoints are
quantized block by block in their layout's groups (q/k/v from one Hessian), their norms, q/k norms, embedding and a
tied head written unquantized, and exported in Qwen's published Qwen2.5-*-GPTQ-Int4 form (quantization_config in
config.json, no quantize_config.json)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli_runner import run_cli
from qwen_quant import QwenForCausalLM
from qwen_quant.checkpoint import WeightReader
from qwen_quant.config import QwenConfig
from qwen_quant.layout import layout_of
from qwen_quant.loading import load_dequantized_weights
from qwen_quant.quantize import quantize
from test_generations import HF, hf_config, perturbed

# A tied qwen2 model with GQA and q/k/v biases; an untied qwen3 one with an explicit head_dim (heads x head_dim is
# not the hidden size) and q/k norms away from ones.
FAMILIES = {"qwen2": dict(heads=4, kv_heads=2, head_dim=None, tied=True, bias=False),
            "qwen3": dict(heads=4, kv_heads=2, head_dim=32, tied=False, bias=True)}
CALIBRATION = dict(nsamples=4, seqlen=32, group_size=32, progress=False)


def calibration_ids(vocab: int) -> torch.Tensor:
    """A stream of token ids to take the calibration windows from."""
    return torch.randint(0, vocab, (512,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def source(request, tmp_path_factory) -> Path:
    """A random model of the family, saved by transformers in fp32."""
    torch.manual_seed(11)
    model = perturbed(HF[request.param][1](hf_config(request.param, **FAMILIES[request.param])).float(), seed=2)
    folder = tmp_path_factory.mktemp(request.param) / "fp"
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tensors_of(folder: Path) -> dict:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def dequantized(folder: Path) -> QwenForCausalLM:
    config = QwenConfig.from_file(folder)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    return load_dequantized_weights(model, WeightReader(folder))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_later_families_quantize_export_and_run(source, method, tmp_path):
    config = QwenConfig.from_file(source)
    layout = layout_of(config)
    out = tmp_path / "int4"
    quantize(source, out, method=method, calibration=calibration_ids(config.vocab_size), **CALIBRATION)
    assert not (out / "quantize_config.json").exists()
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == config.model_type and written["dtype"] == written["torch_dtype"] == "float16"
    assert written["quantization_config"] == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                              "sym": True, "damp_percent": 0.01, "true_sequential": True,
                                              "static_groups": False, "checkpoint_format": "gptq"}
    assert not {"bf16", "fp16", "fp32", "quantize_config"} & written.keys()  # v1's remote-code flags
    card = (out / "README.md").read_text()  # no auto_map note: the family needs no remote code
    assert "auto_map" not in card and "note: tensor parallel: " in card  # vLLM's rule for GQA (test_families_plan)
    # The unquantized tensors are the source's in fp16, bit for bit; a tied head stays tied (not written).
    before, after = tensors_of(source), tensors_of(out)
    kept = [layout.embedding, layout.final_norm] + [layout.block_prefix(i) + f"{norm}.weight" for i in range(2)
                                                    for norm in layout.norms + layout.qk_norms]
    for name in kept:
        assert torch.equal(after[name], before[name].half()), name
    assert (layout.lm_head in after) == (not config.tie_word_embeddings)
    # Biases where the model has them (qwen2's q/k/v), none elsewhere: as the peers write these families.
    biased = {path for path, (_, _, bias) in layout.linear_shapes(config).items() if bias}
    for path in layout.linears:
        name = f"{layout.block_prefix(0)}{path}.bias"
        assert (name in after) == (path in biased), name
        if path in biased:
            assert torch.equal(after[name], before[name].half())
    if not config.tie_word_embeddings:
        assert torch.equal(after[layout.lm_head], before[layout.lm_head].half())
    # Our runtime on the export equals the export's dequantized weights.
    ids = calibration_ids(config.vocab_size)[:64].view(2, 32)
    quantized = QwenForCausalLM.from_pretrained(out, dtype=torch.float32, backend="torch")
    reference = dequantized(out)
    with torch.no_grad():
        got, expected = quantized(ids), reference(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_qkv_share_one_hessian_and_gate_up_another(source, tmp_path):
    """With act-order the order of a linear's columns is its Hessian's diagonal's: q, k and v (one input) get one
    g_idx, gate and up another; o and down, with inputs of their own, others."""
    config = QwenConfig.from_file(source)
    layout = layout_of(config)
    quantize(source, tmp_path / "int4", desc_act=True, calibration=calibration_ids(config.vocab_size), **CALIBRATION)
    after = tensors_of(tmp_path / "int4")
    for i in range(config.num_hidden_layers):
        g_idx = {path: after[f"{layout.block_prefix(i)}{path}.g_idx"] for path in layout.linears}
        for group in layout.groups:
            assert all(torch.equal(g_idx[path], g_idx[group[0]]) for path in group), group
        assert not torch.equal(g_idx[layout.qkv[0]], g_idx[layout.out])  # act-order did reorder by the Hessian


class Killed(BaseException):
    pass


def kill_after_first_block(block_report) -> None:
    raise Killed


# Every option of the method on the later families, and a kill after the first block resumed to the same bytes (the
# resumed block's outputs, full-precision stream included, recomputed through the layout's q/k norms and widths).
@pytest.mark.parametrize("options", [dict(desc_act=True, static_groups=True, sym=False),
                                     dict(asym_calibration=0.5, input_scaling=True, refine_passes=2)])
def test_every_option_and_resume_on_the_later_families(source, options, tmp_path):
    config = QwenConfig.from_file(source)
    kwargs = dict(calibration=calibration_ids(config.vocab_size), **CALIBRATION, **options)
    quantize(source, tmp_path / "straight", **kwargs)
    with pytest.raises(Killed):
        quantize(source, tmp_path / "resumed", on_block=kill_after_first_block, **kwargs)
    report = quantize(source, tmp_path / "resumed", resume=True, **kwargs)
    assert report.resumed_blocks == 1
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "model.safetensors").read_bytes()
    ids = calibration_ids(config.vocab_size)[:64].view(2, 32)
    with torch.no_grad():
        got = QwenForCausalLM.from_pretrained(tmp_path / "resumed", dtype=torch.float32, backend="torch")(ids)
        expected = dequantized(tmp_path / "resumed")(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def two_blocks(folder: Path, target: Path) -> Path:
    """folder's model cut to its first two blocks (its tokenizer, embedding and head kept)."""
    config = json.loads((folder / "config.json").read_text())
    block_tensor = layout_of(QwenConfig.from_dict(config)).block_tensor
    target.mkdir()
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    (target / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    with safe_open(folder / "model.safetensors", "pt") as f:
        kept = {n: f.get_tensor(n) for n in f.keys()
                if not (match := block_tensor.fullmatch(n)) or int(match[1]) < 2}
    save_file(kept, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_smollm2_qwen2_layout_quantizes_as_its_v1_layout(smollm2_dir, smollm2_qwen2_dir, method, tmp_path):
    """The same two blocks in both layouts: qwen2's k/v rows are v1's rows of the kv heads, and GPTQ treats rows
    independently given the shared Hessian, so the Int4 exports compute the same logits."""
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(4))
    logits = []
    for name, folder in (("v1", smollm2_dir), ("qwen2", smollm2_qwen2_dir)):
        out = tmp_path / f"{name}-int4"
        quantize(two_blocks(folder, tmp_path / name), out, method=method, mse=False, seed=0,
                 calibration=torch.randint(0, 49152, (512,), generator=torch.Generator().manual_seed(5)),
                 **{**CALIBRATION, "group_size": 64})
        with torch.no_grad():
            logits.append(QwenForCausalLM.from_pretrained(out, dtype=torch.float32, backend="torch")(ids))
    v1, qwen2 = logits
    assert (v1 - qwen2).abs().max() <= 1e-3 * v1.abs().max()


def test_tp_that_vllm_cannot_split_is_refused_before_anything_is_written(source, tmp_path, capsys):
    """(--tp on the later families: tests/test_families_plan.py)"""
    out = tmp_path / "int4"
    code, err, _ = run_cli([str(source), "--output", str(out), "--method", "rtn", "--tp", "2"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--tp 2: hidden_size 64 inputs per GPU of self_attn.q_proj is not a whole number of groups of 128" in err
    assert not out.exists() and not (tmp_path / "int4.partial").exists()


def test_overwrite_replaces_a_previous_later_family_output(source, tmp_path):
    """Its folder has no quantize_config.json: config.json and our model card mark it as ours."""
    out = tmp_path / "int4"
    quantize(source, out, method="rtn", progress=False)
    (out / "README.md").write_text((out / "README.md").read_text() + "\nedited\n", encoding="utf-8")
    quantize(source, out, method="rtn", progress=False, overwrite=True)
    assert "edited" not in (out / "README.md").read_text()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_later_family_exports_run_through_every_backend(source, backend, tmp_path):
    """Item 5: a qwen2 / qwen3 Int4 export (GQA, biases, q/k norms, tied and untied heads) through each backend, against
    its dequantized fp32 reference (the triton backend under the interpreter on a CPU)."""
    config = QwenConfig.from_file(source)
    out = tmp_path / "int4"
    quantize(source, out, method="rtn", **CALIBRATION)
    dtype = torch.bfloat16 if backend == "cpu" else torch.float32
    # The tiny MLP width (80) is no whole number of the cpu kernels' groups: "auto" runs those linears on torch.
    model = QwenForCausalLM.from_pretrained(out, backend="auto" if backend == "cpu" else backend, dtype=dtype)
    used = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert used == ({"cpu", "torch"} if backend == "cpu" else {backend})
    # q/k/v and gate/up each run as one layer (vLLM's names), in place of the three and the two.
    attention, mlp = (model.blocks[0].get_submodule(p) for p in ("self_attn", "mlp"))
    assert set(attention._modules) - {"q_norm", "k_norm"} == {"qkv_proj", "o_proj"}
    assert set(mlp._modules) == {"gate_up_proj", "down_proj"}
    ids = calibration_ids(config.vocab_size)[:32].view(2, 16)
    with torch.no_grad():
        got, want = model(ids).float(), dequantized(out)(ids)
    tolerance = 0.1 if backend == "cpu" else 1e-3  # the cpu kernels run in bf16
    assert (got - want).abs().max() < tolerance * want.abs().max()


def test_siblings_sorted_by_different_g_idx_load_apart(source, tmp_path):
    """A file whose k_proj sorts its inputs by another g_idx than q_proj's (act-order from another quantizer): q/k/v
    stay three layers (gate/up still join), and the model computes what its dequantized weights give."""
    out = tmp_path / "int4"
    quantize(source, out, method="rtn", **CALIBRATION)
    tensors = tensors_of(out)
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name][torch.randperm(len(tensors[name]), generator=torch.Generator().manual_seed(0))]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model = QwenForCausalLM.from_pretrained(out, backend="torch", dtype=torch.float32)
    first, second = model.blocks[0], model.blocks[1]
    assert {"q_proj", "k_proj", "v_proj"} <= set(first.self_attn._modules)
    assert "qkv_proj" not in first.self_attn._modules
    assert "qkv_proj" in second.self_attn._modules and "gate_up_proj" in first.mlp._modules
    ids = calibration_ids(QwenConfig.from_file(out).vocab_size)[:32].view(2, 16)
    with torch.no_grad():
        got, want = model(ids), dequantized(out)(ids)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
