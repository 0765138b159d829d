"""The checkpoint layouts of the Qwen generations as data: tensor names, the linears of a block and their shapes,
the order in which GPTQ quantizes them, and the tensors a quantized linear is stored as. One Layout per family
(v1 `qwen`, `qwen2` for Qwen1.5 / 2 / 2.5, `qwen3`), found by config.model_type; the module-level names are v1's,
which the parts that know only v1 (synthetic checkpoints) read. Every other module asks here, so a
change of layout (another model width, padding, a new tensor) is made once."""
import re
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from .config import REAL_VOCAB, QwenConfig

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


def hf_linear_shapes(config: QwenConfig) -> dict:
    """The seven linears of a qwen2 / qwen3 block: q/k/v with a bias in qwen2 (always) and qwen3 (attention_bias),
    o with one in qwen3 only; the MLP has none. k and v are as wide as the kv heads (grouped-query attention)."""
    h, ff, d = config.hidden_size, config.ffn_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    qkv_bias = config.model_type == "qwen2" or config.attention_bias
    return {"self_attn.q_proj": (h, q, qkv_bias), "self_attn.k_proj": (h, kv, qkv_bias),
            "self_attn.v_proj": (h, kv, qkv_bias), "self_attn.o_proj": (q, h, config.attention_bias),
            "mlp.gate_proj": (h, ff, False), "mlp.up_proj": (h, ff, False), "mlp.down_proj": (ff, h, False)}


@dataclass(frozen=True)
class Layout:
    """One family's checkpoint layout. A block computes x += out(attention(qkv(norms[0](x)))), then
    x += down(up(m) * silu(gate(m))) with m = norms[1](x); its tensor names are `{blocks}.{i}.{path}.weight`."""

    name: str  # config.json's model_type
    embedding: str  # tensor names outside the blocks
    final_norm: str
    lm_head: str  # absent from a checkpoint with tie_word_embeddings: the head is the embedding
    blocks: str  # the ModuleList of decoder blocks, and the start of every block tensor's name
    norms: tuple  # a block's RMSNorms: before attention, before the MLP
    qkv: tuple  # the linears giving q, k and v: one fused (v1's c_attn) or three
    out: str  # attention's output projection
    gate: str
    up: str
    down: str
    groups: tuple  # true-sequential GPTQ groups, in the block's forward order
    linear_shapes: Callable  # config -> {path: (in_features, out_features, bias)}, in forward order
    qk_norms: tuple = ()  # per-head RMSNorms of q and k before RoPE (qwen3)
    # v1's published folders: transformers runs them by remote code (config.json's auto_map and bf16/fp16/fp32
    # flags) and AutoGPTQ reads quantize_config.json beside config.json; the later families are transformers-native
    # and carry quantization_config in config.json only.
    remote_code: bool = False
    # v1's published files carry a bias on every linear (zeros except c_attn's, as AutoGPTQ then wrote them); the
    # later families' peers write a bias only where the model has one (qwen2's q/k/v).
    bias_on_every_linear: bool = False
    # The ids a tokenizer can give when the model's folder has no tokenizer.json to count them (loading reads it):
    # v1's qwen.tiktoken has 151851, below its embedding's padded rows; None: every row is a token.
    real_vocab: Optional[int] = None
    # What Qwen appends to a model's name for its quantized copy: Qwen-7B-Chat-Int4, Qwen2.5-7B-Instruct-GPTQ-Int4.
    quantized_suffix: str = "-GPTQ-Int{bits}"

    @property
    def block_tensor(self) -> re.Pattern:
        """(block index, name inside the block) of a block tensor's name."""
        return re.compile(re.escape(self.blocks) + r"\.(0|[1-9][0-9]*)\.(.+)")

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks}.{i}."

    @property
    def attention(self) -> str:
        """The module holding the attention's linears (and qwen3's q/k norms): `attn`, `self_attn`."""
        return self.out.rpartition(".")[0]

    @property
    def linears(self) -> tuple:
        """The linears of a block, in the order of its forward (and of quantization)."""
        return tuple(path for group in self.groups for path in group)

    @property
    def siblings(self) -> dict:
        """The linears that read one input and can run as one matmul, their outputs side by side: the joined
        module's path (vLLM's names) -> theirs, in output order. v1's q/k/v are one linear already."""
        joined = {} if len(self.qkv) == 1 else {f"{self.attention}.qkv_proj": self.qkv}
        joined[f"{self.gate.rpartition('.')[0]}.gate_up_proj"] = (self.gate, self.up)
        return joined

    @property
    def norm_before(self) -> dict:
        """The groups whose input is an RMSNorm's output, and that norm."""
        return {self.groups[0]: self.norms[0], self.groups[RESIDUAL_GROUP]: self.norms[1]}


QWEN = Layout(name="qwen", embedding=EMBEDDING, final_norm=FINAL_NORM, lm_head=LM_HEAD, blocks=BLOCKS,
              norms=BLOCK_NORMS, qkv=("attn.c_attn",), out="attn.c_proj", gate="mlp.w2", up="mlp.w1",
              down="mlp.c_proj", groups=TRUE_SEQUENTIAL_GROUPS, linear_shapes=linear_shapes, remote_code=True,
              bias_on_every_linear=True, real_vocab=REAL_VOCAB, quantized_suffix="-Int{bits}")
QWEN2 = Layout(name="qwen2", embedding="model.embed_tokens.weight", final_norm="model.norm.weight",
               lm_head="lm_head.weight", blocks="model.layers", norms=("input_layernorm", "post_attention_layernorm"),
               qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), out="self_attn.o_proj",
               gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
               groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                       ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
               linear_shapes=hf_linear_shapes)
QWEN3 = dataclasses.replace(QWEN2, name="qwen3", qk_norms=("self_attn.q_norm", "self_attn.k_norm"))
LAYOUTS = {layout.name: layout for layout in (QWEN, QWEN2, QWEN3)}


def layout_of(config: QwenConfig) -> Layout:
    """The layout of config's family (config.model_type, checked against config.FAMILIES when it was read)."""
    return LAYOUTS[config.model_type]
