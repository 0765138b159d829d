"""Triton dequant-matmul for GPTQ Int4 / Int8 weights: y = x @ W^T (+ bias), accumulated in fp32.

W[n, k] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]. The input dimension must already be in group
order (QuantLinear sorts act-order weights once at load time), so scales are found by k // group_size and never
gathered through g_idx.

Weight layout, GPTQ's own (no repacking at load, so the torch backend shares the tensors):
- qweight int32 [K * bits / 32, N]: 32 / bits codes of consecutive k per word, least significant first. A tile of
  words [BLOCK_K * bits / 32, BLOCK_N] is loaded once, 16 bytes (4 neighbouring columns) per thread and coalesced
  across the warp, with evict_first (weights are read once per call; activations get evict_last).
- scales [G, N], any float dtype (QuantLinear keeps the activation dtype).
- zeros [G, N], a float tensor of integer zero points, or None for symmetric weights: the zero is then the constant
  2^(bits-1), so symmetric checkpoints (all of Qwen's published Int4 / Int8 ones) read no zeros at all.

Unpacking without gathers: the words tile becomes codes [words, 32 / bits, BLOCK_N] by broadcasting shifts in
registers; element [r, j, n] is row k0 + r * 32 / bits + j, so the codes are already in row order. x for the tile is
then one contiguous [words, 32 / bits] block (loaded once, no strided gathers), and a row-major reshape to
[BLOCK_K, BLOCK_N] is the tl.dot operand in row order.
- GEMV (block_m 1, decode of one row): products are summed over each word's codes in registers and kept in a
  [words, BLOCK_N] accumulator; the one cross-thread reduction happens after the K loop.
- block_m >= 16 (decode of up to 16 rows, prompts of up to 64): tl.dot tiles.
When a K tile lies inside one group, the tile holds the exact integers q - z and the group's scales multiply the
reduced product once (|q - z| <= 256 is exact in fp16 / bf16 dots); otherwise each element is scaled by its group.

Split-K (decode buckets): programs splitting K add their partial sums into a per-device fp32 workspace with relaxed
atomics; the last program of each output tile to arrive (an acq_rel counter) reads the sums back with atomic
exchanges that reset them to zero, adds the bias and writes the output in its final dtype. One launch per call, no
memset and no cast kernel; the workspace is allocated once and left zeroed by every call.

Long prompts (route "dense"): one Triton kernel dequantizes the layer into a scratch of the activation dtype, cached
per device and dtype and shared by every layer (calls on a stream run one after another), and torch's dense matmul
(cuBLAS) multiplies.

The matmul is the torch custom op qwen_quant::gptq_matmul, so torch.compile and CUDA graphs capture it (see
gptq_matmul_op). On CPU tensors this runs only under TRITON_INTERPRET=1.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import (M_BUCKETS, ROUTES, SPLIT_K_MAX_M, MatmulConfig, choose_config, config_problems,
                      fused_prefill_config, m_bucket, split_k_workspace_sizes)

SUPPORTED_BITS = (4, 8)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, K, offs_n, n_mask, stride_qk, stride_g, group_size,
                 BITS: tl.constexpr, SYM: tl.constexpr, TILE_IN_GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows k0 .. k0 + BLOCK_K of the weight, fp32 [BLOCK_K / PER_WORD, PER_WORD, BLOCK_N]: element [r, j, n] is
    row k0 + r * PER_WORD + j. Holds q - z when TILE_IN_GROUP (the caller scales the reduced product), else
    (q - z) * s. Rows past K read as zero codes."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    word_rows = k0 // PER_WORD + tl.arange(0, WORDS)
    words = tl.load(qweight_ptr + word_rows[:, None] * stride_qk + offs_n[None, :],
                    mask=(word_rows < K // PER_WORD)[:, None] & n_mask[None, :], other=0,
                    eviction_policy="evict_first")
    shifts = tl.arange(0, PER_WORD) * BITS
    # A code c ORed into the mantissa of 2^23 is the float 2^23 + c: no int-to-float conversion (a quarter-rate
    # instruction), and subtracting 2^23 + z gives c - z exactly.
    q = (((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32,
                                                                                            bitcast=True)
    if TILE_IN_GROUP:
        if SYM:
            w = q - (8388608.0 + (1 << (BITS - 1)))
        else:
            z = tl.load(zeros_ptr + (k0 // group_size) * stride_g + offs_n, mask=n_mask, other=0.0)
            w = q - (z.to(tl.float32) + 8388608.0)[None, None, :]
    else:
        k = word_rows[:, None] * PER_WORD + tl.arange(0, PER_WORD)[None, :]
        offs = (k // group_size)[:, :, None] * stride_g + offs_n[None, None, :]
        mask = (k < K)[:, :, None] & n_mask[None, None, :]
        s = tl.load(scales_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SYM:
            w = (q - (8388608.0 + (1 << (BITS - 1)))) * s
        else:
            w = (q - (tl.load(zeros_ptr + offs, mask=mask, other=0.0).to(tl.float32) + 8388608.0)) * s
    return w


@triton.jit
def _group_scales(scales_ptr, k0, group_size, stride_g, offs_n, n_mask):
    return tl.load(scales_ptr + (k0 // group_size) * stride_g + offs_n, mask=n_mask, other=0.0).to(tl.float32)


@triton.jit
def _store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, out_mask, n_mask, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _gptq_matmul_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
                        M, N, K, k_per_split, split_k, group_size, stride_xm, stride_qk, stride_g, stride_om,
                        BITS: tl.constexpr, SYM: tl.constexpr, TILE_IN_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
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
    if BLOCK_M == 1:
        # GEMV: per-word sums stay in a [WORDS, BLOCK_N] accumulator; it is reduced across threads once, after the loop.
        acc_words = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        x_row = x_ptr + pid_m * stride_xm
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        w = _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, K, offs_n, n_mask, stride_qk, stride_g, group_size,
                         BITS, SYM, TILE_IN_GROUP, BLOCK_K)
        if BLOCK_M == 1:
            # x of the tile as one contiguous [WORDS, PER_WORD] block, in the codes' row order.
            k = k0 + tl.arange(0, WORDS)[:, None] * PER_WORD + tl.arange(0, PER_WORD)[None, :]
            x = tl.load(x_row + k, mask=(k < K) & m_mask[:, None], other=0.0, eviction_policy="evict_last")
            part = tl.sum(w * x.to(tl.float32)[:, :, None], axis=1)  # over each word's codes, in registers
            if TILE_IN_GROUP:
                part *= _group_scales(scales_ptr, k0, group_size, stride_g, offs_n, n_mask)[None, :]
            acc_words += part
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                        other=0.0, eviction_policy="evict_last")
            w = tl.reshape(w, (BLOCK_K, BLOCK_N))
            if DOT_DTYPE == tl.float32:
                part = tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                part = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE))
            if TILE_IN_GROUP:
                part *= _group_scales(scales_ptr, k0, group_size, stride_g, offs_n, n_mask)[None, :]
            acc += part
    if BLOCK_M == 1:
        acc = tl.sum(acc_words, axis=0)[None, :]

    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        partial_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(partial_ptr + partial_offs, acc, mask=out_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds come before this program's arrival is released
        arrived = tl.atomic_add(arrivals_ptr + pid, 1, sem="acq_rel")
        if arrived == split_k - 1:  # the last program of this tile: read the sums back, leaving zeros
            # Exchanged as int32 bits: the same 32-bit atomic, and the one width the interpreter exchanges.
            bits_ptr = partial_ptr.to(tl.pointer_type(tl.int32)) + partial_offs
            acc = tl.atomic_xchg(bits_ptr, tl.zeros_like(acc).to(tl.int32), mask=out_mask, sem="relaxed")
            acc = tl.where(out_mask, acc.to(tl.float32, bitcast=True), 0.0)  # masked lanes return no value
            _store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, out_mask, n_mask, stride_om, HAS_BIAS)
            tl.store(arrivals_ptr + pid, 0)  # ready for the next call
    else:
        _store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, out_mask, n_mask, stride_om, HAS_BIAS)


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, group_size, stride_qk, stride_g, stride_ok,
                       BITS: tl.constexpr, SYM: tl.constexpr, TILE_IN_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """out [K, N] = W^T in out's dtype, one [BLOCK_K, BLOCK_N] tile per program."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w = _weight_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, K, offs_n, n_mask, stride_qk, stride_g, group_size,
                     BITS, SYM, TILE_IN_GROUP, BLOCK_K)
    if TILE_IN_GROUP:
        w *= _group_scales(scales_ptr, k0, group_size, stride_g, offs_n, n_mask)[None, None, :]
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + k[:, None] * stride_ok + offs_n[None, :],
             tl.reshape(w, (BLOCK_K, BLOCK_N)).to(out_ptr.dtype.element_ty), mask=(k < K)[:, None] & n_mask[None, :])


