"""Tensor-parallel-ready exports: vLLM's rule for splitting a GPTQ checkpoint over N GPUs, and the MLP width padding
that meets it.

vLLM builds a Qwen block from column-parallel linears, which split their outputs over the GPUs (attn.c_attn by heads,
each of q, k and v; mlp.w1 and mlp.w2 as one merged linear), and row-parallel ones, which split their inputs
(attn.c_proj, mlp.c_proj). Its GPTQ loader (GPTQLinearMethod.create_weights) refuses a linear whose inputs per GPU
are not a whole number of groups ("The input size is not aligned with the quantized weight shape"), on one GPU too, or
whose outputs per GPU are not a whole number of packed int32 words. act-order changes none of this. On recent GPUs
vLLM prefers its Marlin kernel, which also wants 64 outputs and 128 inputs per GPU; where those fail,
`--quantization gptq` loads the checkpoint by the rule here. Attention widths are fixed by the heads; the MLP width is
free: zero rows of w1 / w2 and zero input columns of mlp.c_proj change no output (c_proj(w1(x) * silu(w2(x))) with
0 * silu(0)).
"""
import math
from typing import Optional

import torch

from .config import is_int
from .packing import values_per_period

TP_DEGREES = (1, 2, 4, 8)
MARLIN_TILE_N = 64  # vLLM's Marlin kernel takes a linear's outputs per GPU 64 at a time (its min_thread_n)


def block_linears(hidden: int, ffn: int) -> tuple:
    """Each quantized linear of a Qwen block as vLLM's model splits it: (path, inputs, outputs), each side (name,
    width, whether it is split over the GPUs); attn.c_attn's outputs are q, k and v, each one part of this width."""
    return (("attn.c_attn", ("hidden_size", hidden, False), ("hidden_size", hidden, True)),
            ("attn.c_proj", ("hidden_size", hidden, True), ("hidden_size", hidden, False)),
            ("mlp.w1", ("hidden_size", hidden, False), ("MLP width", ffn, True)),
            ("mlp.w2", ("hidden_size", hidden, False), ("MLP width", ffn, True)),
            ("mlp.c_proj", ("MLP width", ffn, True), ("hidden_size", hidden, False)))


def side_problem(path: str, side: str, name: str, width: int, split: bool, bits: int, group_size: int,
                 tp: int) -> Optional[str]:
    """Why vLLM refuses one side ("inputs" or "outputs") of one linear at tp, or None. Per GPU, inputs must be whole
    groups (per channel, group -1, has none to check), and both sides whole packed words: qweight packs the inputs,
    qzeros the outputs. vLLM checks the sum of a merged linear's output parts, but its loader cuts the packed qzeros
    at each part's boundary, so each part is checked."""
    if split and width % tp:
        return f"{name} {width} of {path} does not split over {tp} GPUs"
    per_gpu = width // tp if split else width
    label = f"{name} {width} / {tp} = {per_gpu}" if split and tp > 1 else f"{name} {width}"
    if side == "inputs" and group_size > 0 and per_gpu % group_size:
        return f"{label} {side} per GPU of {path} is not a whole number of groups of {group_size}"
    if per_gpu % values_per_period(bits)[0]:
        return f"{label} {side} per GPU of {path} is not a whole number of packed {bits}-bit words"
    return None


def split_problem(hidden: int, heads: int, ffn: int, bits: int, group_size: int, tp: int) -> Optional[str]:
    """Why vLLM refuses this GPTQ checkpoint at tensor-parallel degree tp (1: one GPU), or None when it accepts it.
    The one rule behind every tensor-parallel claim and check."""
    if heads % tp:
        return f"the {heads} attention heads do not split over {tp} GPUs"
    for path, inputs, outputs in block_linears(hidden, ffn):
        for side, (name, width, split) in (("inputs", inputs), ("outputs", outputs)):
            problem = side_problem(path, side, name, width, split, bits, group_size, tp)
            if problem:
                return problem
    return None


