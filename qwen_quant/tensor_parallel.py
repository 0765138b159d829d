"""Tensor-parallel-ready exports: vLLM's rule for splitting a GPTQ checkpoint over N GPUs, and the MLP width padding
that meets it.

vLLM builds a Qwen block from column-parallel linears, which split their outputs over the GPUs (q, k and v by heads,
fused in v1's attn.c_attn or three in the later families; the MLP's gate and up as one merged linear), and
row-parallel ones, which split their inputs (the attention's output projection, the MLP's down projection). With
grouped-query attention (QKVParallelLinear) the kv heads split over the GPUs when there are at least as many as
GPUs, and are replicated otherwise, each GPU holding one kv head. Its GPTQ loader (GPTQLinearMethod.create_weights)
refuses a linear whose inputs per GPU are not a whole number of groups ("The input size is not aligned with the
quantized weight shape"), on one GPU too, or whose outputs per GPU are not a whole number of packed int32 words.
act-order changes none of this. On recent GPUs vLLM prefers its Marlin kernel, which also wants 64 outputs and 128
inputs per GPU; where those fail, `--quantization gptq` loads the checkpoint by the rule here. Attention widths are
fixed by the heads; the MLP width is free: zero rows of gate / up and zero input columns of down change no output
(down(up(x) * silu(gate(x))) with 0 * silu(0)).
"""
import math
from typing import Optional

import torch

from .config import QwenConfig, is_int
from .layout import QWEN, Layout, layout_of
from .packing import values_per_period

TP_DEGREES = (1, 2, 4, 8)
MARLIN_TILE_N = 64  # vLLM's Marlin kernel takes a linear's outputs per GPU 64 at a time (its min_thread_n)


def attention_of(config: QwenConfig) -> dict:
    """The keywords of split_problem (and of the functions built on it) that describe a model's attention: its kv
    heads, head dim and layout (their defaults are v1's: a kv head per head, hidden / heads, QWEN)."""
    return dict(kv_heads=config.num_key_value_heads, head_dim=config.head_dim, layout=layout_of(config))


def block_linears(hidden: int, heads: int, ffn: int, tp: int, kv_heads: int, head_dim: int, layout: Layout) -> list:
    """Each quantized linear of a block as vLLM's model splits it over tp GPUs: (path, inputs, outputs), each side
    (name, width, the parts it is cut into). A fused q|k|v linear (v1's c_attn) is listed once per part: its outputs
    q, k and v are cut one by one. The kv heads are cut in min(kv_heads, tp) parts: with fewer kv heads than GPUs
    each GPU holds a copy of one."""
    attention = "hidden_size" if heads * head_dim == hidden else "heads x head_dim"
    q_side = (attention, heads * head_dim, tp)
    kv_side = q_side if kv_heads == heads else ("kv heads x head_dim", kv_heads * head_dim, min(kv_heads, tp))
    hidden_side, mlp_side = ("hidden_size", hidden, 1), ("MLP width", ffn, tp)
    qkv_paths = layout.qkv * 3 if len(layout.qkv) == 1 else layout.qkv
    return ([(path, hidden_side, part) for path, part in zip(qkv_paths, (q_side, kv_side, kv_side))]
            + [(layout.out, q_side, hidden_side), (layout.up, hidden_side, mlp_side),
               (layout.gate, hidden_side, mlp_side), (layout.down, mlp_side, hidden_side)])


def side_problem(path: str, side: str, name: str, width: int, parts: int, bits: int, group_size: int,
                 tp: int) -> Optional[str]:
    """Why vLLM refuses one side ("inputs" or "outputs") of one linear at tp, or None. Per GPU, inputs must be whole
    groups (per channel, group -1, has none to check), and both sides whole packed words: qweight packs the inputs,
    qzeros the outputs. vLLM checks the sum of a merged linear's output parts, but its loader cuts the packed qzeros
    at each part's boundary, so each part is checked."""
    if width % parts:
        return f"{name} {width} of {path} does not split over {tp} GPUs"
    per_gpu = width // parts
    label = f"{name} {width} / {parts} = {per_gpu}" if parts > 1 else f"{name} {width}"
    if side == "inputs" and group_size > 0 and per_gpu % group_size:
        return f"{label} {side} per GPU of {path} is not a whole number of groups of {group_size}"
    if per_gpu % values_per_period(bits)[0]:
        return f"{label} {side} per GPU of {path} is not a whole number of packed {bits}-bit words"
    return None


def split_problem(hidden: int, heads: int, ffn: int, bits: int, group_size: int, tp: int,
                  kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                  layout: Layout = QWEN) -> Optional[str]:
    """Why vLLM refuses this GPTQ checkpoint at tensor-parallel degree tp (1: one GPU), or None when it accepts it.
    The one rule behind every tensor-parallel claim and check. kv_heads, head_dim, layout: attention_of(config)."""
    kv_heads, head_dim = kv_heads or heads, head_dim or hidden // heads
    if heads % tp:
        return f"the {heads} attention heads do not split over {tp} GPUs"
    if kv_heads >= tp and kv_heads % tp:
        return f"the {kv_heads} kv heads do not split over {tp} GPUs"
    if kv_heads < tp and tp % kv_heads:  # vLLM's QKVParallelLinear: each kv head on tp / kv_heads GPUs
        return f"the {kv_heads} kv heads cannot be replicated evenly over {tp} GPUs ({tp} is no multiple of {kv_heads})"
    for path, inputs, outputs in block_linears(hidden, heads, ffn, tp, kv_heads, head_dim, layout):
        for side, (name, width, parts) in (("inputs", inputs), ("outputs", outputs)):
            problem = side_problem(path, side, name, width, parts, bits, group_size, tp)
            if problem:
                return problem
    return None


