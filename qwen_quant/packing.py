"""GPTQ tensor packing: integer codes <-> the int32 words of AutoGPTQ's "gptq" (v1) and GPTQModel's "gptq_v2" formats.

Values are laid out as one little-endian bit stream per column (qweight, packed along K) or per row (qzeros, packed
along N), cut into 32-bit words. For 2/4/8 bits a word holds 32/bits whole values; for 3 bits, 32 values fill 3 words
with fields crossing the word boundaries. This one rule reproduces AutoGPTQ's layout for every width.
"""
from math import gcd

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


def valid_bits(bits) -> bool:
    """The one rule for a code width: an integer of SUPPORTED_BITS (JSON true is not 1, and 4.0 is not 4)."""
    return isinstance(bits, int) and not isinstance(bits, bool) and bits in SUPPORTED_BITS


def check_bits(bits: int, label: str = "") -> None:
    """Raise unless valid_bits; label (say "NAME.qweight: ") starts the message."""
    if not valid_bits(bits):
        raise ValueError(f"{label}bits={bits} is not supported: choose one of {SUPPORTED_BITS}")


def valid_group_size(group_size) -> bool:
    """The one rule for a group size: a positive integer, or -1 for one group per output channel. Callers word the
    error for their setting."""
    return isinstance(group_size, int) and not isinstance(group_size, bool) and (group_size == -1 or group_size > 0)


def values_per_period(bits: int) -> tuple[int, int]:
    """(values, words): the smallest run of values that fills whole int32 words."""
    check_bits(bits)
    values = 32 // gcd(bits, 32)
    return values, values * bits // 32


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack q [L, C] (values 0..2^bits-1) along dim 0 into int32 [L * bits / 32, C], on q's device."""
    values, words = values_per_period(bits)
    length, cols = q.shape
    if length % values:
        raise ValueError(f"cannot pack {length} {bits}-bit values: the count must be a multiple of {values}")
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"integer codes out of range for {bits} bits: [{int(q.min())}, {int(q.max())}]")
    periods = q.to(torch.int32).view(length // values, values, cols)
    out = torch.zeros(length // values, words, cols, dtype=torch.int32, device=q.device)
    for j in range(values):
        word, shift = divmod(bits * j, 32)
        out[:, word] |= periods[:, j] << shift  # int32 shifts drop the bits beyond 32 ...
        if shift + bits > 32:
            out[:, word + 1] |= periods[:, j] >> (32 - shift)  # ... which continue in the next word
    return out.view(length // values * words, cols)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of _pack_rows: int32 [L * bits / 32, C] -> int32 [L, C], on packed's device."""
    values, words = values_per_period(bits)
    rows, cols = packed.shape
    if rows % words:
        raise ValueError(f"{rows} packed rows do not hold whole groups of {words} words for {bits} bits")
    mask = (1 << bits) - 1
    periods = packed.to(torch.int32).view(rows // words, words, cols)
    out = torch.empty(rows // words, values, cols, dtype=torch.int32, device=packed.device)
    for j in range(values):
        word, shift = divmod(bits * j, 32)
        # Arithmetic shifts of negative words are harmless: the masks keep only the bits of this field.
        code = periods[:, word] >> shift
        if shift + bits > 32:
            code = (code & ((1 << (32 - shift)) - 1)) | (periods[:, word + 1] << (32 - shift))
        out[:, j] = code & mask
    return out.view(rows // words * values, cols)


def pack_qweight(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weights q[k, n] -> qweight int32 [K * bits / 32, N]."""
    return _pack_rows(codes_kn, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [K * bits / 32, N] -> q[k, n] int32 [K, N]."""
    return _unpack_rows(qweight, bits)


def pack_qzeros(zeros_gn: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """True zero points [G, N] -> qzeros int32 [G, N * bits / 32]. The v1 format stores zero - 1."""
    check_format(checkpoint_format)
    zeros = zeros_gn.to(torch.int64)
    if checkpoint_format == "gptq":
        if zeros.numel() and zeros.min() < 1:
            raise ValueError("the gptq (v1) format cannot store a zero point of 0 (it stores zero - 1); "
                             "write checkpoint_format gptq_v2 instead")
        zeros = zeros - 1
    return _pack_rows(zeros.t().contiguous(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """qzeros int32 [G, N * bits / 32] -> true zero points int32 [G, N]."""
    check_format(checkpoint_format)
    zeros = _unpack_rows(qzeros.t().contiguous(), bits).t().contiguous()
    return zeros + 1 if checkpoint_format == "gptq" else zeros


def check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format {checkpoint_format!r} is not supported: choose one of {FORMATS}")


def dequantize(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n], as float32 [N, K]."""
    q = unpack_qweight(qweight, bits)
    zeros = unpack_qzeros(qzeros, bits, checkpoint_format)
    g = g_idx.long()
    w = (q - zeros[g]).to(torch.float32) * scales.to(torch.float32)[g]
    return w.t().contiguous()
