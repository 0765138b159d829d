"""Tensor-parallel-ready exports: the MLP width padding that lets vLLM split a GPTQ checkpoint over N GPUs.

vLLM splits c_attn by heads, w1 / w2 by output columns and attn.c_proj / mlp.c_proj by input rows; every shard must
hold whole quantization groups and whole packed int32 words, else it refuses the checkpoint ("input size is not
aligned with the quantized weight shape"). Attention widths are fixed by the heads; the MLP width is free: zero
rows of w1 / w2 and zero input columns of mlp.c_proj change no output (c_proj(w1(x) * silu(w2(x))) with 0 * silu(0)).
"""
import math
from typing import Optional

import torch

from .packing import values_per_period

TP_DEGREES = (1, 2, 4, 8)
MARLIN_TILE_N = 64  # Marlin's output tile: each shard of w1 / w2 must have a multiple of 64 output columns


def padded_ffn(ffn: int, group_size: int, tp: int) -> int:
    """The MLP width for `tp` GPUs: the smallest multiple of group_size * tp and of 64 * tp that holds ffn."""
    step = math.lcm(group_size * tp, MARLIN_TILE_N * tp) if group_size > 0 else MARLIN_TILE_N * tp
    return -(-ffn // step) * step


def attention_split_problem(hidden: int, heads: int, bits: int, group_size: int, tp: int) -> Optional[str]:
    """Why the (unpadded) attention cannot be split over `tp` GPUs, or None when it can."""
    if heads % tp:
        return f"the {heads} attention heads do not split over {tp} GPUs"
    shard = hidden // tp
    if group_size > 0 and shard % group_size:
        return (f"hidden_size {hidden} / {tp} = {shard} inputs per GPU of attn.c_proj is not a whole number of "
                f"groups of {group_size}")
    if shard % values_per_period(bits)[0]:
        return f"hidden_size {hidden} / {tp} = {shard} is not a whole number of packed {bits}-bit words"
    return None


def attention_degrees(hidden: int, heads: int, bits: int, group_size: int) -> list:
    """The degrees in TP_DEGREES whose attention split is valid (the MLP can always be padded to fit)."""
    return [tp for tp in TP_DEGREES if attention_split_problem(hidden, heads, bits, group_size, tp) is None]


def largest_tp(hidden: int, heads: int, ffn: int, bits: int, group_size: int) -> int:
    """The largest degree in TP_DEGREES whose vLLM split of the checkpoint as written is valid (no padding needed);
    1 (no split) always works."""
    return max([1] + [tp for tp in attention_degrees(hidden, heads, bits, group_size)
                      if padded_ffn(ffn, group_size, tp) == ffn])


def check_tp(tp: int, hidden: int, heads: int, bits: int, group_size: int) -> None:
    """--tp before any work: a supported degree whose attention split is valid."""
    if tp not in TP_DEGREES:
        raise ValueError(f"--tp {tp} is not supported: choose one of {TP_DEGREES}")
    problem = attention_split_problem(hidden, heads, bits, group_size, tp)
    if problem:
        possible = attention_degrees(hidden, heads, bits, group_size)
        raise ValueError(f"--tp {tp}: {problem}, and attention is not padded, so vLLM would refuse the checkpoint; "
                         f"with group size {group_size} this model allows --tp {max(possible) if possible else 'none'}"
                         " at most")


def pad_mlp(mlp: torch.nn.Module, ffn: int) -> None:
    """Grow mlp's width to ffn in place: zero output rows of w1 and w2, zero input columns of c_proj."""
    extra = ffn - mlp.c_proj.in_features
    if extra < 0:
        raise ValueError(f"cannot pad the MLP width {mlp.c_proj.in_features} down to {ffn}")
    for linear, dim in ((mlp.w1, 0), (mlp.w2, 0), (mlp.c_proj, 1)):
        w = linear.weight
        pad = [0, 0, 0, extra] if dim == 0 else [0, extra]
        linear.weight = torch.nn.Parameter(torch.nn.functional.pad(w, pad), requires_grad=False)
        if dim == 0 and linear.bias is not None:
            linear.bias = torch.nn.Parameter(torch.nn.functional.pad(linear.bias, [0, extra]), requires_grad=False)
        linear.in_features, linear.out_features = linear.weight.shape[1], linear.weight.shape[0]


def tp_summary(source, output, quant, tp: Optional[int]) -> str:
    """One line for the summary and the model card: the largest TP degree of the output, and how to reach 8."""
    hidden, heads, ffn = output.hidden_size, output.num_attention_heads, output.ffn_size
    largest = largest_tp(hidden, heads, ffn, quant.bits, quant.group_size)
    line = f"tensor parallel: the largest degree vLLM accepts for this checkpoint is {largest}"
    if tp is not None:
        line += f" (--tp {tp} padded the MLP width with zeros from {source.ffn_size} to {ffn}: same outputs)"
    if largest == max(TP_DEGREES):
        return line
    top = max(TP_DEGREES)
    reachable = attention_degrees(hidden, heads, quant.bits, quant.group_size)
    if top in reachable:
        return line + f"; quantize with --tp {top} to make it {top} (MLP width {ffn} -> " \
                      f"{padded_ffn(ffn, quant.group_size, top)})"
    line += f"; {top} is impossible: {attention_split_problem(hidden, heads, quant.bits, quant.group_size, top)}"
    if reachable and max(reachable) > largest:
        line += f"; quantize with --tp {max(reachable)} to make it {max(reachable)}"
    return line
