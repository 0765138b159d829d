"""QuantLinear: one GPTQ-quantized linear layer, its matmul run by the fastest backend for its device.

Build it with `QuantLinear.from_packed` from a checkpoint's qweight / qzeros / scales / g_idx / bias. That validates
every tensor, sorts act-order weights by group once (forward then gathers x[..., perm]), and prepares one backend
(`validate_on` and `from_sorted` are its two halves; `join_outputs` between them makes linears that read one input
a single layer):

- "torch": dequantize-then-matmul on any device; the reference, and the path for 2 / 3-bit weights and for g_idx
  whose groups are not equal contiguous runs after sorting.
- "triton": the kernels of qwen_quant.kernels for Int4 / Int8 on CUDA (or on CPU under TRITON_INTERPRET=1).
- "cpu": torch's int4pack / int8pack CPU kernels, fed bf16 activations (the only fast dtype there), for decoding and
  short prompts. Longer prompts take the prompt route: on CPUs with fast bf16 matmuls, the native GEMM of
  qwen_quant.cpu_prefill (AVX-512-BF16, for the int4pack layouts) or else bf16 tiles of the dequantized weight
  multiplied by torch's dense GEMM; on the others fp32 tiles (see _tiled_matmul). The prompt length where the route
  starts is measured on this machine, once per process and kind of layer, by timing both on a probe layer (see
  cpu_prefill_rows).
- "auto": triton on CUDA for 4 / 8 bits, cpu on CPU where its kernels accept the layout, else torch.

Backends are subclasses of QuantLinear; all of them take x [..., K] in any float dtype and return [..., N] in x's
dtype. The backend is chosen for the device the module is built on (from_packed's `device`), because the cpu and
triton layouts only run there: `.to()` moves a torch-backend module anywhere, the others only within their device
type. Float dtype changes (`model.half()`) are harmless: the cpu backend keeps its float tensors as integer bits.
The tensors are non-persistent buffers: their layouts are backend-specific, so state_dict() leaves them out and a
module is always rebuilt from the checkpoint with from_packed.
"""
import functools
import importlib.util
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from qwen_quant import cpu_prefill, packing
from qwen_quant.cpu import best_seconds, fast_bf16_matmul, int4pack
from qwen_quant.finite import all_finite

logger = logging.getLogger("qwen_quant")

BACKENDS = ("auto", "torch", "triton", "cpu")
TRITON_BITS = (4, 8)
CPU_INT4_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts, largest first
CPU_INT8_K_MULTIPLE = 16  # _weight_int8pack_mm returns garbage or crashes unless K is a multiple of 16 (measured)
# Weights dequantized at a time by the cpu backends' prefill tiles (whole int4pack blocks, at least one): the tile's
# fp32 and bf16 copies (6 MiB) stay in the L3 cache for its product. Fewer, larger tiles pay fewer operations (each
# a parallel region); smaller ones fit lower caches. Measured on the AVX-512-bf16 machine (Qwen-1.8B shapes, 2
# blocks, one thread, first token after 512 tokens, Int4 vs bf16): 2^18 weights a tile 0.867x, 2^19 0.874x, 2^20
# 0.882x, 2^21 0.840x.
CPU_PREFILL_TILE_WEIGHTS = 2**20
# The probe on which the cpu backends time their kernel and their tiles, once per process and kind of layer: K, N,
# and the two prompt lengths timed (each route's time is a line in the prompt length, see crossover_rows).
CPU_PREFILL_PROBE_SHAPE = (1024, 1024)
CPU_PREFILL_PROBE_ROWS = (16, 128)


@dataclass
class SortedGptqWeight:
    """A validated GPTQ weight with its input rows in group order: what every backend is prepared from."""
    qweight: torch.Tensor  # int32 [K * bits / 32, N], rows sorted by group
    zeros: torch.Tensor  # int32 [G, N], true zero points
    scales: torch.Tensor  # float [G, N]
    row_group: Optional[torch.Tensor]  # int64 [K], group of each sorted row; None when row k is in group k // group
    bits: int
    group: int  # rows per group; K when the checkpoint has one group per channel (group_size -1)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == 2 ** (self.bits - 1)).all())

    def codes(self) -> torch.Tensor:
        return packing.unpack_qweight(self.qweight, self.bits)

    def dequantize(self, perm: Optional[torch.Tensor]) -> torch.Tensor:
        """W = (q - zero) * scale, fp32 [N, K] in the checkpoint's input order (perm: validate_and_sort's)."""
        K = self.in_features
        rows = (self.row_group if self.row_group is not None
                else torch.arange(K, device=self.qweight.device) // self.group)
        w_kn = (self.codes() - self.zeros[rows]).to(torch.float32) * self.scales.to(torch.float32)[rows]
        if perm is not None:  # sorted row i is the checkpoint's input perm[i]
            w_kn = torch.empty_like(w_kn).index_copy_(0, perm, w_kn)
        return w_kn.t().contiguous()


def _label(name: str, tensor: str) -> str:
    return f"{name}.{tensor}" if name else tensor


def _check_tensor(t, label, dtypes, shape, context):
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        need = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{label} has shape {list(t.shape)} and dtype {str(t.dtype).removeprefix('torch.')} "
                         f"but {context} need {list(shape)} of {need}")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INTS = (torch.int32, torch.int64)


