"""The cpu backend's native prompt GEMM (qwen_quant/cpu_prefill.cpp) against a plain fp64 product on fresh random
layers, its two panel codes against each other, and what happens where it cannot run.

It runs on CPUs with AVX-512-BF16 only; on the other kind of machine these tests check that it stays off and that the
cpu backend's prompts run the eager tiles instead (qwen_quant.cpu_prefill.module() is None there)."""
import logging

import pytest
import torch

from qwen_quant import cpu_native, cpu_prefill
from qwen_quant.cpu import int4pack

RUNS_HERE = torch.cpu._is_avx512_bf16_supported() and torch.backends.mkldnn.is_available()


def random_layer(K: int, N: int, bits: int, group: int, seed: int):
    """Codes [K, N], fp32 scales and offsets [K / group, N] and the weight they make, in fp64."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (K, N), generator=gen)
    scales = (torch.rand(K // group, N, generator=gen) + 0.05) / 64
    offsets = (torch.rand(K // group, N, generator=gen) - 0.5) * 2 ** (bits - 4) / 8
    weight = codes.double() * scales.double().repeat_interleave(group, 0) + offsets.double().repeat_interleave(group, 0)
    return codes, scales, offsets, weight


# K: one group, several, groups of 32 to 256; N: whole 64-column blocks and short last ones of 16, 32 and 48;
# M: one row, a few, and more than one 64-row pass (the kernel multiplies 64 prompt rows at a time).
SHAPES = [(256, 64, 4, 256, 1), (256, 80, 8, 32, 3), (320, 112, 4, 64, 17), (512, 144, 8, 128, 64),
          (1024, 176, 4, 128, 65), (384, 128, 8, 128, 130), (2048, 96, 4, 128, 7)]


@pytest.mark.parametrize("K, N, bits, group, M", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_native_gemm_equals_the_fp64_product(K, N, bits, group, M, out_dtype, scaled):
    """Within 1e-5 of x (rounded to bf16) @ W in fp64, relative to |x| @ |W| (fp32 sums; bf16 results within their
    rounding), W as each kind of panel holds it: exact (code panels) or each weight rounded once to bf16 (scaled
    panels); the AVX-512 code and the portable one give the same bits."""
    codes, scales, offsets, weight = random_layer(K, N, bits, group, seed=K + N + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    packed = int4pack(codes, bits)
    if not RUNS_HERE:
        assert cpu_prefill.module() is None
        assert cpu_prefill.matmul(x, packed, scales, offsets, bits, 64, out_dtype) is None
        return
    vector = cpu_prefill.matmul(x, packed, scales, offsets, bits, 64, out_dtype, scaled=scaled)
    portable = cpu_prefill.matmul(x, packed, scales, offsets, bits, 64, out_dtype, scaled=scaled, vector=False)
    assert vector.dtype == out_dtype and vector.shape == (M, N)
    assert torch.equal(vector, portable)
    if scaled:  # fp32 fma, then bf16: what the panel holds
        weight = weight.float().bfloat16().double()
    x_applied = x.bfloat16().double()
    expected = x_applied @ weight
    scale = x_applied.abs() @ weight.abs()
    rounding = 2.0**-8 * expected.abs() if out_dtype == torch.bfloat16 else 0
    assert ((vector.double() - expected).abs() <= 1e-5 * scale + rounding).all()


def test_native_gemm_reads_the_cpu_backends_own_int4pack():
    """The layout the cpu backend keeps for Int4 and Int8 (qwen_quant.cpu.int4pack, laid out by torch for this CPU)
    is the one the kernel reads: a layer's codes come back through identity rows, scale 1 and offset 0."""
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (128, 80), generator=torch.Generator().manual_seed(bits))
        ones, zeros = torch.ones(1, 80), torch.zeros(1, 80)
        # 128 rows: scaled panels, whose weights are the codes here (scale 1, offset 0), exact in bf16
        read = cpu_prefill.matmul(torch.eye(128), int4pack(codes, bits), ones, zeros, bits, 64, torch.float32)
        if RUNS_HERE:
            assert torch.equal(read, codes.float())
        else:
            assert read is None


class WrongSums:
    """An extension whose products are off by one code step in one column: the self-check must catch it."""

    def __init__(self, built):
        self.built = built

    def prefill_matmul(self, *args):
        y = self.built.prefill_matmul(*args)
        y[:, 3] += args[2][0, 3]
        return y


def test_self_check_refuses_wrong_sums():
    if not RUNS_HERE:
        assert cpu_prefill.module() is None
        return
    built = cpu_prefill.module()
    assert cpu_prefill._self_check(built) is None
    problem = cpu_prefill._self_check(WrongSums(built))
    assert problem is not None and "Int4" in problem and "error" in problem


@pytest.fixture
def fresh_build():
    """The build and the check run again in this test, and once more after it (from torch's build cache)."""
    cpu_native.ops.cache_clear()
    cpu_prefill._built_and_checked.cache_clear()
    yield
    cpu_native.ops.cache_clear()
    cpu_prefill._built_and_checked.cache_clear()


def test_a_failed_build_or_check_leaves_the_eager_tiles_with_a_warning(fresh_build, monkeypatch, caplog):
    from torch.utils import cpp_extension

    if not RUNS_HERE:
        assert cpu_prefill.module() is None
        return

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="qwen_quant"):
        assert cpu_native.ops() is None and cpu_prefill.module() is None
    assert "could not be built" in caplog.text and "no C++ compiler here" in caplog.text
    monkeypatch.undo()
    cpu_native.ops.cache_clear()
    cpu_prefill._built_and_checked.cache_clear()
    caplog.clear()
    monkeypatch.setattr(cpu_prefill, "_self_check", lambda built: "Int4, AVX-512 panels: error 1 > 0.001")
    with caplog.at_level(logging.WARNING, logger="qwen_quant"):
        assert cpu_native.ops() is not None and cpu_prefill.module() is None
    assert "disagrees with torch's own results" in caplog.text and "error 1 > 0.001" in caplog.text


def test_off_while_onednn_is_disabled(monkeypatch):
    """torch.backends.mkldnn.enabled = False switches oneDNN off, and its brgemm refuses VNNI panels then."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert cpu_prefill.module() is None
    monkeypatch.undo()
    assert torch.backends.mkldnn.enabled
    assert (cpu_prefill.module() is not None) == RUNS_HERE


def test_an_operator_that_raises_in_its_check_is_left_with_a_warning(monkeypatch, caplog):
    """oneDNN refuses the bf16 microkernel where its ISA is capped (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512-bf16 CPU): a
    check that raises is a failed check, not an error in the user's forward (on any CPU: ops() is stood in for)."""
    monkeypatch.setattr(cpu_native, "ops", lambda: object())

    def refusing(built):
        raise RuntimeError("BFloat16 Brgemm VNNI format is only supported when oneDNN ukernel is enabled")
    with caplog.at_level(logging.WARNING, logger="qwen_quant"):
        assert cpu_native.checked(refusing, "prompt GEMM", "prompts run torch's elementwise tiles instead") is None
    assert "prompt GEMM" in caplog.text and "Brgemm VNNI" in caplog.text and "elementwise tiles" in caplog.text
    assert cpu_native.checked(lambda built: None, "prompt GEMM", "") is not None
