"""Whether this CPU multiplies bf16 matrices fast: the one fact that picks our CPU arithmetic routes.

Our machines come in two kinds: AVX-512 with bf16 instructions (AVX512-BF16 or AMX), where oneDNN's bf16 GEMM is fast,
and AVX2 only, where bf16 matmuls run several times slower than fp32 (6.6x at 2048 x 2048 x 5504). The answer decides
the dtype a bf16 checkpoint's blocks compute in while quantized (plan.block_compute_dtype) and the dtype of the cpu
backend's prefill tiles (qlinear). `QWEN_QUANT_CPU_BF16=1` or `=0` overrides the detection, so that either route runs,
and is tested, on either kind of machine (the results differ only in rounding; the speed is the machine's).

`best_seconds` times a callable here, for choices made by measuring this machine (qlinear's prefill route), and
`int4pack` writes codes in the layout of torch's CPU int4 kernel, which the cpu backend keeps for both bit widths.
"""
import functools
import os
import time

import torch

BF16_ENV = "QWEN_QUANT_CPU_BF16"
BF16_CHOICES = {"1": True, "0": False, "auto": None, "": None}


@functools.lru_cache(maxsize=None)
def detected_fast_bf16_matmul() -> bool:
    """Native bf16 dot products: oneDNN's bf16 GEMM runs on them (without them it emulates bf16, slowly)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fast_bf16_matmul() -> bool:
    """This CPU's answer, unless $QWEN_QUANT_CPU_BF16 forces one (read at every call: tests switch it)."""
    value = os.environ.get(BF16_ENV, "").strip().lower()
    if value not in BF16_CHOICES:
        raise ValueError(f"${BF16_ENV}={value!r} must be 1 (compute as a CPU with bf16 matmuls does), 0 (as one "
                         "without) or auto")
    forced = BF16_CHOICES[value]
    return detected_fast_bf16_matmul() if forced is None else forced


def best_seconds(fn, calls: int = 3) -> float:
    """The fastest of `calls` timed calls of fn(), after one untimed call (thread pools, kernel selection, first
    touch of scratch memory): the minimum, since other processes only ever add time to a call."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def int4pack(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [K, N] (0..2^bits - 1) in torch's int4pack layout for _weight_int4pack_mm_for_cpu. 8-bit codes take two
    4-bit rows each, their high nibbles in rows 0..K-1 and their low ones in rows K..2K-1 (the cpu backend's Int8,
    see qlinear.CpuInt8QuantLinear)."""
    codes_nk = codes_kn.t().to(torch.int32)
    if bits == 8:
        codes_nk = torch.cat([codes_nk >> 4, codes_nk & 15], dim=1)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_nk.contiguous(), 1)