# Split-K workspace per device: fp32 partial sums [SPLIT_K_MAX_M * N] and int32 arrival counters, zero between calls.
# Allocated while layers are built, never inside a CUDA graph capture; a workspace replaced by a larger one is kept
# alive, since graphs captured earlier still point at it.
_WORKSPACES: dict = {}
_RETIRED_WORKSPACES: list = []

def split_k_workspace(device: torch.device, N: int) -> tuple:
    """(partials, arrivals) on `device` for layers up to N outputs wide."""
    workspace = _WORKSPACES.get(device)
    if workspace is None or workspace[0].numel() < SPLIT_K_MAX_M * N:
        if workspace is not None:
            _RETIRED_WORKSPACES.append(workspace)
        partials, arrivals = split_k_workspace_sizes(N)
        workspace = (torch.zeros(partials, dtype=torch.float32, device=device),
                     torch.zeros(arrivals, dtype=torch.int32, device=device))
        _WORKSPACES[device] = workspace
    return workspace


_SCRATCH: dict = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def dequantize_scratch(device: torch.device, dtype: torch.dtype, numel: int) -> Optional[torch.Tensor]:
    """A flat scratch of at least `numel` elements shared by every layer of this device and dtype (made at the first
    long prompt, so decode-only runs never hold it); None during a CUDA graph capture when it would have to be made
    or grown then (an allocation there would belong to the graph's memory pool)."""
    scratch = _SCRATCH.get((device, dtype))
    if scratch is None or scratch.numel() < numel:
        if _capturing(device):
            return None
        _SCRATCH.pop((device, dtype), None)  # freed before its successor is made
        scratch = _SCRATCH[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return scratch[:numel]


@dataclass(frozen=True)
class Launch:
    """One prepared way to call the matmul for a layer and an M bucket: everything but M decided at load time."""
    config: MatmulConfig
    bits: int
    group: int  # rows per group (K for one group per channel)
    K: int
    N: int
    tile_in_group: bool  # every K tile lies inside one group
    k_per_split: int
    tiles_n: int

    @classmethod
    def prepare(cls, config: MatmulConfig, bits: int, group: int, K: int, N: int) -> "Launch":
        block_k = config.block_k
        return cls(config, bits, group, K, N, tile_in_group=group >= K or group % block_k == 0,
                   k_per_split=triton.cdiv(triton.cdiv(K, block_k), config.split_k) * block_k,
                   tiles_n=triton.cdiv(N, config.block_n))

    def op_config(self) -> list:
        """The config as the custom op's ints: MatmulConfig's fields in order, the route as its index in ROUTES."""
        route, *rest = dataclasses.astuple(self.config)
        return [ROUTES.index(route), *rest]


def _dequantize_into(scratch, launch, qweight, scales, zeros) -> torch.Tensor:
    c = launch.config
    weight = scratch.view(launch.K, launch.N)
    grid = (triton.cdiv(launch.K, c.block_k), launch.tiles_n)
    _dequantize_kernel[grid](
        qweight, scales, zeros if zeros is not None else scales, weight, launch.N, launch.K, launch.group,
        qweight.stride(0), scales.stride(0), weight.stride(0),
        BITS=launch.bits, SYM=zeros is None, TILE_IN_GROUP=launch.tile_in_group, BLOCK_N=c.block_n,
        BLOCK_K=c.block_k, num_warps=c.num_warps)
    return weight


def run(launch: Launch, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] (inner dimension contiguous) times the layer's weight -> [M, N] in x.dtype. No checks: the caller
    (QuantLinear, gptq_matmul) has validated the tensors once."""
    c = launch.config
    M = x.shape[0]
    if c.route == "dense":
        scratch = dequantize_scratch(x.device, x.dtype, launch.K * launch.N)
        if scratch is not None:
            weight = _dequantize_into(scratch, launch, qweight, scales, zeros)
            if bias is None:
                return torch.mm(x, weight)
            return torch.addmm(bias, x, weight) if bias.dtype == x.dtype else torch.mm(x, weight).add_(bias)
        # Under a CUDA graph capture with no scratch yet: the fused kernel, which needs none.
        launch = Launch.prepare(fused_prefill_config(launch.K, launch.group, launch.bits), launch.bits, launch.group,
                                launch.K, launch.N)
        c = launch.config
    split = c.split_k > 1
    partials, arrivals = split_k_workspace(x.device, launch.N) if split else (x, x)
    out = torch.empty(M, launch.N, device=x.device, dtype=x.dtype)
    # The interpreter computes bf16 arithmetic wrongly, so on the CPU the dot runs in fp32.
    dot_dtype = _TL_DTYPES[x.dtype] if x.device.type == "cuda" else tl.float32
    grid = (triton.cdiv(M, c.block_m) * launch.tiles_n, c.split_k)
    _gptq_matmul_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        partials, arrivals, M, launch.N, launch.K, launch.k_per_split, c.split_k, launch.group,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=launch.bits, SYM=zeros is None, TILE_IN_GROUP=launch.tile_in_group, HAS_BIAS=bias is not None,
        SPLIT=split, DOT_DTYPE=dot_dtype, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        GROUP_M=c.group_m, num_warps=c.num_warps, num_stages=c.num_stages)
    return out


def device_config_source(device: torch.device) -> tuple:
    """(gpu name, SM count) for the config table on a CUDA device; (None, None) for the interpreter."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).multi_processor_count


def prepare_launches(bits: int, group: int, K: int, N: int, device: torch.device) -> dict:
    """{M bucket: Launch} for a layer: the table's configs for this GPU, else the heuristic's. Also makes the
    device's split-K workspace now, at load, so that no call allocates it (or does so inside a graph capture)."""
    gpu, sm_count = device_config_source(device)
    launches = {}
    for bucket in M_BUCKETS:
        config = choose_config(bucket, N, K, group, bits, gpu, sm_count)
        launches[bucket] = Launch.prepare(config, bits, group, K, N)
        if config.split_k > 1:
            split_k_workspace(device, N)
    return launches


def launch_for(launches: dict, M: int) -> Launch:
    return launches[m_bucket(M)]


def check_inputs(x, qweight, scales, zeros, bias, bits: int, group_size: int) -> int:
    """Validate one call's tensors; returns the rows per group."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"gptq_matmul supports bits {SUPPORTED_BITS}, got {bits}")
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"gptq_matmul needs fp16, bf16 or fp32 activations, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"gptq_matmul needs x of shape [M, K], got {list(x.shape)}")
    M, K = x.shape
    N = qweight.shape[1]
    group = K if group_size == -1 else group_size
    groups = triton.cdiv(K, group)
    if qweight.dtype != torch.int32 or qweight.shape[0] * 32 != K * bits or not qweight.is_contiguous():
        raise ValueError(f"qweight must be contiguous int32 [{K * bits // 32}, {N}], got {qweight.dtype} "
                         f"{list(qweight.shape)}")
    for label, t, shape in (("scales", scales, (groups, N)), ("zeros", zeros, (groups, N)), ("bias", bias, (N,))):
        if t is not None and (tuple(t.shape) != shape or not t.is_contiguous()):
            raise ValueError(f"{label} must be contiguous {list(shape)}, got {list(t.shape)}")
    return group


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                bias: Optional[torch.Tensor] = None, *, bits: int, group_size: int,
                config: Optional[MatmulConfig] = None) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32) times the GPTQ weight described in the module docstring -> [M, N] in x.dtype,
    with every input checked (QuantLinear checks once at load and calls `run` with prepared launches instead).

    group_size -1 means one group per output channel (G = 1). `config` overrides the table and heuristic (tests,
    benchmarks, autotune)."""
    group = check_inputs(x, qweight, scales, zeros, bias, bits, group_size)
    M, K = x.shape
    N = qweight.shape[1]
    if config is None:
        config = choose_config(m_bucket(M), N, K, group, bits, *device_config_source(x.device))
    problems = config_problems(config, bits)
    if config.split_k > 1 and M > SPLIT_K_MAX_M:
        problems.append(f"split_k={config.split_k} needs M <= {SPLIT_K_MAX_M} rows, got {M}")
    if problems:
        raise ValueError(f"gptq_matmul config {config}: " + "; ".join(problems))
    return run(Launch.prepare(config, bits, group, K, N), x.contiguous(), qweight, scales, zeros, bias)


@torch.library.custom_op("qwen_quant::gptq_matmul", mutates_args=())
def gptq_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], bits: int, group: int, config: list[int]) -> torch.Tensor:
    """The matmul as a torch op: what torch.compile puts in its graph (and a CUDA graph then captures). config:
    Launch.op_config's ints. An opaque custom op rather than torch.library.triton_op: a call uses state that a
    functional trace cannot express (the split-K workspace that every call leaves zeroed, and the shared dequantize
    scratch), and the op's result is a pure function of its inputs, as its schema says."""
    route, *rest = config
    launch = Launch.prepare(MatmulConfig(ROUTES[route], *rest), bits, group, x.shape[1], qweight.shape[1])
    return run(launch, x.contiguous(), qweight, scales, zeros, bias)


@gptq_matmul_op.register_fake
def _(x, qweight, scales, zeros, bias, bits, group, config):
    return x.new_empty(x.shape[0], qweight.shape[1])
