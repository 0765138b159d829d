"""Triton dequant-matmul for GPTQ Int4 / Int8 weights: y = x @ W^T (+ bias), accumulated in fp32.

W[n, k] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]. The input dimension must already be in group
order (QuantLinear sorts act-order weights once at load time), so scales are found by k // group_size and never
gathered through g_idx.

Weight layout, prepared once at load time:
- qweight int32 [K * bits / 32, N]: GPTQ's own layout, 32 / bits codes of consecutive k per word, least significant
  first. Neighbouring threads read neighbouring n, so tile loads are coalesced.
- scales [G, N], any float dtype (QuantLinear keeps the activation dtype).
- zeros [G, N], a float tensor of integer zero points, or None for symmetric weights: the zero is then the constant
  2^(bits-1), so symmetric checkpoints (all of Qwen's published Int4 / Int8 ones) read no zeros at all.

One kernel serves both regimes, with the block shapes chosen by `choose_config` (a heuristic, not autotuning):
- decode (M <= 16) is memory bound: a program loads each [block_k * bits / 32, block_n] tile of words once and uses
  its 32 / bits codes as interleaved row slices (rows j, j + 32 / bits, ...) against the matching strided columns
  of x. K is split across programs (atomic fp32 adds) so that every SM has work even when N gives few column tiles.
- prefill tiles M as well and feeds [block_k, block_n] dequantized tiles to tl.dot; the 32 / bits rows sharing a
  word read it again from L1.
When a K tile lies inside one group, the tile holds the exact integers q - z and the group's scales multiply the
[block_m, block_n] product once: fewer operations per weight than scaling each element, and no rounding of the weight
in a fp16 / bf16 dot (|q - z| <= 256 is exact in both).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

DECODE_MAX_M = 16
SUPPORTED_BITS = (4, 8)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _accumulate(acc, q, k, k0, x_ptr, offs_m, m_mask, stride_xm, K, scales_ptr, zeros_ptr, offs_n, n_mask, stride_g,
                group_size, BITS: tl.constexpr, SYM: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x[:, k] @ W[k, :] for the weight rows k [R] whose codes are q [R, BLOCK_N] (int).

    TILE_IN_GROUP (all rows k lie in the group of row k0): the product uses the exact integers q - z and the group's
    scales multiply it once. Otherwise each element is scaled before the product."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
    q = q.to(tl.float32)
    if TILE_IN_GROUP:
        group_offs = (k0 // group_size) * stride_g + offs_n
        if SYM:
            w = q - (1 << (BITS - 1))
        else:
            w = q - tl.load(zeros_ptr + group_offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        group_offs = (k // group_size)[:, None] * stride_g + offs_n[None, :]
        mask = (k < K)[:, None] & n_mask[None, :]
        s = tl.load(scales_ptr + group_offs, mask=mask, other=0.0).to(tl.float32)
        if SYM:
            w = (q - (1 << (BITS - 1))) * s
        else:
            w = (q - tl.load(zeros_ptr + group_offs, mask=mask, other=0.0).to(tl.float32)) * s
    if BLOCK_M == 1:
        # A matrix-vector product: a dot would waste a tile of padded rows, plain fp32 FMAs suffice.
        part = tl.sum(tl.trans(x.to(tl.float32)) * w, axis=0, keep_dims=True)
    elif DOT_DTYPE == tl.float32:
        part = tl.dot(x.to(tl.float32), w, input_precision="ieee")
    else:
        part = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE))
    if TILE_IN_GROUP:
        part *= tl.load(scales_ptr + group_offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc + part


@triton.jit
def _gptq_matmul_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                        M, N, K, k_per_split, group_size,
                        stride_xm, stride_qk, stride_g, stride_om,
                        BITS: tl.constexpr, SYM: tl.constexpr, TILE_IN_GROUP: tl.constexpr, SPLIT_WORDS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ATOMIC_OUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    # Tiles are visited GROUP_M rows of M-tiles at a time so that concurrent programs share weight tiles in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * tiles_n)) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if SPLIT_WORDS:
            # Decode: load each packed word once and take its PER_WORD codes as PER_WORD interleaved row slices
            # (rows j, j + PER_WORD, ...), each multiplied with the matching strided columns of x.
            rows = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
            words = tl.load(qweight_ptr + rows[:, None] * stride_qk + offs_n[None, :],
                            mask=(rows * PER_WORD < K)[:, None] & n_mask[None, :], other=0)
            for j in tl.static_range(PER_WORD):
                acc = _accumulate(acc, (words >> (j * BITS)) & CODE_MASK, rows * PER_WORD + j, k0,
                                  x_ptr, offs_m, m_mask, stride_xm, K, scales_ptr, zeros_ptr, offs_n, n_mask,
                                  stride_g, group_size, BITS, SYM, TILE_IN_GROUP, BLOCK_M, DOT_DTYPE)
        else:
            # Prefill: a [BLOCK_K, BLOCK_N] tile for tl.dot; the PER_WORD rows sharing a word read it from L1.
            k = k0 + tl.arange(0, BLOCK_K)
            words = tl.load(qweight_ptr + (k // PER_WORD)[:, None] * stride_qk + offs_n[None, :],
                            mask=(k < K)[:, None] & n_mask[None, :], other=0)
            acc = _accumulate(acc, (words >> ((k % PER_WORD) * BITS)[:, None]) & CODE_MASK, k, k0,
                              x_ptr, offs_m, m_mask, stride_xm, K, scales_ptr, zeros_ptr, offs_n, n_mask,
                              stride_g, group_size, BITS, SYM, TILE_IN_GROUP, BLOCK_M, DOT_DTYPE)

    out_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC_OUT:
        tl.atomic_add(out_ptr + out_offs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class MatmulConfig:
    """Launch shape of `_gptq_matmul_kernel`. Block sizes are powers of two; split_k > 1 splits K across programs;
    split_words selects the decode loop (each packed word loaded once, block_k a multiple of 32 / bits)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    split_words: bool = False
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_k_for_groups(group: int, K: int, cap: int) -> int:
    """The largest power of two <= cap whose tiles never straddle a group, or cap when no useful one exists."""
    if group >= K:
        return cap
    aligned = group & -group  # largest power of two dividing group
    return min(aligned, cap) if aligned >= 16 else cap


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def choose_config(M: int, N: int, K: int, group: int, bits: int, device: torch.device) -> MatmulConfig:
    """Block shapes from a small heuristic in (M, N, K) instead of autotuning (which the interpreter cannot run)."""
    decode = M <= DECODE_MAX_M
    if device.type != "cuda":
        # Triton's CPU interpreter runs each program as numpy calls: few, large programs are fastest.
        return MatmulConfig(block_m=1 if M == 1 else min(64, _pow2_at_least(M)),
                            block_n=min(256, _pow2_at_least(N)),
                            block_k=_block_k_for_groups(group, K, 256), split_words=decode)
    if decode:
        # Each of the 32 / bits interleaved row slices of a K tile feeds a dot of depth >= 16 (tl.dot's minimum).
        block_n, block_k = 64, 16 * (32 // bits)
        tiles_n, tiles_k = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
        # Memory bound: split K until there are a few programs per SM, keeping >= 2 K tiles per program.
        split_k, target = 1, 4 * _sm_count(device)
        while tiles_n * split_k < target and tiles_k >= 4 * split_k:
            split_k *= 2
        return MatmulConfig(block_m=1 if M == 1 else 16, block_n=block_n, block_k=block_k, split_k=split_k,
                            split_words=True)
    block_m = 64 if M <= 64 else 128
    return MatmulConfig(block_m=block_m, block_n=128, block_k=_block_k_for_groups(group, K, 64),
                        num_warps=4 if block_m == 64 else 8, num_stages=3)


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                bias: Optional[torch.Tensor] = None, *, bits: int, group_size: int,
                config: Optional[MatmulConfig] = None) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32) times the GPTQ weight described in the module docstring -> [M, N] in x.dtype.

    group_size -1 means one group per output channel (G = 1). `config` overrides the heuristic (tests, benchmarks).
    On CPU tensors this runs only under TRITON_INTERPRET=1."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"gptq_matmul supports bits {SUPPORTED_BITS}, got {bits}")
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"gptq_matmul needs fp16, bf16 or fp32 activations, got {x.dtype}")
    M, K = x.shape
    N = qweight.shape[1]
    group = K if group_size == -1 else group_size
    groups = triton.cdiv(K, group)
    if qweight.dtype != torch.int32 or qweight.shape[0] * 32 != K * bits:
        raise ValueError(f"qweight must be int32 [{K * bits // 32}, {N}], got {qweight.dtype} {list(qweight.shape)}")
    for label, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and (t.shape != (groups, N) or not t.is_contiguous()):
            raise ValueError(f"{label} must be contiguous [{groups}, {N}], got {list(t.shape)}")
    x = x.contiguous()
    qweight = qweight.contiguous()

    cfg = config or choose_config(M, N, K, group, bits, x.device)
    block_k = cfg.block_k
    if cfg.split_words and block_k % (32 // bits):
        raise ValueError(f"split_words needs block_k to be a multiple of {32 // bits} for {bits} bits")
    k_per_split = triton.cdiv(triton.cdiv(K, block_k), cfg.split_k) * block_k
    atomic_out = cfg.split_k > 1
    if atomic_out:
        # Split-K partial sums meet in an fp32 buffer that starts as the bias.
        out = (bias.to(torch.float32).expand(M, N).contiguous() if bias is not None
               else torch.zeros(M, N, device=x.device, dtype=torch.float32))
    else:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    # The interpreter computes bf16 arithmetic wrongly, so on CPU the dot runs in fp32.
    dot_dtype = tl.float32 if x.device.type != "cuda" else _TL_DTYPES[x.dtype]
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)
    _gptq_matmul_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        M, N, K, k_per_split, group,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, SYM=zeros is None, TILE_IN_GROUP=groups == 1 or group % block_k == 0, SPLIT_WORDS=cfg.split_words,
        HAS_BIAS=bias is not None and not atomic_out, ATOMIC_OUT=atomic_out, DOT_DTYPE=dot_dtype,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x.dtype) if atomic_out else out