def padded_ffn(ffn: int, group_size: int, tp: int) -> int:
    """The MLP width for `tp` GPUs: the smallest that holds ffn and gives each GPU a whole number of groups and of
    Marlin's 64-column tiles (a multiple of every packing period), so that the MLP passes split_problem at any bits."""
    step = tp * (math.lcm(group_size, MARLIN_TILE_N) if group_size > 0 else MARLIN_TILE_N)
    return -(-ffn // step) * step


def padded_problem(hidden: int, heads: int, bits: int, group_size: int, tp: int) -> Optional[str]:
    """Why vLLM refuses a checkpoint at tp even after --tp tp pads its MLP, or None: what hidden_size and the heads
    decide. Every width padded_ffn gives for tp is a multiple of padded_ffn(1, ...), whose verdict it shares."""
    return split_problem(hidden, heads, padded_ffn(1, group_size, tp), bits, group_size, tp)


def reachable_degrees(hidden: int, heads: int, bits: int, group_size: int) -> list:
    """The degrees in TP_DEGREES at which vLLM accepts the checkpoint once --tp pads its MLP."""
    return [tp for tp in TP_DEGREES if padded_problem(hidden, heads, bits, group_size, tp) is None]


def largest_tp(hidden: int, heads: int, ffn: int, bits: int, group_size: int) -> Optional[int]:
    """The largest degree in TP_DEGREES at which vLLM accepts the checkpoint as written; None when it refuses it
    even on one GPU."""
    return max((tp for tp in TP_DEGREES if split_problem(hidden, heads, ffn, bits, group_size, tp) is None),
               default=None)


def check_tp(tp: int, hidden: int, heads: int, bits: int, group_size: int) -> None:
    """--tp before any work: a supported degree at which vLLM accepts the padded checkpoint."""
    if not is_int(tp):
        raise TypeError(f"tp={tp!r} ({type(tp).__name__}) is not an integer: choose one of {TP_DEGREES}")
    if tp not in TP_DEGREES:
        raise ValueError(f"--tp {tp} is not supported: choose one of {TP_DEGREES}")
    problem = padded_problem(hidden, heads, bits, group_size, tp)
    if problem:
        possible = reachable_degrees(hidden, heads, bits, group_size)
        allowed = f"allows --tp {max(possible)} at most" if possible else "is refused by vLLM at every --tp"
        raise ValueError(f"--tp {tp}: {problem}, and only the MLP width is padded, so vLLM would refuse the "
                         f"checkpoint; with group size {group_size} this model {allowed}")


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
    """One line for the summary and the model card, all from split_problem: the largest TP degree vLLM accepts for
    the output (or why it refuses it on one GPU), and how --tp reaches 8, or the largest it can."""
    hidden, heads, ffn, bits, group = (output.hidden_size, output.num_attention_heads, output.ffn_size, quant.bits,
                                       quant.group_size)
    largest = largest_tp(hidden, heads, ffn, bits, group)
    if largest is None:
        line = (f"tensor parallel: vLLM refuses this checkpoint, even on one GPU: "
                f"{split_problem(hidden, heads, ffn, bits, group, 1)}")
    else:
        line = f"tensor parallel: the largest degree vLLM accepts for this checkpoint is {largest}"
    if tp is not None:
        line += f" (--tp {tp} padded the MLP width with zeros from {source.ffn_size} to {ffn}: same outputs)"
    top = max(TP_DEGREES)
    if largest == top:
        return line
    reachable = reachable_degrees(hidden, heads, bits, group)
    if top in reachable:
        return line + f"; quantize with --tp {top} to make it {top} (MLP width {ffn} -> {padded_ffn(ffn, group, top)})"
    if not reachable:  # then the problem is in what padding does not change
        return line + "; no --tp can fix it (only the MLP width is padded)"
    line += f"; {top} is impossible: {padded_problem(hidden, heads, bits, group, top)}"
    if max(reachable) > (largest or 0):
        line += f"; quantize with --tp {max(reachable)} to make it {max(reachable)}"
    return line
