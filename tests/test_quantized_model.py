"""Loading quantized checkpoints: our export, the published Qwen layout built here by hand, and gptq_v2."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen_quant import QwenForCausalLM
from qwen_quant.model import load_dequantized
from qwen_quant.quantize import quantize
from qwen_quant.synthetic import random_tensors, save_random_checkpoint
from tiny_model import tiny_config

BACKENDS = ("torch", "cpu", "triton")


@pytest.fixture(scope="module")
def stories_int(stories_dir, tmp_path_factory):
    out = {}
    for bits in (4, 8):
        folder = tmp_path_factory.mktemp(f"int{bits}") / "q"
        quantize(stories_dir, folder, bits=bits, group_size=32, calibration=stories_dir / "calib_ids.npy",
                 nsamples=32, seqlen=128, progress=False)
        out[bits] = folder
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stories_logits_match_dequantized_reference(stories_int, stories_dir, bits, backend):
    folder = stories_int[bits]
    dtype = torch.bfloat16 if backend == "cpu" else torch.float32
    model = QwenForCausalLM.from_pretrained(folder, backend=backend, dtype=dtype)
    assert all(m.backend == backend for m in model.modules() if hasattr(m, "backend"))
    reference = load_dequantized(folder, dtype=torch.float32)
    ids = torch.from_numpy(np.load(stories_dir / "eval_ids.npy")[:96].astype(np.int64)).view(2, 48)
    got, want = model(ids), reference(ids)
    tolerance = 0.1 if backend == "cpu" else 1e-3  # the cpu kernels run in bf16
    assert (got - want).abs().max() < tolerance * want.abs().max()


def test_stories_greedy_text_is_the_same_through_every_backend(stories_int):
    folder = stories_int[4]
    reference = load_dequantized(folder).generate(torch.tensor([1]), max_new_tokens=100)
    assert torch.equal(QwenForCausalLM.from_pretrained(folder, backend="torch", dtype=torch.float32)
                       .generate(torch.tensor([1]), max_new_tokens=100), reference)
    # The Triton interpreter runs each kernel launch in Python (seconds a token): 8 tokens go through the KV cache
    # and the decode kernels; the logits tests compare every position of a prompt.
    assert torch.equal(QwenForCausalLM.from_pretrained(folder, backend="triton", dtype=torch.float32)
                       .generate(torch.tensor([1]), max_new_tokens=8), reference[:, :9])
    # bf16 activations (the only fast dtype of torch's CPU kernels) may part ways late; the start must agree.
    cpu = QwenForCausalLM.from_pretrained(folder, backend="cpu").generate(torch.tensor([1]), max_new_tokens=100)
    assert torch.equal(cpu[:, :30], reference[:, :30])


def pack_by_hand(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values along axis 0, 32 / bits per int32 word, least significant first (AutoGPTQ v1)."""
    per_word = 32 // bits
    rows, cols = values.shape
    out = np.zeros((rows // per_word, cols), dtype=np.uint32)
    for r in range(rows):
        out[r // per_word] |= values[r].astype(np.uint32) << np.uint32(bits * (r % per_word))
    return out.view(np.int32)


def published_layout_checkpoint(folder, bits, group, fmt=None, seed=0):
    """A checkpoint exactly like Qwen's *-Int4 / *-Int8 files (bias on all five linears, no checkpoint_format key,
    zeros stored minus one), and the same weights dequantized by hand as a full-precision checkpoint."""
    config = tiny_config(hidden_size=128, intermediate_size=512, num_attention_heads=4)
    rng = np.random.default_rng(seed)
    quantized, dense = {}, {}
    for name, tensor in random_tensors(config, torch.float32, seed):
        owner = name.rsplit(".", 1)[0]
        linear = owner.split(".", 3)[-1] in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
        if not linear:
            quantized[name], dense[name] = tensor.half(), tensor.half().float()
            continue
        if name.endswith(".bias"):
            continue
        n, k = tensor.shape
        q = rng.integers(0, 2**bits, size=(k, n))
        zeros = rng.integers(1, 2**bits, size=(k // group, n)) if fmt == "gptq_v2" else \
            np.full((k // group, n), 2 ** (bits - 1))
        scales = ((rng.random((k // group, n)) + 0.1) * 2 * k**-0.5 / 2**bits).astype(np.float16)  # |w| ~ 1/sqrt(k)
        stored_zeros = zeros if fmt == "gptq_v2" else zeros - 1
        bias = (rng.standard_normal(n) * 0.1).astype(np.float16)
        quantized.update({owner + ".qweight": torch.from_numpy(pack_by_hand(q, bits)),
                          owner + ".qzeros": torch.from_numpy(pack_by_hand(stored_zeros.T, bits).T.copy()),
                          owner + ".scales": torch.from_numpy(scales),
                          owner + ".g_idx": torch.from_numpy((np.arange(k) // group).astype(np.int32)),
                          owner + ".bias": torch.from_numpy(bias)})
        g_idx = np.arange(k) // group
        w = (q - zeros[g_idx]) * scales.astype(np.float32)[g_idx]  # [K, N]
        dense[owner + ".weight"] = torch.from_numpy(w.T.astype(np.float32))
        dense[owner + ".bias"] = torch.from_numpy(bias.astype(np.float32))
    qconfig = {"bits": bits, "group_size": group, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
               "sym": fmt != "gptq_v2", "true_sequential": True, "model_name_or_path": None,
               "model_file_base_name": "model", "quant_method": "gptq"}
    if fmt:
        qconfig["checkpoint_format"] = fmt
    cfg = {**config.to_dict(), "torch_dtype": "float16", "quantization_config": qconfig}
    (folder / "q").mkdir(parents=True)
    (folder / "q" / "config.json").write_text(json.dumps(cfg))
    save_file(quantized, str(folder / "q" / "model.safetensors"))
    return folder / "q", config, dense


def dense_model(config, dense):
    """The dequantized weights in a plain model: every linear given the bias the checkpoint carries."""
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    for name, tensor in dense.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(tensor, requires_grad=False))
    return model.eval()


@pytest.mark.parametrize("bits, fmt", [(4, None), (8, None), (4, "gptq_v2"), (8, "gptq_v2")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_published_layout_loads(tmp_path, bits, fmt, backend):
    folder, config, dense = published_layout_checkpoint(tmp_path, bits, group=32, fmt=fmt)
    reference = dense_model(config, dense)
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    dtype = torch.bfloat16 if backend == "cpu" else torch.float32
    model = QwenForCausalLM.from_pretrained(folder, backend=backend, dtype=dtype)
    want, got = reference(ids), model(ids)
    tolerance = 0.05 if backend == "cpu" else 1e-3
    assert (got - want).abs().max() < tolerance * want.abs().max(), (got - want).abs().max()
    assert model.generate(ids, max_new_tokens=3).shape == (1, 15)


def test_unsupported_checkpoints_are_named(tmp_path):
    folder, _, _ = published_layout_checkpoint(tmp_path, 4, group=32)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 5
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bits=5"):
        QwenForCausalLM.from_pretrained(folder)
    cfg["quantization_config"]["bits"] = 8  # the 4-bit qweight now has the wrong shape
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.qweight"):
        QwenForCausalLM.from_pretrained(folder)


def unpack_by_hand(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_by_hand, one bit field at a time: int32 [R, C] -> values [R * 32 / bits, C]."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    words = words.view(np.uint32)
    out = np.zeros((words.shape[0] * per_word, words.shape[1]), dtype=np.int64)
    for r in range(out.shape[0]):
        out[r] = (words[r // per_word] >> np.uint32(bits * (r % per_word))) & mask
    return out


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """Widths 192 and 320, which group 128 does not divide: groups of 128 and a last one of 64. RTN 4-bit and
    GPTQ 4 / 8-bit exports of one random model."""
    root = tmp_path_factory.mktemp("ragged")
    fp = save_random_checkpoint(root / "fp", tiny_config(hidden_size=192, intermediate_size=640))
    np.save(root / "calib.npy", np.arange(4000) % 512)
    out = {"fp": fp}
    for key, method, bits in (("rtn4", "rtn", 4), ("gptq4", "gptq", 4), ("gptq8", "gptq", 8)):
        out[key] = root / key
        quantize(fp, out[key], bits=bits, group_size=128, method=method, mse=False, calibration=root / "calib.npy",
                 nsamples=4, seqlen=64, progress=False)
    return out


def test_group_128_on_widths_it_does_not_divide_packs_a_shorter_last_group(ragged):
    from safetensors.numpy import load_file

    fp = load_file(str(ragged["fp"] / "model.safetensors"))
    tensors = load_file(str(ragged["rtn4"] / "model.safetensors"))
    for owner, k in (("transformer.h.0.attn.c_attn", 192), ("transformer.h.1.mlp.c_proj", 320)):
        q = unpack_by_hand(tensors[owner + ".qweight"], 4)  # [K, N]
        zeros = unpack_by_hand(tensors[owner + ".qzeros"].T.copy(), 4).T + 1  # stored minus one
        scales, g_idx = tensors[owner + ".scales"].astype(np.float32), tensors[owner + ".g_idx"]
        groups = -(-k // 128)  # 2 for 192, 3 for 320
        assert q.shape[0] == k and scales.shape[0] == zeros.shape[0] == groups
        assert np.array_equal(g_idx, np.arange(k) // 128)
        assert np.bincount(g_idx).tolist() == [128] * (groups - 1) + [64]
        assert (zeros == 8).all()
        # Symmetric min/max RTN: each group's scale is its own largest |w| over 7.5, the short last group's too, and
        # every weight is within half a step of its dequantized value.
        w = fp[owner + ".weight"].T  # [K, N]
        for g in range(groups):
            rows = slice(128 * g, min(128 * (g + 1), k))
            assert np.allclose(scales[g], np.abs(w[rows]).max(0) / 7.5, rtol=1e-3)
        dequantized = (q - zeros[g_idx]) * scales[g_idx]
        assert (np.abs(dequantized - w) <= scales[g_idx] * 0.505 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_groups_run_on_every_backend(ragged, bits, backend):
    folder = ragged[f"gptq{bits}"]
    dtype = torch.bfloat16 if backend == "cpu" else torch.float32
    model = QwenForCausalLM.from_pretrained(folder, backend=backend, dtype=dtype)
    assert all(m.backend == backend for m in model.modules() if hasattr(m, "backend"))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    got, want = model(ids), load_dequantized(folder)(ids)
    tolerance = 0.05 if backend == "cpu" else 1e-3
    assert (got - want).abs().max() < tolerance * want.abs().max()