def padded_ffn(ffn: int, group_size: int, tp: int) -> int:
    """The MLP width for `tp` GPUs: the smallest that holds ffn and gives each GPU a whole number of groups and of
    Marlin's 64-column tiles (a multiple of every packing period), so that the MLP passes split_problem at any bits."""
    step = tp * (math.lcm(group_size, MARLIN_TILE_N) if group_size > 0 else MARLIN_TILE_N)
    return -(-ffn // step) * step


def padded_problem(hidden: int, heads: int, bits: int, group_size: int, tp: int, **attention) -> Optional[str]:
    """Why vLLM refuses a checkpoint at tp even after --tp tp pads its MLP, or None: what hidden_size and the heads
    decide. Every width padded_ffn gives for tp is a multiple of padded_ffn(1, ...), whose verdict it shares."""
    return split_problem(hidden, heads, padded_ffn(1, group_size, tp), bits, group_size, tp, **attention)


def reachable_degrees(hidden: int, heads: int, bits: int, group_size: int, **attention) -> list:
    """The degrees in TP_DEGREES at which vLLM accepts the checkpoint once --tp pads its MLP."""
    return [tp for tp in TP_DEGREES if padded_problem(hidden, heads, bits, group_size, tp, **attention) is None]


def largest_tp(hidden: int, heads: int, ffn: int, bits: int, group_size: int, **attention) -> Optional[int]:
    """The largest degree in TP_DEGREES at which vLLM accepts the checkpoint as written; None when it refuses it
    even on one GPU."""
    return max((tp for tp in TP_DEGREES
                if split_problem(hidden, heads, ffn, bits, group_size, tp, **attention) is None), default=None)


def check_tp(tp: int, hidden: int, heads: int, bits: int, group_size: int, **attention) -> None:
    """--tp before any work: a supported degree at which vLLM accepts the padded checkpoint. attention:
    attention_of(config) (default: v1's)."""
    if not is_int(tp):
        raise TypeError(f"tp={tp!r} ({type(tp).__name__}) is not an integer: choose one of {TP_DEGREES}")
    if tp not in TP_DEGREES:
        raise ValueError(f"--tp {tp} is not supported: choose one of {TP_DEGREES}")
    problem = padded_problem(hidden, heads, bits, group_size, tp, **attention)
    if problem:
        possible = reachable_degrees(hidden, heads, bits, group_size, **attention)
        allowed = f"allows --tp {max(possible)} at most" if possible else "is refused by vLLM at every --tp"
        raise ValueError(f"--tp {tp}: {problem}, and only the MLP width is padded, so vLLM would refuse the "
                         f"checkpoint; with group size {group_size} this model {allowed}")


def pad_mlp(mlp: torch.nn.Module, ffn: int, layout: Layout = QWEN) -> None:
    """Grow the width of mlp (the module holding the layout's gate, up and down linears) to ffn in place: zero
    output rows of gate and up, zero input columns of down."""
    gate, up, down = (mlp.get_submodule(path.rpartition(".")[2]) for path in (layout.gate, layout.up, layout.down))
    extra = ffn - down.in_features
    if extra < 0:
        raise ValueError(f"cannot pad the MLP width {down.in_features} down to {ffn}")
    for linear, dim in ((up, 0), (gate, 0), (down, 1)):
        w = linear.weight
        pad = [0, 0, 0, extra] if dim == 0 else [0, extra]
        linear.weight = torch.nn.Parameter(torch.nn.functional.pad(w, pad), requires_grad=False)
        if dim == 0 and linear.bias is not None:
            linear.bias = torch.nn.Parameter(torch.nn.functional.pad(linear.bias, [0, extra]), requires_grad=False)
        linear.in_features, linear.out_features = linear.weight.shape[1], linear.weight.shape[0]


def tp_summary(source, output, quant, tp: Optional[int], attention: Optional[dict] = None) -> str:
    """One line for the summary and the model card, all from split_problem: the largest TP degree vLLM accepts for
    the output (or why it refuses it on one GPU), whether vLLM replicates its kv heads there, and how --tp reaches 8,
    or the largest it can. attention: attention_of(output) (default: v1's)."""
    hidden, heads, ffn, bits, group = (output.hidden_size, output.num_attention_heads, output.ffn_size, quant.bits,
                                       quant.group_size)
    attention = attention or {}
    largest = largest_tp(hidden, heads, ffn, bits, group, **attention)
    if largest is None:
        line = (f"tensor parallel: vLLM refuses this checkpoint, even on one GPU: "
                f"{split_problem(hidden, heads, ffn, bits, group, 1, **attention)}")
    else:
        line = f"tensor parallel: the largest degree vLLM accepts for this checkpoint is {largest}"
    kv_heads = attention.get("kv_heads") or heads
    if kv_heads < max(largest or 1, tp or 1):
        line += (f" (on more than {kv_heads} GPUs vLLM replicates the {kv_heads} kv heads: each GPU holds a copy of "
                 "one kv head's k and v weights)")
    if tp is not None:
        line += f" (--tp {tp} padded the MLP width with zeros from {source.ffn_size} to {ffn}: same outputs)"
    top = max(TP_DEGREES)
    if largest == top:
        return line
    reachable = reachable_degrees(hidden, heads, bits, group, **attention)
    if top in reachable:
        return line + f"; quantize with --tp {top} to make it {top} (MLP width {ffn} -> {padded_ffn(ffn, group, top)})"
    if not reachable:  # then the problem is in what padding does not change
        return line + "; no --tp can fix it (only the MLP width is padded)"
    line += f"; {top} is impossible: {padded_problem(hidden, heads, bits, group, top, **attention)}"
    if max(reachable) > (largest or 0):
        line += f"; quantize with --tp {max(reachable)} to make it {max(reachable)}"
    return line
