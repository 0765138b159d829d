"""The cpu backend's prompt GEMM (qwen_quant::prefill_matmul, cpu_prefill.cpp), for CPUs with AVX-512-BF16: a block
of int4pack weights at a time written into a panel in oneDNN's layout and multiplied by its bf16 microkernel; short
prompts through panels of exact codes (each group's scale applied to its fp32 sums), long ones through panels of the
weights rounded to bf16 (see SCALED_FROM_ROWS).

Why native: on the 2-core AVX-512-bf16 machine a dense bf16 GEMM of 64 prompt rows takes about 0.17 ms per million
weights, torch's int4pack kernel 0.4 (it multiplies in fp32, a GEMV per row), and bf16 tiles dequantized for the
dense GEMM by torch's elementwise operations 0.23 more (prompts ran at 0.65-0.85x of bf16). torch ships no GEMM that
reads int4pack codes inside its loop; its brgemm microkernel (at::native::cpublas::brgemm, which its CPU flash
attention and inductor's GEMM templates use) can be reached from C++ only.

Built with our other native kernels (qwen_quant.cpu_native), then checked once against a plain fp64 product, so that
a CPU this was never run on (AMX, say) cannot get wrong sums. Where the CPU has no AVX-512-BF16, oneDNN is disabled
(torch.backends.mkldnn: its brgemm refuses VNNI panels then), the build fails or the check does, `module()` is None
(the last two with a warning) and prompts run the cpu backend's elementwise tiles instead.
"""
import functools
from typing import Optional

import torch

from qwen_quant import cpu_native
from qwen_quant.cpu import int4pack


def module():
    """The checked operators (torch.ops.qwen_quant), or None where the GEMM does not run here (see above)."""
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return None
    return _built_and_checked()


def runs(block: int) -> bool:
    """Whether the GEMM serves an int4pack layout of `block`-column blocks here (AVX-512's are 64 wide)."""
    return block == 64 and module() is not None


@functools.lru_cache(maxsize=None)
def _built_and_checked():
    if not torch.cpu._is_avx512_bf16_supported():
        return None
    return cpu_native.checked(_self_check, "prompt GEMM", "prompts run torch's elementwise tiles instead")


def _self_check(built) -> Optional[str]:
    """What is wrong with the extension's products of a small random layer (both bit widths, a short last block,
    both panel codes), or None: each within 1e-5 of the fp64 product, relative to |x| @ |W|."""
    gen = torch.Generator().manual_seed(0)
    K, N, group = 256, 80, 64  # N: one whole 64-column block and a short one of 16
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (K, N), generator=gen)
        scales = torch.rand(K // group, N, generator=gen) / 64
        offsets = -(2 ** (bits - 1)) * scales
        x = torch.randn(5, K, generator=gen).to(torch.bfloat16).double()
        scale, offset = (t.double().repeat_interleave(group, 0) for t in (scales, offsets))
        weight = codes.double() * scale + offset
        bound = 1e-5 * (x.abs() @ weight.abs()).max().item()
        packed = int4pack(codes, bits)
        for scaled in (False, True):
            # Scaled panels hold each weight rounded once to bf16 (fp32 fma, then bf16): the product of those.
            target = x @ (weight.float().bfloat16().double() if scaled else weight)
            for vector in (True, False):
                y = built.prefill_matmul(x.bfloat16(), packed, scales, offsets, bits, scaled, vector, False)
                error = (y.double() - target).abs().max().item()
                if not error <= bound:
                    return (f"Int{bits}, {'scaled' if scaled else 'code'} panels, {'AVX-512' if vector else 'portable'}"
                            f" code: error {error:.3g} > {bound:.3g}")
    return None


# Prompts of this many rows or more run scaled panels, shorter ones code panels (see cpu_prefill.cpp). Scaled panels
# are faster at every length (the AVX-512-bf16 machine, 2048 x 5504 and 5504 x 2048, Int4 / Int8: 1.15-1.27x of dense
# bf16 at 32 rows, 1.00-1.06x at 512, against code panels' 1.00-1.20x and 0.89-0.93x) but round each weight to bf16;
# code panels apply the quantized weights exactly and keep short prompts (chat turns) at 0.94-1.04x of bf16 from 64
# rows down. From 128 rows the scaling's cost (0.91-0.99x there) is not worth the exactness.
SCALED_FROM_ROWS = 128


def scratch_bytes(K: int, rows: int) -> int:
    """What the GEMM keeps between calls, for layers with K inputs and prompts of `rows` rows: per thread, a 64-column
    panel of K rows in bf16, and the fp32 sums of 64 columns for 64 rows (two of them) or, with scaled panels, for every
    row (kColumns and kRows in the .cpp)."""
    return torch.get_num_threads() * (K * 64 * 2 + (64 * 4) * (64 + max(64, rows)))


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int,
           block: int, out_dtype: torch.dtype, scaled: Optional[bool] = None,
           vector: bool = True) -> Optional[torch.Tensor]:
    """x [M, K] (rounded to bf16) @ W in out_dtype (from fp32 sums), W [K, N] = codes * scales + offsets (fp32
    [G, N], G equal groups of rows), the codes read from int4pack `packed` of `block`-column blocks (Int8: two
    int4pack rows a code, see cpu.int4pack). None where the extension does not run here (or the layout is not
    AVX-512's 64-column blocks). scaled: the panels' kind (default: scaled from SCALED_FROM_ROWS rows; they round
    each weight to bf16, code panels do not). vector=False runs the portable loops throughout (as the short last
    block always does): the same bits, for tests."""
    if not runs(block):
        return None
    if scaled is None:
        scaled = x.shape[0] >= SCALED_FROM_ROWS
    y = module().prefill_matmul(x.to(torch.bfloat16).contiguous(), packed, scales.to(torch.float32).contiguous(),
                             offsets.to(torch.float32).contiguous(), bits, scaled, vector,
                             out_dtype == torch.bfloat16)
    return y.to(out_dtype)
