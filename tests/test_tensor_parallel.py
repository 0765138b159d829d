"""--tp N: the MLP width padded so that vLLM can split the Int4 export over N GPUs, without changing any output."""
import json
import re

import numpy as np
import pytest
import torch

from qwen_quant import QwenForCausalLM
from qwen_quant.checkpoint import WeightReader
from qwen_quant.cli import main
from qwen_quant.layout import QUANTIZED_LINEARS
from qwen_quant.model import load_dequantized
from qwen_quant.packing import dequantize
from qwen_quant.quantize import quantize, summary_table
from qwen_quant.synthetic import save_random_checkpoint
from qwen_quant.tensor_parallel import largest_tp, pad_mlp, padded_ffn
from tiny_model import tiny_config

BACKENDS = ("torch", "cpu", "triton")
WIDE = dict(hidden_size=1024, num_attention_heads=8, intermediate_size=27392, num_hidden_layers=2, vocab_size=512)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A random checkpoint with Qwen-14B's MLP width 13696, and its RTN Int4 export with --tp 8."""
    root = tmp_path_factory.mktemp("wide")
    source = save_random_checkpoint(root / "fp", tiny_config(**WIDE), dtype=torch.float16)
    report = quantize(source, root / "int4-tp8", method="rtn", mse=False, group_size=128, tp=8, progress=False)
    return source, root / "int4-tp8", report


@pytest.fixture(scope="module")
def stories_tp(stories_dir, tmp_path_factory):
    """stories260k_qwen's RTN Int4 export without and with --tp 2 (its largest: hidden 64 / 2 = one group of 32)."""
    root = tmp_path_factory.mktemp("stories-tp")
    return {tp: (root / f"tp{tp}", quantize(stories_dir, root / f"tp{tp}", group_size=32, tp=tp, method="rtn",
                                            progress=False)) for tp in (None, 2)}


def logits_match(folder, backend, ids, want):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # else Triton's interpreter
    model = QwenForCausalLM.from_pretrained(folder, backend=backend, device=device,
                                            dtype=torch.bfloat16 if backend == "cpu" else torch.float32)
    assert all(m.backend == backend for m in model.modules() if hasattr(m, "backend"))
    tolerance = 0.1 if backend == "cpu" else 1e-3  # the cpu kernels run in bf16
    assert (model(ids.to(device)).cpu() - want).abs().max() < tolerance * want.abs().max()


def test_padding_rule_reproduces_qwen_facts():
    # (hidden, heads, ffn) of Qwen-1.8B, 7B, 14B, 72B and the largest TP degree of their published Int4 (group 128).
    published = {"1.8B": ((2048, 16, 5504), 1), "7B": ((4096, 32, 11008), 2), "14B": ((5120, 40, 13696), 1),
                 "72B": ((8192, 64, 24576), 8)}
    for (hidden, heads, ffn), degree in published.values():
        assert largest_tp(hidden, heads, ffn, 4, 128) == degree
        assert largest_tp(hidden, heads, padded_ffn(ffn, 128, 8), 4, 128) == 8
    assert padded_ffn(13696, 128, 8) == 14336  # what Qwen later padded Qwen-14B's MLP to
    assert padded_ffn(24576, 128, 8) == 24576  # nothing to do for 72B
    assert padded_ffn(192, 32, 8) == 512  # stories260k: multiples of 64 * 8 = 512 (Marlin's tile per GPU)


@pytest.mark.parametrize("model", ["stories", "wide"])
def test_padded_full_precision_model_gives_the_same_logits(model, stories_dir, wide):
    folder, group = (stories_dir, 32) if model == "stories" else (wide[0], 128)
    net = QwenForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[1, 403, 407, 261, 378, 7, 99, 311]])
    before = net(ids)
    ffn = padded_ffn(net.config.ffn_size, group, 8)
    assert ffn > net.config.ffn_size
    for block in net.transformer.h:
        pad_mlp(block.mlp, ffn)
        assert block.mlp.w1.weight.shape == block.mlp.w2.weight.shape == (ffn, net.config.hidden_size)
    after = net(ids)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_tp_export_of_stories_equals_the_unpadded_one_through_every_backend(stories_dir, stories_tp):
    # Round-to-nearest grids are per row and group: the padded zero rows and zero groups quantize to exact zeros
    # and leave every real weight's code unchanged.
    (plain, plain_report), (padded, padded_report) = stories_tp[None], stories_tp[2]
    assert json.loads((padded / "config.json").read_text())["intermediate_size"] == 512  # MLP 192 -> 256
    ids = torch.from_numpy(np.load(stories_dir / "eval_ids.npy")[:64].astype(np.int64)).view(2, 32)
    want = load_dequantized(padded)(ids)
    assert (want - load_dequantized(plain)(ids)).abs().max() <= 1e-5 * want.abs().max()
    for backend in BACKENDS:
        logits_match(padded, backend, ids, want)
    assert "the largest degree vLLM accepts for this checkpoint is 2" in summary_table(padded_report)
    assert "8 is impossible" in summary_table(padded_report)
    assert "the largest degree vLLM accepts for this checkpoint is 2" in summary_table(plain_report)  # whole groups at 2


