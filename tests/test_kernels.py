"""The Triton GPTQ kernels (under the interpreter on CPU) against an fp64 reference built from the integer codes.

Shapes are small and deliberately not multiples of the block sizes; forced configs cover the paths the CPU
heuristic does not pick (split-K, per-element scales, the GPU block shapes)."""
import pytest
import torch

from qwen_quant import packing, synthetic
from qwen_quant.kernels import gptq_matmul as gm

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_gptq(K, N, bits, group_size, symmetric, act_order, seed):
    """Codes q [K, N], true zeros [G, N], fp16 scales [G, N] and g_idx [K] as a GPTQ quantizer would make them."""
    q, zeros, scale_draws, g_idx = synthetic.random_gptq(K, N, bits, group_size, symmetric=symmetric,
                                                         act_order=act_order, lowest_zero=0,
                                                         generator=torch.Generator().manual_seed(seed))
    return q, zeros, (scale_draws * 0.02 + 0.002).half(), g_idx.long()


def reference(x, q, zeros, scales, g_idx, bias):
    w = (q.double() - zeros.double()[g_idx]) * scales.double()[g_idx]  # [K, N]
    y = x.double() @ w
    return y + bias.double() if bias is not None else y


def run_kernel(x, q, zeros, scales, g_idx, bias, bits, group_size, symmetric, config=None):
    """What QuantLinear does for act-order: sort the input rows by group once, gather x columns to match."""
    perm = torch.argsort(g_idx, stable=True)
    zeros_arg = None if symmetric else zeros.to(x.dtype)
    return gm.gptq_matmul(x[:, perm], packing.pack_qweight(q[perm], bits), scales.to(x.dtype), zeros_arg,
                          bias, bits=bits, group_size=group_size, config=config)


def relative_error(y, r):
    return ((y.double() - r).norm() / r.norm()).item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 3, 16, 64])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference(bits, M, group_size, symmetric):
    K, N = 288, 200  # neither is a multiple of the blocks; 288 = 2.25 groups of 128
    dtype = (torch.float16, torch.bfloat16, torch.float32)[(M + bits + group_size) % 3]
    q, zeros, scales, g_idx = random_gptq(K, N, bits, group_size, symmetric, act_order=False, seed=M * 31 + bits)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if M % 2 else None
    y = run_kernel(x, q, zeros, scales, g_idx, bias, bits, group_size, symmetric)
    assert y.dtype == dtype and y.shape == (M, N)
    assert relative_error(y, reference(x, q, zeros, scales, g_idx, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_act_order(bits, M, group_size):
    K, N = 256, 96
    q, zeros, scales, g_idx = random_gptq(K, N, bits, group_size, symmetric=False, act_order=True, seed=7)
    x = torch.randn(M, K)
    bias = torch.randn(N)
    y = run_kernel(x, q, zeros, scales, g_idx, bias, bits, group_size, symmetric=False)
    assert relative_error(y, reference(x, q, zeros, scales, g_idx, bias)) < TOLERANCE[torch.float32]


# Configs the CPU heuristic never picks: split-K with atomics (and a bias folded into the fp32 buffer), K tiles
# wider than a group (per-element scales) in both loops, a 16-row dot tile for few rows as on the GPU, the
# matrix-vector product in the prefill loop.
FORCED = {
    "splitk3": gm.MatmulConfig(block_m=16, block_n=64, block_k=64, split_k=3),
    "wide_k": gm.MatmulConfig(block_m=4, block_n=128, block_k=256),
    "gemv_splitk2": gm.MatmulConfig(block_m=1, block_n=64, block_k=128, split_k=2, split_words=True),
    "decode_dot_wide_k": gm.MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=2, split_words=True),
    "gemv_prefill_loop": gm.MatmulConfig(block_m=1, block_n=128, block_k=32),
}


@pytest.mark.parametrize("name", FORCED)
@pytest.mark.parametrize("bits", [4, 8])
def test_forced_configs(name, bits):
    config = FORCED[name]
    K, N, M = 320, 136, 1 if config.block_m == 1 else 5
    q, zeros, scales, g_idx = random_gptq(K, N, bits, 32, symmetric=False, act_order=False, seed=3)
    x = torch.randn(M, K, dtype=torch.float16)
    bias = torch.randn(N, dtype=torch.float16)
    y = run_kernel(x, q, zeros, scales, g_idx, bias, bits, 32, symmetric=False, config=config)
    assert relative_error(y, reference(x, q, zeros, scales, g_idx, bias)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gpu_configs_compute_correctly(monkeypatch, bits, M, group_size):
    """The block shapes chosen for an H100 (132 SMs), run here under the interpreter."""
    monkeypatch.setattr(gm, "_sm_count", lambda device: 132)
    K, N = 512, 192
    config = gm.choose_config(M, N, K, K if group_size == -1 else group_size, bits, torch.device("cuda"))
    assert config.block_m in (1, 16) if M <= gm.DECODE_MAX_M else config.block_m >= 16
    assert config.block_n >= 16
    assert config.block_k // (32 // bits if config.split_words else 1) >= 16  # tl.dot depth on a GPU
    if M <= gm.DECODE_MAX_M:
        assert config.split_k > 1  # 5 column tiles alone would leave most SMs idle
    q, zeros, scales, g_idx = random_gptq(K, N, bits, group_size, symmetric=True, act_order=False, seed=M)
    x = torch.randn(M, K, dtype=torch.float16)
    y = run_kernel(x, q, zeros, scales, g_idx, None, bits, group_size, symmetric=True, config=config)
    assert relative_error(y, reference(x, q, zeros, scales, g_idx, None)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_split_fills_an_h100(monkeypatch, bits):
    monkeypatch.setattr(gm, "_sm_count", lambda device: 132)
    config = gm.choose_config(1, 4096, 4096, 128, bits, torch.device("cuda"))
    programs = -(-4096 // config.block_n) * config.split_k
    assert programs >= 2 * 132
    assert 4096 % (config.block_k * config.split_k) == 0  # every split holds whole groups


def test_rejects_bad_inputs():
    q, zeros, scales, _ = random_gptq(64, 32, 4, 32, symmetric=True, act_order=False, seed=0)
    qweight = packing.pack_qweight(q, 4)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits"):
        gm.gptq_matmul(x, qweight, scales, None, bits=3, group_size=32)
    with pytest.raises(ValueError, match="qweight"):
        gm.gptq_matmul(torch.randn(2, 72), qweight, scales, None, bits=4, group_size=32)
    with pytest.raises(ValueError, match="scales"):
        gm.gptq_matmul(x, qweight, scales[:1], None, bits=4, group_size=32)
    with pytest.raises(TypeError, match="activations"):
        gm.gptq_matmul(x.double(), qweight, scales, None, bits=4, group_size=32)