def validate_and_sort(qweight, qzeros, scales, g_idx, bias, *, bits, group_size, checkpoint_format,
                      in_features, out_features, name, sym=False,
                      desc_act=False) -> tuple[SortedGptqWeight, Optional[torch.Tensor]]:
    """Check every tensor against (K, N, bits, group) and the config's sym (every zero point 2^(bits-1)) and desc_act
    (g_idx present), and sort the input rows by group.

    Returns the sorted weight and perm (int64 [K]: sorted row i is the checkpoint's input perm[i]), or None when
    g_idx is already in order."""
    packing.check_bits(bits, f"{_label(name, 'qweight')}: ")
    packing.check_format(checkpoint_format)
    if not packing.valid_group_size(group_size):
        raise ValueError(f"{name or 'layer'}: group_size={group_size} must be -1 (per channel) or positive")
    if qweight.dim() != 2:
        raise ValueError(f"{_label(name, 'qweight')} must be 2-D, got shape {list(qweight.shape)}")
    K = in_features if in_features is not None else qweight.shape[0] * 32 // bits
    N = out_features if out_features is not None else qweight.shape[1]
    per_word, _ = packing.values_per_period(bits)
    for dim, size in (("in_features", K), ("out_features", N)):
        if size % per_word:
            raise ValueError(f"{name or 'layer'}: {dim}={size} is not a multiple of {per_word}, so {bits}-bit "
                             f"codes cannot be packed into whole int32 words")
    group = K if group_size == -1 else group_size
    G = -(-K // group)
    context = f"bits={bits}, group_size={group_size}, in_features={K}, out_features={N}"
    _check_tensor(qweight, _label(name, "qweight"), (torch.int32,), (K * bits // 32, N), context)
    _check_tensor(qzeros, _label(name, "qzeros"), (torch.int32,), (G, N * bits // 32), context)
    _check_tensor(scales, _label(name, "scales"), _FLOATS, (G, N), context)
    if bias is not None:
        _check_tensor(bias, _label(name, "bias"), _FLOATS, (N,), context)
    for label, t in (("scales", scales), ("bias", bias)):
        if t is not None and not all_finite(t):
            raise ValueError(f"{_label(name, label)} contains NaN or inf: the checkpoint is corrupt")
    if g_idx is None:
        if desc_act:
            raise ValueError(f"{_label(name, 'g_idx')} is missing, but the config says desc_act=true: act-order "
                             "checkpoints need each input's group")
        g_idx = torch.arange(K, device=qweight.device) // group
    _check_tensor(g_idx, _label(name, "g_idx"), _INTS, (K,), context)
    g_idx = g_idx.long()
    if K and (g_idx.min() < 0 or g_idx.max() >= G):
        raise ValueError(f"{_label(name, 'g_idx')} has values in [{int(g_idx.min())}, {int(g_idx.max())}] but "
                         f"{context} give {G} groups: need values in [0, {G - 1}]")
    largest = int(torch.bincount(g_idx, minlength=G).max()) if K else 0
    if largest > group:
        raise ValueError(f"{_label(name, 'g_idx')} puts {largest} inputs in one group but group_size={group_size}")

    perm = torch.argsort(g_idx, stable=True)
    row_group = g_idx[perm]
    if torch.equal(perm, torch.arange(K, device=perm.device)):
        perm = None
    if perm is not None:
        # Act-order: permute the input rows once, here, so every kernel sees contiguous groups.
        qweight = packing.pack_qweight(packing.unpack_qweight(qweight, bits)[perm], bits)
    standard = torch.equal(row_group, torch.arange(K, device=row_group.device) // group)
    zeros = packing.unpack_qzeros(qzeros.cpu(), bits, checkpoint_format).to(qzeros.device)
    if sym and not bool((zeros == 2 ** (bits - 1)).all()):
        found = zeros.unique().tolist()
        raise ValueError(f"{_label(name, 'qzeros')} unpacks to zero points {found[:4]}{' ...' * (len(found) > 4)} "
                         f"with checkpoint_format={checkpoint_format!r}, but the config says sym=true, which needs "
                         f"every zero point to be {2 ** (bits - 1)}: is checkpoint_format wrong? (a v1 'gptq' file "
                         f"read as 'gptq_v2' gives {2 ** (bits - 1) - 1})")
    sorted_weight = SortedGptqWeight(qweight=qweight, zeros=zeros, scales=scales,
                                     row_group=None if standard else row_group, bits=bits, group=group)
    return sorted_weight, perm


def validate_on(device: torch.device, qweight, qzeros, scales, g_idx, bias, **checks) -> tuple:
    """A checkpoint's tensors for one linear moved to `device` and validated (validate_and_sort's `checks`):
    (SortedGptqWeight, perm, bias), what QuantLinear.from_sorted and join_outputs take."""
    qweight, qzeros, scales = (t.to(device).contiguous() for t in (qweight, qzeros, scales))
    g_idx = g_idx.to(device) if g_idx is not None else None
    bias = bias.to(device) if bias is not None else None
    return *validate_and_sort(qweight, qzeros, scales, g_idx, bias, **checks), bias


def join_outputs(parts: list) -> Optional[tuple]:
    """Linears that read the same input as one: validated parts (SortedGptqWeight, perm, bias) -> their outputs side
    by side (qweight, zero points, scales and bias concatenated along N), or None where one matmul cannot apply them
    all: another bit width, group, scale dtype or row order (act-order sorts each linear's rows by its own g_idx;
    GPTQ gives siblings the same order, as they share a Hessian). A missing bias beside a present one is zeros."""
    (first, perm, _), rest = parts[0], parts[1:]
    for w, other_perm, _ in rest:
        if (w.bits, w.group, w.scales.dtype, w.in_features) != (first.bits, first.group, first.scales.dtype,
                                                                first.in_features):
            return None
        if not _same_order(perm, other_perm) or not _same_order(first.row_group, w.row_group):
            return None
    weights = [w for w, _, _ in parts]
    biases = [b for _, _, b in parts]
    bias = None
    if any(b is not None for b in biases):
        dtype = next(b.dtype for b in biases if b is not None)
        bias = torch.cat([b.to(dtype) if b is not None else w.scales.new_zeros(w.out_features, dtype=dtype)
                          for w, b in zip(weights, biases)])
    joined = SortedGptqWeight(qweight=torch.cat([w.qweight for w in weights], 1),
                              zeros=torch.cat([w.zeros for w in weights], 1),
                              scales=torch.cat([w.scales for w in weights], 1), row_group=first.row_group,
                              bits=first.bits, group=first.group)
    return joined, perm, bias


def _same_order(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpu_int4_group(group: int, K: int) -> Optional[int]:
    """The int4pack group size serving GPTQ groups of `group` rows: it must divide both (a GPTQ group or a whole
    channel is then split into several kernel groups sharing one scale)."""
    return next((g for g in CPU_INT4_GROUPS if group % g == 0 and K % g == 0), None)


def unsupported_reason(backend: str, w: SortedGptqWeight, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run this weight on `device`, or None when it can."""
    if backend == "torch":
        return None
    if w.row_group is not None:
        return "g_idx does not form equal contiguous groups after sorting"
    if backend == "triton":
        if w.bits not in TRITON_BITS:
            return f"the Triton kernels handle {TRITON_BITS} bits, not {w.bits}"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            return f"Triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU), not {device}"
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on the CPU, not {device}"
        if w.bits == 8 and w.group >= w.in_features:  # one group per channel
            if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
                return f"torch {torch.__version__} has no _weight_int8pack_mm"
            if w.in_features % CPU_INT8_K_MULTIPLE:
                return f"int8pack_mm needs in_features to be a multiple of {CPU_INT8_K_MULTIPLE}"
            return None
        if w.bits in (4, 8):  # grouped Int8 runs as two Int4 halves, see CpuInt8QuantLinear
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
            if w.out_features % 16:
                return f"int4pack needs out_features divisible by 16, got {w.out_features}"
            if cpu_int4_group(w.group, w.in_features) is None:
                return (f"int4pack needs a group size in {CPU_INT4_GROUPS} dividing both the GPTQ group "
                        f"({w.group}) and in_features ({w.in_features})")
            return None
        return f"the cpu backend handles 4 and 8 bits, not {w.bits}"
    raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")


def choose_backend(w: SortedGptqWeight, device: torch.device) -> tuple[str, dict]:
    """The fastest backend that can run `w` on `device`, and why each faster one was passed over."""
    fast = {"cuda": "triton", "cpu": "cpu"}.get(device.type)
    if fast is None:
        return "torch", {}
    reason = unsupported_reason(fast, w, device)
    return ("torch", {fast: reason}) if reason else (fast, {})


_LOGGED_CHOICES: set = set()


def _log_choice_once(backend: str, passed_over: dict, w: SortedGptqWeight, device: torch.device, name: str):
    key = (backend, tuple(sorted(passed_over.items())), w.bits, w.group, device.type)
    if key in _LOGGED_CHOICES:
        return
    _LOGGED_CHOICES.add(key)
    why = "; ".join(f"not {b}: {r}" for b, r in passed_over.items())
    logger.info("QuantLinear %s (bits=%d, group=%d, %s): backend %s%s", name or "", w.bits, w.group, device.type,
                backend, f" ({why})" if why else "")


class QuantLinear(nn.Module):
    """A GPTQ-quantized linear layer, y = x @ W^T + bias. Build it with `from_packed`.

    Each backend subclass provides `_matmul(x2)`: x [M, K] with inputs in sorted order -> [M, N] in x's dtype, bias
    included; and `_sorted_weight_kn()`: the weight it applies, fp32 [K, N], rows in sorted order."""

    backend = ""

    def __init__(self, w: SortedGptqWeight, perm: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 dtype: torch.dtype, group_size: int, name: str):
        super().__init__()
        self.in_features = w.in_features
        self.out_features = w.out_features
        self.bits = w.bits
        self.group_size = group_size
        self.name = name
        self._declared = self.declared_buffers(w.in_features, w.out_features, w.bits, group_size, dtype=dtype,
                                               symmetric=w.symmetric, act_order=perm is not None,
                                               bias=bias is not None, contiguous_groups=w.row_group is None)
        self._buffer("perm", perm)
        self._buffer("bias", None if bias is None else bias.to(dtype))

    @classmethod
    def declared_buffers(cls, K: int, N: int, bits: int, group_size: int, *, dtype: torch.dtype,
                         symmetric: bool = True, act_order: bool = False, bias: bool = True,
                         contiguous_groups: bool = True) -> dict:
        """name -> (shape, dtype) of every buffer this backend keeps for a [K -> N] layer: what the constructor
        registers (it checks each against this) and what memory estimates count without building one.
        act_order: g_idx is not in order (a perm is kept); contiguous_groups: sorted row k is in group k // group."""
        G = -(-K // (K if group_size == -1 else group_size))
        declared = {"perm": ((K,), torch.int64)} if act_order and G > 1 else {}  # one group needs no sorting
        if bias:
            declared["bias"] = ((N,), dtype)
        return declared

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, bits: int, group_size: int,
                    checkpoint_format: str = "gptq", backend: str = "auto", dtype: torch.dtype = torch.float16,
                    name: str = "", device=None, in_features: Optional[int] = None,
                    out_features: Optional[int] = None, sym: bool = False,
                    desc_act: bool = False) -> "QuantLinear":
        """Validate a checkpoint's tensors and prepare one backend on `device` (default: qweight's device).

        g_idx None means k // group_size. `dtype` is the activation dtype the layer is meant for: scales, zeros and
        bias are stored in it (the cpu backend always computes in bf16). in_features / out_features, when given, are
        checked against the tensors; otherwise they are read from qweight. sym / desc_act, the checkpoint config's,
        are checked against the zero points and g_idx (sym False: any zero points)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")
        device = torch.device(device) if device is not None else qweight.device
        validated = validate_on(device, qweight, qzeros, scales, g_idx, bias, bits=bits, group_size=group_size,
                                checkpoint_format=checkpoint_format, in_features=in_features,
                                out_features=out_features, name=name, sym=sym, desc_act=desc_act)
        return cls.from_sorted(*validated, group_size=group_size, backend=backend, dtype=dtype, name=name,
                               device=device)

    @classmethod
    def from_sorted(cls, w: SortedGptqWeight, perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], *,
                    group_size: int, backend: str, dtype: torch.dtype, name: str, device) -> "QuantLinear":
        """One backend prepared from a validated weight (validate_and_sort's, or join_outputs') on `device`."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")
        device = torch.device(device)
        if backend == "auto":
            backend, passed_over = choose_backend(w, device)
            _log_choice_once(backend, passed_over, w, device, name)
        else:
            reason = unsupported_reason(backend, w, device)
            if reason:
                raise ValueError(f"{name or 'layer'}: backend {backend!r} cannot run this weight: {reason}")
        return backend_class(backend, w.bits)(w, perm, bias, dtype, group_size, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QuantLinear'} expects {self.in_features} input features, "
                             f"got x of shape {list(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        return self._matmul(x2).reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight this module applies, fp32 [N, K] in the checkpoint's input order. The cpu backend's scales are
        rounded to bf16, as its kernels use them, and its int4pack codes are read back through a K x K x N matmul:
        to fold a whole model back to full precision use the torch backend (or packing.dequantize)."""
        w_kn = self._sorted_weight_kn()
        if self.perm is not None:
            w_kn = w_kn[torch.argsort(self.perm)]
        return w_kn.t().contiguous()

    def memory_bytes(self) -> int:
        """Bytes of every tensor this module holds."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}, act_order={self.perm is not None}, "
                f"bias={self.bias is not None}")

    def _buffer(self, name: str, tensor: Optional[torch.Tensor]) -> None:
        # Non-persistent: the layouts are backend- (even CPU-) specific, so state_dict() must not save them; a module
        # is always built from the checkpoint's tensors with from_packed. .to() still moves them.
        declared = self._declared.get(name)
        found = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
        if found != declared:
            raise RuntimeError(f"{type(self).__name__} {self.name}: buffer {name} is {found}, but the backend "
                               f"declares {declared}")
        self.register_buffer(name, tensor, persistent=False)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y.add_(self.bias) if self.bias is not None else y


class TorchQuantLinear(QuantLinear):
    """Dequantize to fp32 on every call, then matmul in x's dtype: any device, any bits, any g_idx."""

    backend = "torch"

    @classmethod
    def declared_buffers(cls, K, N, bits, group_size, *, dtype, symmetric=True, act_order=False, bias=True,
                         contiguous_groups=True) -> dict:
        declared = super().declared_buffers(K, N, bits, group_size, dtype=dtype, symmetric=symmetric,
                                            act_order=act_order, bias=bias, contiguous_groups=contiguous_groups)
        G = -(-K // (K if group_size == -1 else group_size))
        declared["qweight"] = ((K * bits // 32, N), torch.int32)
        declared["scales"] = ((G, N), dtype)
        if not symmetric:
            declared["zeros"] = ((G, N), dtype)
        if not contiguous_groups:
            declared["row_group"] = ((K,), torch.int64)
        return declared

    def __init__(self, w: SortedGptqWeight, perm, bias, dtype, group_size, name):
        super().__init__(w, perm, bias, dtype, group_size, name)
        self.group = w.group
        self._buffer("qweight", w.qweight)
        self._buffer("scales", w.scales.to(dtype))
        # Integer zeros are exact in fp16 / bf16; symmetric weights need none (the zero is 2^(bits-1)).
        self._buffer("zeros", None if w.symmetric else w.zeros.to(dtype))
        self._buffer("row_group", w.row_group)

    def _sorted_weight_kn(self) -> torch.Tensor:
        codes = packing.unpack_qweight(self.qweight, self.bits).to(torch.float32)
        scales = self.scales.to(torch.float32)
        zeros = self.zeros.to(torch.float32) if self.zeros is not None else None
        K, G = self.in_features, scales.shape[0]
        if self.row_group is None and K == G * self.group:
            grouped = codes.view(G, self.group, -1)
            zero = zeros[:, None] if zeros is not None else 2 ** (self.bits - 1)
            return ((grouped - zero) * scales[:, None]).view(K, -1)
        rows = self.row_group if self.row_group is not None else torch.arange(K, device=codes.device) // self.group
        zero = zeros[rows] if zeros is not None else 2 ** (self.bits - 1)
        return (codes - zero) * scales[rows]

    def _matmul(self, x2):
        return self._add_bias(x2 @ self._sorted_weight_kn().to(x2.dtype))


class TritonQuantLinear(TorchQuantLinear):
    """The Triton Int4 / Int8 kernels; holds the same tensors as the torch backend (GPTQ-packed sorted rows, scales
    and zeros in the activation dtype, no zeros when symmetric).

    Everything but M is settled at load: one prepared launch per M bucket (the GPU's tuned table, else the heuristic;
    see qwen_quant.kernels.configs), and the device's split-K workspace. A call picks its bucket's launch and makes
    one kernel launch (two for long prompts: dequantize, then cuBLAS), allocating only its output. Under
    torch.compile the call is the custom op qwen_quant::gptq_matmul, which the graph (and a CUDA graph) captures;
    eager calls go straight to the launch, since a trip through the dispatcher costs more host time than the
    decode kernel takes on a GPU."""

    backend = "triton"

    def __init__(self, w, perm, bias, dtype, group_size, name):
        super().__init__(w, perm, bias, dtype, group_size, name)
        # Imported here: defining the kernels imports Triton, which CPU-only users never need.
        from qwen_quant.kernels.gptq_matmul import launch_for, prepare_launches, run
        self._launch_for, self._run = launch_for, run
        self._launches = prepare_launches(w.bits, w.group, w.in_features, w.out_features, w.qweight.device)

    def _matmul(self, x2):
        launch = self._launch_for(self._launches, x2.shape[0])
        if torch.compiler.is_compiling():
            return torch.ops.qwen_quant.gptq_matmul(x2, self.qweight, self.scales, self.zeros, self.bias, self.bits,
                                                    self.group, launch.op_config())
        return self._run(launch, x2.contiguous(), self.qweight, self.scales, self.zeros, self.bias)


def _check_cpu(module: QuantLinear, x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise RuntimeError(f"{module.name or 'QuantLinear'} was prepared for the cpu backend but got x on "
                           f"{x.device}: build it with from_packed(device=...) for that device")
    if torch.is_grad_enabled() and x.requires_grad:  # none of its routes has a backward (torch's kernels, ours)
        raise RuntimeError(f"{module.name or 'QuantLinear'} (cpu backend) cannot pass a gradient back to x: run it "
                           "under torch.no_grad(), or build it with backend='torch' to backpropagate through it")


_SAME_WIDTH_INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _float_bits(t: torch.Tensor) -> torch.Tensor:
    # The cpu backend keeps its float tensors as integer bit patterns so that module.half() / .to(dtype) cannot
    # convert them: its kernels need exactly bf16, and the fp32 zero terms should not lose precision.
    return t.view(_SAME_WIDTH_INT[t.dtype])


def _int4pack_codes(packed: torch.Tensor, kernel_group: int, K: int, N: int, rows_per_call: int = 512):
    """The 4-bit codes [K, N] (fp32) of an int4pack weight, read back through the kernel itself since the packed
    layout depends on the CPU's vector width: identity rows with scale 1 and zero 8 return each code exactly.
    This costs a K x K x N matmul (seconds for a 4096 x 4096 layer): fine for tests, slow for a whole model."""
    unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(K // kernel_group, N, 2).contiguous()
    codes = []
    for start in range(0, K, rows_per_call):
        rows = torch.arange(start, min(start + rows_per_call, K))
        identity_rows = torch.zeros(len(rows), K, dtype=torch.bfloat16)
        identity_rows[torch.arange(len(rows)), rows] = 1
        codes.append(torch.ops.aten._weight_int4pack_mm_for_cpu(identity_rows, packed, kernel_group, unit))
    return torch.cat(codes).to(torch.float32)


_SCRATCH = threading.local()  # per thread, so that prompts run by two threads never share a tile


def _scratch(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` for one step of the prefill tiles, reused by every tile and prompt of this thread (grown
    when a layer needs more, never freed: a few tiles' worth, see CPU_PREFILL_TILE_WEIGHTS). Fresh tensors of
    megabytes cost a page fault per 4 KiB on their first write: 1.4 ms of a 10 ms layer at 64 rows (measured)."""
    key, numel = (name, dtype), math.prod(shape)
    buffer = _SCRATCH.__dict__.get(key)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # made in generate's inference mode, it could not be written outside it
            buffer = _SCRATCH.__dict__[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def _int4pack_codes_tile(packed: torch.Tensor, rows: int, n0: int, n1: int, block: int) -> torch.Tensor:
    """The codes, uint8 [rows, n1 - n0], of output columns n0..n1 of an int4pack weight with `rows` input rows, read
    straight from its layout (found by _int4pack_block): a whole block of `block` columns stores block / 2 bytes per
    row, whose low nibbles are the block's first half of columns and high nibbles its second half; a short last block
    (N not a multiple of `block`) stores columns 2j and 2j + 1 in byte j. n0..n1 is whole blocks or the short one.
    Whole blocks are read into scratch (see _scratch), valid until the next tile."""
    width = n1 - n0
    data = packed.view(-1)[n0 * rows // 2:n1 * rows // 2]
    if width % block:
        pairs = data.view(rows, width // 2)
        return torch.stack([pairs & 15, pairs >> 4], -1).view(rows, width)
    # uint8 shifts are logical: two operations (each a parallel region, which waits for a busy machine's second
    # core), where int64 words take three at the same speed (measured).
    packed_bytes = data.view(width // block, 1, rows, block // 2)
    halves = _scratch("int4pack halves", (width // block, 2, rows, block // 2), torch.uint8)
    torch.bitwise_and(packed_bytes, 15, out=halves[:, :1])
    torch.bitwise_right_shift(packed_bytes, 4, out=halves[:, 1:])
    return _codes_of_halves(halves)


def _int8_codes_tile(packed: torch.Tensor, K: int, n0: int, n1: int, block: int) -> torch.Tensor:
    """The 8-bit codes, uint8 [K, n1 - n0], of columns n0..n1 of CpuInt8QuantLinear's int4pack weight: 2K rows, the
    codes' high nibbles in rows 0..K-1 and their low nibbles in rows K..2K-1. Whole blocks join the two nibbles
    in the packed bytes, before the halves are put side by side (half the bytes of joining unpacked codes)."""
    if (n1 - n0) % block:
        nibbles = _int4pack_codes_tile(packed, 2 * K, n0, n1, block)
        return nibbles[:K] << 4 | nibbles[K:]
    packed_bytes = packed.view(-1)[n0 * K:n1 * K].view((n1 - n0) // block, 2, K, block // 2)
    high, low = packed_bytes[:, 0], packed_bytes[:, 1]
    halves = _scratch("int4pack halves", (high.shape[0], 2, K, block // 2), torch.uint8)
    low_half = _scratch("low nibbles", high.shape, torch.uint8)
    # A block's first half of columns: both nibbles from the low nibbles of the bytes; its second, from the high ones.
    torch.bitwise_left_shift(high, 4, out=halves[:, 0]).bitwise_or_(torch.bitwise_and(low, 15, out=low_half))
    torch.bitwise_and(high, 0xF0, out=halves[:, 1]).bitwise_or_(torch.bitwise_right_shift(low, 4, out=low_half))
    return _codes_of_halves(halves)


def _codes_of_halves(halves: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, blocks * block] (scratch) from each block's two halves of columns, uint8 [blocks, 2, rows,
    block / 2], by one copy that puts every row's halves side by side, eight bytes an element. Operations over short
    runs (a block's row is 32 bytes) cost their loop, not their bytes: interleaving the halves while splitting the
    nibbles took three times as long (measured)."""
    blocks, _, rows, half = halves.shape
    codes = _scratch("int4pack codes", (rows, blocks, 2, half // 8), torch.int64)
    words = halves.view(torch.int64).permute(2, 0, 1, 3)
    return codes.copy_(words).view(torch.uint8).view(rows, blocks * 2 * half)


def cpu_prefill_scratch_bytes(K: int, bits: int, rows: int) -> int:
    """The most scratch (see _scratch) the prefill tiles of a layer with K inputs keep, per thread: a tile of at most
    max(64, CPU_PREFILL_TILE_WEIGHTS // K) columns (int4pack blocks are 32 or 64 wide) costs 8 bytes a weight at 4
    bits (split halves, codes, the fp32 tile, its bf16 copy) and 8.5 at 8 bits (the low nibbles besides); or what the
    native GEMM keeps for prompts of `rows` rows, if more."""
    weights = max(64, CPU_PREFILL_TILE_WEIGHTS // K // 64 * 64) * K
    return max(weights * (17 if bits == 8 else 16) // 2, cpu_prefill.scratch_bytes(K, rows))


def _column_spans(N: int, K: int, block: int) -> list:
    """(n0, n1) tiles of about CPU_PREFILL_TILE_WEIGHTS weights (at least one block) made of whole int4pack blocks,
    then the short last block if there is one."""
    width = max(block, CPU_PREFILL_TILE_WEIGHTS // K // block * block)
    full = N - N % block
    spans = [(n0, min(n0 + width, full)) for n0 in range(0, full, width)]
    return spans + ([(full, N)] if full < N else [])


@functools.lru_cache(maxsize=None)
def _int4pack_block() -> Optional[int]:
    """The column block of this CPU's int4pack layout (64 with AVX-512, 32 with AVX2), found by packing a probe of
    whole blocks and a short one and reading it back; None when no known layout reads back."""
    gen = torch.Generator().manual_seed(0)
    for block in (64, 32):
        rows, N = 8, 2 * block + 16
        codes = torch.randint(0, 16, (N, rows), generator=gen, dtype=torch.int32)
        packed = int4pack(codes.t(), 4)
        read = [_int4pack_codes_tile(packed, rows, n0, n1, block) for n0, n1 in _column_spans(N, rows, block)]
        if torch.equal(torch.cat(read, 1).t().to(torch.int32), codes):
            return block
    return None


def _scale_codes(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, n0: int, n1: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """codes * scale + offset in `dtype` [K, n1 - n0] (scratch), from codes [K, n1 - n0] and fp32 [G, N] scales and
    offsets of G equal groups of rows: computed in fp32, exactly for the kernels' bf16 scales and zeros, then rounded
    once to dtype."""
    G, n = scales.shape[0], n1 - n0
    weight = _scratch("fp32 tile", (G, codes.shape[0] // G, n), torch.float32)
    # Codes to fp32 first: addcmul promoting uint8 itself runs far slower beside the strided scales (measured).
    torch.addcmul(offsets[:, None, n0:n1], weight.copy_(codes.view(G, -1, n)), scales[:, None, n0:n1], out=weight)
    weight = weight.view(-1, n)
    return weight if dtype == torch.float32 else _scratch("tile", weight.shape, dtype).copy_(weight)


def _tiled_matmul(x2: torch.Tensor, spans: list, weight_tile, dtype: torch.dtype) -> torch.Tensor:
    """x2 [M, K] @ W in `dtype`, W [K, N] made one span of output columns at a time by weight_tile(n0, n1) -> dtype
    [K, n1 - n0]: no dequantized copy of the whole weight is ever held."""
    x = x2.to(dtype).contiguous()
    y = torch.empty(x2.shape[0], spans[-1][1], dtype=dtype)
    for n0, n1 in spans:
        torch.mm(x, weight_tile(n0, n1), out=y[:, n0:n1])
    return y


def _native_product(x2: torch.Tensor, dtype: torch.dtype, packed: torch.Tensor, scales: torch.Tensor,
                    offsets: torch.Tensor, bits: int, block: int, out_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The product by the native prompt GEMM (cpu_prefill.matmul) where the route is bf16 and it runs here, else
    None: in out_dtype, from fp32 sums of x2 (rounded to bf16) times the weights."""
    if dtype != torch.bfloat16:
        return None
    return cpu_prefill.matmul(x2, packed, scales, offsets, bits, block, out_dtype)


def crossover_rows(kernel_seconds: tuple, tile_seconds: tuple, rows: tuple = CPU_PREFILL_PROBE_ROWS) -> float:
    """The prompt length from which the prefill tiles beat the kernel, from each route's seconds at two prompt
    lengths `rows`. Both routes are lines in the length: the kernel a GEMV per row, the tiles one dequantization of
    the weight plus a dense GEMM. They cross where the kernel's steeper line passes the tiles'; a measurement where
    the tiles' line is as steep as the kernel's (noise: they do less work per row) says they never win: inf."""
    (m1, m2), (k1, k2), (t1, t2) = rows, kernel_seconds, tile_seconds
    kernel_slope, tile_slope = (k2 - k1) / (m2 - m1), (t2 - t1) / (m2 - m1)
    if tile_slope >= kernel_slope:
        return math.inf
    return m1 + (t1 - k1) / (kernel_slope - tile_slope)


def _time_prefill_routes(bits: int, per_channel: bool, dtype: torch.dtype) -> tuple:
    """(kernel seconds, tile seconds) at each CPU_PREFILL_PROBE_ROWS, on a probe layer of CPU_PREFILL_PROBE_SHAPE of
    this kind (bits; per_channel: Int8's int8pack kernel, else groups of 128 through int4pack) with tiles of `dtype`;
    each the best of three calls, on this process's threads as the prompts will run: the kernel is one parallel
    region a call, the tiles several a tile, so they gain differently from a second thread (on the 2-core machine,
    Int4 tiles won from 59 rows timed on one thread, from 78-88 on two). While another process holds a core,
    every region waits for it (a scheduler tick): the kernel's time then hardly grows with the rows, the probe finds
    that the tiles never win, and the kernels run, which is also the right choice then."""
    K, N = CPU_PREFILL_PROBE_SHAPE
    group = K if per_channel else 128
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (K, N), generator=gen, dtype=torch.int32)
    weight = SortedGptqWeight(qweight=packing.pack_qweight(codes, bits),
                              zeros=torch.full((K // group, N), 2 ** (bits - 1), dtype=torch.int32),
                              scales=torch.rand(K // group, N, generator=gen) / 64, row_group=None, bits=bits,
                              group=group)
    probe = backend_class("cpu", bits)(weight, None, None, torch.bfloat16, -1 if per_channel else group, "probe")
    kernel, tiles = [], []
    with torch.no_grad():
        for rows in CPU_PREFILL_PROBE_ROWS:
            x = torch.randn(rows, K, generator=gen).to(torch.bfloat16)
            kernel.append(best_seconds(lambda: probe._kernel_product(x)))
            tiles.append(best_seconds(lambda: probe._tile_product(x, dtype)))
    return tuple(kernel), tuple(tiles)


@functools.lru_cache(maxsize=None)
def _measured_prefill_rows(bits: int, per_channel: bool, dtype: torch.dtype) -> float:
    rows = crossover_rows(*_time_prefill_routes(bits, per_channel, dtype))
    lengths = "no" if rows == math.inf else f">= {max(2, math.ceil(rows))}"
    logger.info("cpu backend, Int%d%s: prompts of %s rows run %s tiles of the dequantized weight (measured here)",
                bits, " per channel" if per_channel else "", lengths, str(dtype).removeprefix("torch."))
    return rows


def cpu_prefill_rows(module: QuantLinear) -> float:
    """The prompt length from which this cpu-backend module multiplies tiles of its dequantized weight rather than
    running its kernel: the crossover_rows of both routes timed on a probe of its kind of layer, in this process's
    tile dtype (cpu_prefill_route), at the first prompt that asks (then kept); never below two rows, since one row
    is a GEMV that reads each weight once, which a tile cannot beat. inf where the tiles never run, as where this
    code cannot read the CPU's int4pack layout."""
    per_channel = module.kernel_group is None
    if not per_channel and _int4pack_block() is None:
        return math.inf
    return max(2, _measured_prefill_rows(module.bits, per_channel, _prefill_dtype()))


def cpu_prefill_route(module: QuantLinear, rows: int) -> Optional[torch.dtype]:
    """The dtype of the tiles a prompt of `rows` rows runs through this cpu-backend module (bf16 on CPUs with fast
    bf16 matmuls, else fp32), or None where its kernel runs it (see cpu_prefill_rows). A compiled step (a batch's
    decode) always runs the kernel: the crossover's one-time measurement cannot run inside torch.compile."""
    if rows < 2 or torch.compiler.is_compiling():
        return None
    return _prefill_dtype() if rows >= cpu_prefill_rows(module) else None


def cpu_prompt_product(module: QuantLinear, rows: int) -> str:
    """How a prompt of `rows` rows runs through this cpu-backend module, for reports: "kernel", "native GEMM"
    (cpu_prefill, for the int4pack layouts where the route is bf16 and it runs here), or "bf16 tiles" / "fp32 tiles"
    (the eager tiles)."""
    dtype = cpu_prefill_route(module, rows)
    if dtype is None:
        return "kernel"
    if dtype == torch.bfloat16 and module.kernel_group is not None and cpu_prefill.runs(_int4pack_block()):
        return "native GEMM"
    return f"{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float32', 'fp32')} tiles"


def _prefill_dtype() -> torch.dtype:
    return torch.bfloat16 if fast_bf16_matmul() else torch.float32


class CpuInt4QuantLinear(QuantLinear):
    """torch's _weight_int4pack_mm_for_cpu. Its dequantization is (q - 8) * scale + zero, so a GPTQ zero z becomes
    zero = (8 - z) * scale; scales and zeros are rounded to bf16 (the kernel's dtype)."""

    backend = "cpu"

    @classmethod
    def declared_buffers(cls, K, N, bits, group_size, *, dtype, symmetric=True, act_order=False, bias=True,
                         contiguous_groups=True) -> dict:
        declared = super().declared_buffers(K, N, bits, group_size, dtype=dtype, symmetric=symmetric,
                                            act_order=act_order, bias=bias, contiguous_groups=contiguous_groups)
        nibbles = K if bits == 4 else 2 * K  # Int8 codes run as two Int4 halves (CpuInt8QuantLinear)
        declared["weight_int4pack"] = ((N, nibbles // 2), torch.uint8)
        declared["scales_and_zeros"] = ((nibbles // _kernel_group(group_size, K), N, 2), torch.int16)  # bf16 bits
        return declared

    def __init__(self, w: SortedGptqWeight, perm, bias, dtype, group_size, name):
        super().__init__(w, perm, bias, dtype, group_size, name)
        K = w.in_features
        self.kernel_group = cpu_int4_group(w.group, K)
        # Each GPTQ group's scale and zero serve every kernel group it splits into.
        rows = torch.arange(0, K, self.kernel_group, device=w.scales.device) // w.group
        scales = w.scales.to(torch.float32)[rows]
        zeros = (8 - w.zeros[rows].to(torch.float32)) * scales
        self._buffer("scales_and_zeros", _float_bits(torch.stack([scales, zeros], -1).to(torch.bfloat16)))
        self._buffer("weight_int4pack", int4pack(w.codes(), 4))

    def _matmul(self, x2):
        _check_cpu(self, x2)
        dtype = cpu_prefill_route(self, x2.shape[0])
        y = self._tile_product(x2, dtype) if dtype else self._kernel_product(x2)
        return self._add_bias(y.to(x2.dtype))

    def _kernel_product(self, x2):
        scales_and_zeros = self.scales_and_zeros.view(torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.weight_int4pack,
                                                          self.kernel_group, scales_and_zeros)

    def _tile_product(self, x2, dtype):
        """x2 @ W through tiles of `dtype` holding the kernel's (q - 8) * scale + zero (rounded to dtype)."""
        # Contiguous fp32 scales and offsets: a strided operand keeps addcmul from vectorizing (15x slower, measured).
        scales, zeros = self.scales_and_zeros.view(torch.bfloat16).to(torch.float32).unbind(-1)
        scales = scales.contiguous()
        offsets = zeros - 8 * scales  # (q - 8) * scale + zero = q * scale + offset
        K, block = self.in_features, _int4pack_block()
        native = _native_product(x2, dtype, self.weight_int4pack, scales, offsets, 4, block, x2.dtype)
        if native is not None:
            return native

        def weight_tile(n0, n1):
            codes = _int4pack_codes_tile(self.weight_int4pack, K, n0, n1, block)
            return _scale_codes(codes, scales, offsets, n0, n1, dtype)
        return _tiled_matmul(x2, _column_spans(self.out_features, K, block), weight_tile, dtype)

    def _sorted_weight_kn(self):
        scales_and_zeros = self.scales_and_zeros.view(torch.bfloat16).to(torch.float32)
        rows = torch.arange(self.in_features) // self.kernel_group
        codes = _int4pack_codes(self.weight_int4pack, self.kernel_group, self.in_features, self.out_features)
        return (codes - 8) * scales_and_zeros[rows, :, 0] + scales_and_zeros[rows, :, 1]


class CpuInt8QuantLinear(QuantLinear):
    """Int8 on the CPU. Codes are shifted to q' = q - 128, so W = (q - z) * s = (q' - z') * s with z' = z - 128;
    the kernels apply q' * s and asymmetric zeros cost one small fp32 matmul, y -= group_sums(x) @ (z' * s).

    One group per channel: torch's _weight_int8pack_mm (int8 [N, K], a bf16 scale per channel), one call.
    Grouped: _weight_int8pack_mm has no group scales. Instead each code is split into nibbles, q = 16 hi + lo, and
    both halves run as one int4pack call over [x | x] with hi's scale 16 s and zero 0, lo's scale s and zero 8 s.
    int4pack's (c - 8) * scale + zero then sums to 16 s hi - 128 s + s lo = q' s, exactly (16 s and 8 s are exact
    in bf16). Measured on the 2-core dev machine (4096 x 4096, g128, M = 1, 2 threads): 0.93 ms, against 1.25 ms
    for one int8pack call per group (32 parallel regions, which also stall whenever other processes hold a core)
    and 2.1 ms for dense bf16."""

    backend = "cpu"

    @classmethod
    def declared_buffers(cls, K, N, bits, group_size, *, dtype, symmetric=True, act_order=False, bias=True,
                         contiguous_groups=True) -> dict:
        G = -(-K // (K if group_size == -1 else group_size))
        if G > 1:  # the int4pack buffers of the Int4 backend, over both halves
            declared = CpuInt4QuantLinear.declared_buffers(K, N, bits, group_size, dtype=dtype, symmetric=symmetric,
                                                           act_order=act_order, bias=bias,
                                                           contiguous_groups=contiguous_groups)
        else:
            declared = QuantLinear.declared_buffers(K, N, bits, group_size, dtype=dtype, symmetric=symmetric,
                                                    act_order=act_order, bias=bias,
                                                    contiguous_groups=contiguous_groups)
            declared["weight_int8"] = ((N, K), torch.int8)
            declared["scales"] = ((N,), torch.int16)  # bf16 bits
        if not symmetric:
            declared["zero_scales"] = ((G, N), torch.int32)  # fp32 bits
        return declared

    def __init__(self, w: SortedGptqWeight, perm, bias, dtype, group_size, name):
        super().__init__(w, perm, bias, dtype, group_size, name)
        K, G = w.in_features, w.scales.shape[0]
        self.group = w.group if G > 1 else K
        scales = w.scales.to(torch.bfloat16)
        self._buffer("zero_scales",
                             None if w.symmetric else _float_bits((w.zeros - 128) * scales.to(torch.float32)))
        codes_nk = w.codes().t()
        if G == 1:
            self.kernel_group = None
            self._buffer("weight_int8", (codes_nk - 128).to(torch.int8).contiguous())
            self._buffer("scales", _float_bits(scales[0]))
            return
        self.kernel_group = cpu_int4_group(w.group, K)
        rows = torch.arange(0, K, self.kernel_group, device=scales.device) // w.group
        hi = torch.stack([scales[rows] * 16, torch.zeros_like(scales[rows])], -1)
        lo = torch.stack([scales[rows], scales[rows] * 8], -1)
        self._buffer("scales_and_zeros", _float_bits(torch.cat([hi, lo])))
        self._buffer("weight_int4pack", int4pack(w.codes(), 8))

    def _matmul(self, x2):
        _check_cpu(self, x2)
        dtype = cpu_prefill_route(self, x2.shape[0])
        x_applied = x2.to(dtype or torch.bfloat16).contiguous()  # the x the product sees
        y = self._tile_product(x_applied, dtype, x2.dtype) if dtype else self._kernel_product(x_applied)
        if self.zero_scales is None:
            return self._add_bias(y.to(x2.dtype))
        zero_scales = self.zero_scales.view(torch.float32)
        group_sums = _group_sums(x_applied, self.group, zero_scales.shape[0])
        return self._add_bias((y.to(torch.float32) - group_sums @ zero_scales).to(x2.dtype))

    def _kernel_product(self, x2):
        """x2 (bf16, contiguous) @ the q' * s the kernels apply."""
        if self.kernel_group is None:
            return torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales.view(torch.bfloat16))
        scales_and_zeros = self.scales_and_zeros.view(torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat([x2, x2], dim=1), self.weight_int4pack,
                                                          self.kernel_group, scales_and_zeros)

    def _tile_product(self, x2, dtype, out_dtype=None):
        """x2 @ the same q' * s through tiles of `dtype`: grouped, tiles of q' * s rounded to dtype (or the native
        GEMM, its result in out_dtype, default x2's: fp32 sums serve fp32 models and the zero term); one group per
        channel, tiles of q' alone (exact in either dtype), each channel's s applied to the product."""
        K, N = self.in_features, self.out_features
        if self.kernel_group is None:
            def codes_tile(n0, n1):  # the int8 codes are [N, K]: a tile is their rows n0..n1, transposed
                return _scratch("tile", (n1 - n0, K), dtype).copy_(self.weight_int8[n0:n1]).t()
            y = _tiled_matmul(x2, _column_spans(N, K, 1), codes_tile, dtype)
            return y.to(torch.float32) * self.scales.view(torch.bfloat16).to(torch.float32)
        scales_and_zeros = self.scales_and_zeros.view(torch.bfloat16)
        # The low nibbles' s (the high ones' is 16 s), contiguous for addcmul (see CpuInt4QuantLinear._tile_product).
        scales = scales_and_zeros[scales_and_zeros.shape[0] // 2:, :, 0].to(torch.float32).contiguous()
        offsets = -128 * scales
        block = _int4pack_block()
        native = _native_product(x2, dtype, self.weight_int4pack, scales, offsets, 8, block, out_dtype or x2.dtype)
        if native is not None:
            return native

        def weight_tile(n0, n1):
            codes = _int8_codes_tile(self.weight_int4pack, K, n0, n1, block)
            return _scale_codes(codes, scales, offsets, n0, n1, dtype)
        return _tiled_matmul(x2, _column_spans(N, K, block), weight_tile, dtype)

    def _sorted_weight_kn(self):
        K, N = self.in_features, self.out_features
        if self.kernel_group is None:
            w = self.weight_int8.t().to(torch.float32) * self.scales.view(torch.bfloat16).to(torch.float32)
        else:
            scales_and_zeros = self.scales_and_zeros.view(torch.bfloat16).to(torch.float32)
            rows = torch.arange(2 * K) // self.kernel_group
            nibbles = _int4pack_codes(self.weight_int4pack, self.kernel_group, 2 * K, N)
            w = ((nibbles - 8) * scales_and_zeros[rows, :, 0] + scales_and_zeros[rows, :, 1]).view(2, K, N).sum(0)
        if self.zero_scales is not None:
            w = w - self.zero_scales.view(torch.float32)[torch.arange(K) // self.group]
        return w


def _group_sums(x: torch.Tensor, group: int, groups: int) -> torch.Tensor:
    """Sum of x [M, K] over each group of inputs, fp32 [M, groups]; the last group may be short."""
    x = x.to(torch.float32)
    if x.shape[1] < groups * group:
        x = torch.nn.functional.pad(x, (0, groups * group - x.shape[1]))
    return x.view(x.shape[0], groups, group).sum(-1)


def backend_class(backend: str, bits: int) -> type:
    """The QuantLinear subclass of a concrete backend (not "auto") for `bits`."""
    if backend == "cpu":
        return CpuInt4QuantLinear if bits == 4 else CpuInt8QuantLinear
    classes = {"torch": TorchQuantLinear, "triton": TritonQuantLinear}
    if backend not in classes:
        raise ValueError(f"backend_class needs a concrete backend, got {backend!r}")
    return classes[backend]


def _kernel_group(group_size: int, K: int) -> int:
    """cpu_int4_group for a checkpoint's group_size, which must have one."""
    kernel_group = cpu_int4_group(K if group_size == -1 else group_size, K)
    if kernel_group is None:
        raise ValueError(f"the cpu backend cannot run group size {group_size} with in_features={K}")
    return kernel_group