def test_tp8_export_of_14b_width_loads_and_matches_its_reference(wide):
    # Triton's CPU interpreter needs minutes for the 14336-wide MLP: it runs on stories above, and here on a GPU.
    _, folder, report = wide
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 2 * 14336
    ids = torch.tensor([[5, 17, 300, 2]])
    want = load_dequantized(folder)(ids)
    for backend in ("torch", "cpu") + (("triton",) if torch.cuda.is_available() else ()):
        logits_match(folder, backend, ids, want)
    assert "the largest degree vLLM accepts for this checkpoint is 8" in summary_table(report)


def vllm_shards(tensors: list, path: str, head_dim: int, group: int, n: int) -> list:
    """The GPTQ tensors of one linear as vLLM splits them over n GPUs (desc_act off): column-parallel linears
    (c_attn per q, k and v by heads; w1, w2) slice the output columns of qweight / scales and the packed columns of
    qzeros; row-parallel linears (attn.c_proj, mlp.c_proj) slice the input rows of qweight (packed), g_idx, and the
    group rows of scales / qzeros. Returns per shard (qweight, qzeros, scales, g_idx, bias, column or row slice)."""
    qweight, qzeros, scales, g_idx, bias = tensors
    k, out = g_idx.shape[0], scales.shape[1]
    pack = 32 // 4
    shards = []
    for r in range(n):
        if path in ("attn.c_proj", "mlp.c_proj"):
            size = k // n
            lo, hi = r * size, (r + 1) * size
            assert size % group == 0 and size % pack == 0, (path, n, size)  # whole groups, whole packed words
            local_g = g_idx[lo:hi] - lo // group
            assert local_g.min() >= 0 and local_g.max() < size // group  # every row's group is in the shard
            shards.append((qweight[lo // pack: hi // pack], qzeros[lo // group: hi // group],
                           scales[lo // group: hi // group], local_g, bias if r == 0 else torch.zeros_like(bias),
                           slice(lo, hi)))
        else:
            parts = 3 if path == "attn.c_attn" else 1
            size = out // parts // n
            assert size % pack == 0 and (path != "attn.c_attn" or size % head_dim == 0), (path, n, size)
            starts = [p * out // parts + r * size for p in range(parts)]  # q, k and v each give their heads
            cols = torch.cat([torch.arange(c, c + size) for c in starts])
            packed_cols = torch.cat([torch.arange(c // pack, (c + size) // pack) for c in starts])
            shards.append((qweight[:, cols], qzeros[:, packed_cols], scales[:, cols], g_idx, bias[cols], cols))
    return shards


def test_vllm_split_of_the_tp8_export_is_valid_and_exact(wide):
    _, folder, _ = wide
    reader = WeightReader(folder)
    x = torch.randn(3, 14336, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for path in QUANTIZED_LINEARS:  # block 0's linears; block 1's have the same shapes
        name = f"transformer.h.0.{path}"
        tensors = [reader.get(f"{name}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx", "bias")]
        w = dequantize(*tensors[:4], 4).double()
        inputs = x[:, : w.shape[1]]
        want = inputs @ w.T + tensors[4].double()
        for n in (2, 4, 8):
            got = torch.zeros_like(want)
            for qweight, qzeros, scales, g_idx, bias, part in vllm_shards(tensors, path, 128, 128, n):
                shard_w = dequantize(qweight, qzeros, scales, g_idx, 4).double()
                if path.endswith("c_proj"):  # row-parallel: the shards' partial outputs are summed (all-reduce)
                    got += inputs[:, part] @ shard_w.T + bias.double()
                else:  # column-parallel: each shard's columns go back to their place
                    got[:, part] = inputs @ shard_w.T + bias.double()
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (name, n)


def test_unpadded_14b_width_cannot_be_split():
    # The same shard rule as above on the unpadded width: 13696 / 2 = 6848 rows of mlp.c_proj = 53.5 groups.
    assert 13696 // 2 % 128 != 0 and largest_tp(1024, 8, 13696, 4, 128) == 1


@pytest.mark.parametrize("args, message", [
    (["--tp", "3"], "--tp 3 is not supported: choose one of"),
    (["--tp", "8"], r"--tp 8: hidden_size 64 / 8 = 8 inputs per GPU of attn.c_proj is not a whole number of groups"),
    (["--tp", "4", "--group-size", "64"], r"--tp 4: hidden_size 64 / 4 = 16 .* groups of 64"),
])
def test_bad_tp_is_refused_before_any_work(stories_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main([str(stories_dir), "--output", str(out), "--method", "rtn", "--group-size", "32", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen-quantize: error: ")
    assert re.search(message, err), err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
