"""Qwen (v1)'s checkpoint layout as data: tensor names, the five quantized linears and their shapes, the order in
which GPTQ quantizes them, and the tensors a quantized linear is stored as. Every other module asks here, so a
change of layout (another model width, padding, a new tensor) is made once."""
import re

from .config import QwenConfig

EMBEDDING = "transformer.wte.weight"
FINAL_NORM = "transformer.ln_f.weight"
LM_HEAD = "lm_head.weight"
UNQUANTIZED = (EMBEDDING, FINAL_NORM, LM_HEAD)  # the tensors outside the blocks, written as they are in fp16
BLOCKS = "transformer.h"  # the ModuleList of decoder blocks, and the start of every block tensor's name
BLOCK_TENSOR = re.compile(r"transformer\.h\.(0|[1-9][0-9]*)\.(.+)")  # (block index, name inside the block)
BLOCK_NORMS = ("ln_1", "ln_2")

# The five linears of a block, by their path inside it, in the order of the block's forward.
QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# True-sequential GPTQ: each group's Hessian is taken from inputs computed with the groups before it quantized.
TRUE_SEQUENTIAL_GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))
# The groups from this one on see only the residual stream after attention (x + c_proj(attention)), not the block's
# input: quantization keeps that stream in the input's place from there on.
RESIDUAL_GROUP = 2
# The groups whose input is an RMSNorm's output, and that norm: a per-input-channel scale of their weights can be
# undone in the norm's weight, so the model's function does not change.
NORM_BEFORE = {("attn.c_attn",): "ln_1", ("mlp.w1", "mlp.w2"): "ln_2"}

# The tensors of one quantized linear (AutoGPTQ's names); a checkpoint may leave out the optional ones.
GPTQ_PACKED = ("qweight", "qzeros", "scales", "g_idx")  # what packing.dequantize decodes, in its argument order
GPTQ_TENSORS = GPTQ_PACKED + ("bias",)
GPTQ_OPTIONAL = ("g_idx", "bias")
GPTQ_REQUIRED = tuple(t for t in GPTQ_TENSORS if t not in GPTQ_OPTIONAL)


def block_prefix(i: int) -> str:
    """The start of every tensor name of block i: `transformer.h.{i}.`"""
    return f"{BLOCKS}.{i}."


def linear_shapes(config: QwenConfig) -> dict:
    """path -> (in_features K, out_features N, dense bias) of the five linears of one block. c_attn always has a
    bias; the others have one unless config.no_bias."""
    h, ff, biased = config.hidden_size, config.ffn_size, not config.no_bias
    return {"attn.c_attn": (h, 3 * h, True), "attn.c_proj": (h, h, biased), "mlp.w1": (h, ff, biased),
            "mlp.w2": (h, ff, biased), "mlp.c_proj": (ff, h, biased)}
