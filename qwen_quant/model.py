"""The Qwen decoder of every generation in plain PyTorch: no transformers, no trust_remote_code.

One block: x = x + out(attn(qkv(norm_1(x)))); x = x + down(up(m) * silu(gate(m))) with m = norm_2(x). The module
tree and its names follow the family's layout (layout.Layout), so state_dict names are the checkpoint's: v1's
attn.c_attn / mlp.w2 (the gate), qwen2's and qwen3's self_attn.q_proj / mlp.gate_proj.
"""
import functools
import math
import types
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_attention
from .config import QwenConfig
from .layout import BLOCKS, RESIDUAL_GROUP, Layout, layout_of
from .loading import load_dequantized_weights, load_weights, open_checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Computed in fp32 like the original, whatever the activation dtype.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)


def ntk_alpha(total_len: int, seq_length: int) -> float:
    """Qwen's dynamic-NTK factor: 1 up to seq_length, then 2**ceil(log2(L / seq_length) + 1) - 1."""
    return max(2 ** math.ceil(math.log2(total_len / seq_length) + 1) - 1, 1)


@dataclass
class Rope:
    """Everything a block needs to know about positions for one forward call."""

    cos: torch.Tensor  # [T, head_dim] fp32, or [B, T, head_dim] through the cache (each row its own positions)
    sin: torch.Tensor
    logn: Optional[torch.Tensor]  # [T] (or [B, T]) fp32 query scale, or None when every factor is 1
    positions: torch.Tensor  # [T] absolute positions of the queries, or [B, T] each row's own (through the cache)
    mask: Optional[torch.Tensor] = None  # additive [T, keys] (or [B, 1, T, keys]): 0 attends, -inf not; None: plain
    # causal over T keys
    use_cache: bool = False  # write keys/values into the preallocated cache at positions and attend over all of it

    def at(self, positions: torch.Tensor, mask: torch.Tensor) -> "Rope":
        """The rows of this table (made for positions 0, 1, ...) at `positions` ([T], or [B, T] for rows at positions
        of their own), for a forward through the cache: tensor indexing only, so a compiled decode step reads nothing
        on the host."""
        logn = None if self.logn is None else self.logn[positions]
        return Rope(self.cos[positions], self.sin[positions], logn, positions, mask, use_cache=True)


def make_rope(config: QwenConfig, length: int, alpha: float, device=None, window_mask: bool = True) -> Rope:
    """Rope for positions 0..length-1 with the dynamic-NTK factor alpha. logN scales are kept when a position passes
    seq_length; the local window (if any) becomes a mask unless window_mask is False (a table for the cache, whose
    mask is made per call)."""
    d = config.head_dim
    positions = torch.arange(length, device=device)
    base = config.rotary_emb_base * alpha ** (d / (d - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    logn = None
    if config.use_logn_attn and length > config.seq_length:
        n = positions.double() + 1
        logn = torch.where(n > config.seq_length, n.log() / math.log(config.seq_length), torch.ones_like(n)).float()
    window = config.local_window_size
    mask = attention_mask(positions, length, window) if window is not None and window_mask else None
    return Rope(angles.cos(), angles.sin(), logn, positions, mask)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dim, in fp32. x: [B, T, H, D]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    cos, sin = rope.cos.unsqueeze(-2), rope.sin.unsqueeze(-2)  # over the heads
    return (xf * cos).add_(rotated.mul_(sin)).type_as(x)  # in place: two temporaries of x's size, not four


class KVCache(nn.Module):
    """Keys and values of every position up to max_len, in a tensor of fixed shape: a step writes its positions with
    index_copy_ and attends over the whole cache under a mask, so no step changes a shape (one compiled decode step,
    one CUDA graph)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        # One query attends through our CPU operator where it runs (qwen_quant.cpu_attention): decided here, outside
        # any compiled step, so that tracing one reads a constant.
        self.one_query_op = cpu_attention.serves(torch.device(device), dtype, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, heads, T, head_dim] at positions [T] (every row's) or [B, T] (each row's own)."""
        # index_copy_ / index_put_, not scatter_: a compiled step writes them into the cache in place, but scatter_
        # into a copy of the whole cache that it then copies back (two passes over every layer's cache a step: 14 %
        # of a compiled SmolLM2 Int4 step, measured). Eager, index_copy_ takes 2 us, index_put_ 12, scatter_ 19.
        if positions.dim() == 1:
            self.k.index_copy_(2, positions, k)
            self.v.index_copy_(2, positions, v)
        else:
            B, heads = k.shape[:2]
            index = (torch.arange(B, device=k.device)[:, None, None],
                     torch.arange(heads, device=k.device)[None, :, None], positions[:, None, :])
            self.k.index_put_(index, k)
            self.v.index_put_(index, v)
        return self.k, self.v


def place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put module at the dotted path under root, making plain containers on the way: the tree follows the layout."""
    *owners, leaf = path.split(".")
    for name in owners:
        if name not in root._modules:
            root.add_module(name, nn.Module())
        root = root._modules[name]
    root.add_module(leaf, module)


def at(root: nn.Module, names: tuple) -> nn.Module:
    """The module at a path split once at build time: dictionary reads, not get_submodule's parsing each call."""
    for name in names:
        root = root._modules[name]
    return root


def split_path(path: str) -> tuple:
    return tuple(path.split("."))


class Attention(nn.Module):
    """A block's attention: the module at the layout's attention path, holding its linears (placed by Block under
    the layout's names), qwen3's per-head q/k norms and the KV cache; `mix` is the attention itself."""

    def __init__(self, config: QwenConfig, qk_norms: tuple):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, \
            config.head_dim
        for name in qk_norms:
            self.add_module(name, RMSNorm(self.head_dim, config.layer_norm_epsilon))
        self.qk_norms = qk_norms  # their names: q's, k's
        self.cache: Optional[KVCache] = None

    def mix(self, qkv: tuple, rope: Rope) -> torch.Tensor:
        """The projections (q, k, v) [B, T, width] -> the heads' attention outputs [B, T, heads * head_dim]:
        grouped-query attention, the cache holding the kv heads only (no repeated keys or values)."""
        q, k, v = qkv
        B, T, _ = q.shape
        q = q.view(B, T, self.heads, self.head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        if self.qk_norms:  # qwen3: each head's q and k RMS-normed before RoPE
            q, k = self._modules[self.qk_norms[0]](q), self._modules[self.qk_norms[1]](k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if rope.logn is not None:
            q = (q.float() * rope.logn[..., None, None]).type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope.use_cache:
            k, v = self.cache.update(rope.positions, k, v)
        if T == 1 and rope.use_cache and self.cache.one_query_op:
            y = cpu_attention.attend(q, k, v, rope.mask)
            return y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        gqa, dtype = self.kv_heads != self.heads, q.dtype
        if T == 1 and q.device.type == "cpu":
            # One query on the CPU: the half-precision attention kernel takes 3-4.5x the time of converting to fp32
            # and attending there (SmolLM2's decode step, 256 to 1024 cached positions, measured); prompts keep it.
            q, k, v = q.float(), k.float(), v.float()
        if rope.mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=rope.mask.to(q.dtype), enable_gqa=gqa)
        return y.to(dtype).transpose(1, 2).reshape(B, T, self.heads * self.head_dim)


def attention_mask(query_pos: torch.Tensor, key_len: int, window: Optional[int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive [T, key_len] mask (0 = attend, -inf = not; [B, T, key_len] for query_pos [B, T]): causal,
    optionally limited to the last `window` positions. Additive, not boolean: the CPU's bf16 attention kernel takes
    ten times longer with a boolean mask (0.37 against 0.04 ms per decode step and layer on SmolLM2's shapes,
    measured)."""
    key_pos = torch.arange(key_len, device=query_pos.device)
    attend = key_pos <= query_pos[..., None]
    if window is not None:
        attend &= key_pos > query_pos[..., None] - window
    return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill_(~attend, float("-inf"))


def left_padding(attention_mask, ids: torch.Tensor) -> torch.Tensor:
    """Each row's count of left-padding slots [B] from generate's attention_mask (1 = token, 0 = padding, as
    transformers'), checked: ids' shape, 0s and 1s only, the 0s before every 1, at least one token a row."""
    mask = torch.as_tensor(attention_mask, device=ids.device)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}: they must agree")
    if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold integers 0 (left padding) and 1 (token) only")
    mask = mask.long()
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError("attention_mask must pad on the left: in each row every 0 comes before the first 1")
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask has a row of padding only: every prompt needs at least one token")
    return ids.shape[1] - mask.sum(1)


def padding_to_the_right(ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Left-padded rows [B, T] with each row's tokens moved to its first columns and its pad[b] padding after them."""
    columns = torch.arange(ids.shape[1], device=ids.device)
    return ids.gather(1, (columns + pad[:, None]) % ids.shape[1])


class Block(nn.Module):
    """forward is written as stages, one per true-sequential group of linears (layout.groups), so that quantization
    can run one stage over all its calibration chunks, quantize that group, and then run the next stage, without a
    second description of the block.

    Stage i (0 <= i < len(groups)) returns the input of groups[i]; stage len(groups) returns the block's output. The
    stages before RESIDUAL take x, the block's input [B, T, h], and y, a tensor [B, T, heads * head_dim] (x's
    shape, unless an explicit head_dim differs as Qwen3-0.6B's does) into which stage 1 writes the attention's
    output; add_attention then makes the residual stream after attention, and the stages from RESIDUAL on read only
    that stream, as y (x is spent: quantization keeps the stream in x's place). Each stage may be given the previous
    stage's result (`previous`, else it is recomputed): forward passes it on.
    """

    RESIDUAL = RESIDUAL_GROUP  # the first stage that reads the residual stream (add_attention's output)

    def __init__(self, config: QwenConfig, layout: Optional[Layout] = None):
        super().__init__()
        self.layout = layout = layout or layout_of(config)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        place(self, layout.norms[0], RMSNorm(h, eps))
        place(self, layout.attention, Attention(config, tuple(p.rpartition(".")[2] for p in layout.qk_norms)))
        place(self, layout.norms[1], RMSNorm(h, eps))
        for path, (k, n, bias) in layout.linear_shapes(config).items():
            place(self, path, nn.Linear(k, n, bias=bias))
        self.norm_1, self.norm_2 = (split_path(p) for p in layout.norms)
        self.attention_path, self.qkv = split_path(layout.attention), tuple(split_path(p) for p in layout.qkv)
        self.out, self.gate, self.up, self.down = (split_path(p) for p in (layout.out, layout.gate, layout.up,
                                                                           layout.down))
        self.gate_up = None  # the path of gate and up joined in one module (join), if they are
        d = config.head_dim
        self.attention_width = config.num_attention_heads * d  # q's, and the attention output's
        self.qkv_widths = (self.attention_width, config.num_key_value_heads * d, config.num_key_value_heads * d)

    @property
    def attention(self) -> Attention:
        return at(self, self.attention_path)

    def attend(self, normed: torch.Tensor, rope: Rope) -> torch.Tensor:
        """The heads' attention outputs [B, T, heads * head_dim] of the normed input, before the output projection."""
        if len(self.qkv) == 1:  # one fused q|k|v projection (v1)
            qkv = at(self, self.qkv[0])(normed).split(self.qkv_widths, dim=-1)
        else:
            qkv = tuple(at(self, path)(normed) for path in self.qkv)
        return self.attention.mix(qkv, rope)

    def mlp_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the down projection: up * silu(gate), in place in the gate's output (two [tokens, ffn]
        alive, not four)."""
        if self.gate_up is not None:
            gate, up = at(self, self.gate_up)(x).chunk(2, dim=-1)
        else:
            gate, up = at(self, self.gate)(x), at(self, self.up)(x)
        return F.silu(gate, inplace=True).mul_(up)

    def join(self, path: str, module: nn.Module) -> None:
        """Put `module`, which computes the outputs of the linears layout.siblings[path] side by side, at `path` in
        their place (they go): one matmul instead of two or three."""
        siblings = self.layout.siblings[path]
        for sibling in siblings:
            *owner, leaf = split_path(sibling)
            delattr(at(self, tuple(owner)), leaf)
        place(self, path, module)
        if siblings == self.layout.qkv:
            self.qkv = (split_path(path),)
        else:
            self.gate_up = split_path(path)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        y, result = x.new_empty(x.shape[:-1] + (self.attention_width,)), None
        for stage in range(len(self.layout.groups) + 1):
            if stage == self.RESIDUAL:  # the stream goes into the attention's buffer where the widths agree
                y = self.add_attention(x, y, out=y if y.shape == x.shape else torch.empty_like(x))
            result = self.stage(stage, x, y, rope, result)
        return result

    def add_attention(self, x: torch.Tensor, attended: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention: x + out(the attention's output), written into out."""
        return torch.add(x, at(self, self.out)(attended), out=out)

    def stage(self, stage: int, x: torch.Tensor, y: torch.Tensor, rope: Rope,
              previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        if stage == 0:  # q/k/v see norm_1(x)
            return at(self, self.norm_1)(x)
        if stage == 1:  # the output projection sees the heads' attention outputs, kept in y
            normed = at(self, self.norm_1)(x) if previous is None else previous
            y.copy_(self.attend(normed, rope))
            return y
        if stage == 2:  # gate and up see norm_2 of the residual stream after attention, which y holds from here on
            return at(self, self.norm_2)(y)
        if stage == 3:  # down sees up * silu(gate)
            return self.mlp_hidden(at(self, self.norm_2)(y) if previous is None else previous)
        if stage == 4:
            hidden = self.mlp_hidden(at(self, self.norm_2)(y)) if previous is None else previous
            return y + at(self, self.down)(hidden)
        raise ValueError(f"a block has stages 0 to {len(self.layout.groups)}, not {stage}")


def module_path(tensor_name: str) -> str:
    """The module holding a tensor: `model.norm.weight` -> `model.norm`."""
    return tensor_name.rpartition(".")[0]


class QwenForCausalLM(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.layout = layout = layout_of(config)
        h = config.hidden_size
        place(self, module_path(layout.embedding), nn.Embedding(config.vocab_size, h))
        place(self, layout.blocks, nn.ModuleList(Block(config, layout) for _ in range(config.num_hidden_layers)))
        place(self, module_path(layout.final_norm), RMSNorm(h, config.layer_norm_epsilon))
        place(self, module_path(layout.lm_head), nn.Linear(h, config.vocab_size, bias=False))
        self.embedding_path, self.blocks_path, self.final_norm_path = (
            split_path(module_path(layout.embedding)), split_path(layout.blocks),
            split_path(module_path(layout.final_norm)))
        if config.tie_word_embeddings:  # one Parameter: loading fills it once, from the embedding's tensor
            self.lm_head.weight = self.embedding.weight
        self.cache_len = 0  # max length of the preallocated KV cache; 0 = no cache
        self.cache_alpha = 1.0  # dynamic-NTK factor fixed at prefill for the cached keys
        self.cache_rope: Optional[Rope] = None  # rope of the cache's positions 0..cache_len-1, made at setup_cache
        self._compiled_step: Optional[Callable] = None  # compiled_decode_step's, made on first use
        # The ids a tokenizer can give (None: every row); the rows past them are embedding padding, never sampled.
        # The layout's default until loading counts the folder's tokenizer.json.
        self.real_vocab: Optional[int] = layout.real_vocab

    @classmethod
    def from_pretrained(cls, path_or_name, dtype=None, device=None, backend: str = "auto",
                        allow_pickle: bool = False) -> "QwenForCausalLM":
        return load_model(path_or_name, dtype=dtype, device=device, backend=backend, allow_pickle=allow_pickle)

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order: the module at layout.blocks, the path their tensor names start with."""
        return at(self, self.blocks_path)

    @property
    def embedding(self) -> nn.Embedding:
        return at(self, self.embedding_path)

    @property
    def final_norm(self) -> RMSNorm:
        return at(self, self.final_norm_path)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def alpha_for(self, total_len: int) -> float:
        return ntk_alpha(total_len, self.config.seq_length) if self.config.use_dynamic_ntk else 1.0

    def forward(self, input_ids: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                last_only: bool = False, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, vocab_rows] as fp32 ([B, 1, vocab_rows] with last_only, all generation needs: the last
        column's, or with lengths [B] each row's at its last token, column lengths[b] - 1).
        Without input_pos: a whole sequence from position 0, no cache. With input_pos ([T] positions, or [B, T] each
        row's own, after setup_cache): keys and values go into the cache there, and the queries attend over it;
        nothing in this path reads a tensor on the host, so one decode step compiles whole (fullgraph) and captures
        as one CUDA graph."""
        if input_pos is None:
            T = input_ids.shape[1]
            rope = make_rope(self.config, T, self.alpha_for(T), device=input_ids.device)
        else:
            if not self.cache_len:
                raise RuntimeError("input_pos needs a KV cache: call setup_cache first")
            mask = attention_mask(input_pos, self.cache_len, self.config.local_window_size, self.dtype)
            if input_pos.dim() == 2:  # each row's own positions: its mask over every head
                mask = mask[:, None]
            rope = self.cache_rope.at(input_pos, mask)
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x, rope)
        if last_only:
            x = x[:, -1:] if lengths is None else x[torch.arange(x.shape[0], device=x.device), lengths - 1][:, None]
        return self.lm_head(self.final_norm(x)).float()

    def setup_cache(self, batch: int, max_len: int, prompt_len: int) -> None:
        """Preallocate the KV cache (kept while it is large enough) and the rope table of its positions, with the
        dynamic-NTK factor fixed from the prompt, as the original does."""
        self.cache_alpha = self.alpha_for(prompt_len)
        if not (self.cache_len >= max_len and self.blocks[0].attention.cache.k.shape[0] == batch):
            c = self.config
            for block in self.blocks:  # the kv heads only: grouped-query attention reads each for several queries
                block.attention.cache = KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, self.dtype,
                                                self.device)
            self.cache_len = max_len
        # logN scales are kept for every position (ones up to seq_length) so that the table's structure, and with
        # it a compiled step, does not change with the cache's length.
        table = make_rope(self.config, self.cache_len, self.cache_alpha, device=self.device, window_mask=False)
        if self.config.use_logn_attn and table.logn is None:
            table.logn = torch.ones(self.cache_len, device=self.device)
        self.cache_rope = table

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attention.cache = None
        self.cache_len = 0
        self.cache_rope = None

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, stop_ids: Sequence[int] = (), streamer: Optional[Callable] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True,
                 compile: bool = False, attention_mask=None) -> torch.Tensor:
        """Prompt [B, T] (or [T]) -> prompt plus new tokens. Greedy when temperature is 0.

        Prompts of different lengths come left-padded with attention_mask [B, T] (1 = token, 0 = padding, as
        transformers'; through the cache only). Each row's tokens fill the cache from slot 0 at their own positions,
        its padding after them, where causal attention keeps it out and the row's new tokens overwrite it: a row's
        keys lie where they lie alone (left padding in the cache moved them, and attention's sums rounded otherwise).
        So greedy decoding gives a row its tokens alone wherever a linear's rows do not depend on the batch (fp32,
        the Int4 kernels; not the CPU's dense bf16 GEMM, which rounds a row beside others otherwise, padded or not).
        A row whose length takes another dynamic-NTK factor than T's is refused. A row that has produced a stop id
        goes on with stop_ids[0]; the prompts come back as given, padding and all.
        Stops after max_new_tokens or when every row has produced one of stop_ids (the stop token is kept).
        `streamer(tokens)` is called with each new [B] tensor of tokens. use_cache=False recomputes the whole
        sequence at every step (slow; for checking the cache). compile=True runs each step after the prompt through
        one torch.compile'd decode step (decode_step): compiled on first use (seconds to a minute) and again when
        the batch or the cache's length changes, since a step is specialised to the cache's shape (the cache is
        then made in whole multiples of COMPILED_CACHE_STEP positions, so that most lengths share one step).
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        if T == 0:
            raise ValueError("generate needs a prompt of at least one token")
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        out = [ids]
        if compile and not use_cache:
            raise ValueError("generate(compile=True) compiles the cached decode step: it needs use_cache=True")
        lengths, aligned = torch.full((B,), T, device=self.device), ids  # each row's tokens, from column 0
        if attention_mask is not None:
            if not use_cache:
                raise ValueError("generate(attention_mask=...) pads through the KV cache: it needs use_cache=True")
            pad = left_padding(attention_mask, ids)
            self.check_padded_ntk(pad, T)
            lengths, aligned = T - pad, padding_to_the_right(ids, pad)
        if use_cache:
            self.setup_cache(B, cache_length(T + max_new_tokens, compile), T)
            step_logits = self.compiled_decode_step() if compile else self.decode_step
            logits = self(aligned, torch.arange(T, device=self.device), last_only=True, lengths=lengths)[:, -1]
        else:
            logits = self(ids, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            token = self.sample(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, stop[0] if len(stop) else token, token)
            out.append(token[:, None])
            if streamer is not None:
                streamer(token)
            done |= torch.isin(token, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                logits = step_logits(token[:, None], (lengths + step)[:, None])  # each row's next position
            else:
                logits = self(torch.cat(out, dim=1), last_only=True)[:, -1]
        return torch.cat(out, dim=1)

    def check_padded_ntk(self, pad: torch.Tensor, width: int) -> None:
        """A left-padded batch fixes one dynamic-NTK factor, its width's: a row whose own length takes another (a
        prompt past seq_length with use_dynamic_ntk) must be generated apart, or it would compute something else.
        logN needs no such rule: the cache's table scales each row at its own positions."""
        for length in sorted(set((width - pad).tolist())):
            own, padded = self.alpha_for(length), self.alpha_for(width)
            if own != padded:
                raise ValueError(f"a prompt of {length} tokens left-padded to {width} would take dynamic-NTK factor "
                                 f"{padded}, not its own {own} (seq_length {self.config.seq_length}): generate it "
                                 "apart from the longer prompts")

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One step through the cache: tokens [B, 1] at input_pos ([1], or [B, 1] each row's) -> the next logits
        [B, vocab_rows]."""
        return self(token, input_pos)[:, -1]

    def compiled_decode_step(self) -> Callable:
        """decode_step compiled whole (fullgraph: a host read in the cached forward is an error, not a silent graph
        break). On CUDA mode "reduce-overhead" records the step as a CUDA graph, launching every kernel of a step at
        once; on the CPU the default mode fuses the elementwise work between the matmuls. A step is compiled for the
        cache's shape and the blocks' structure (blocks_signature), once each."""
        if self._compiled_step is None:
            options = decode_compile_options(self.device, self.layout.blocks)
            # A copy of the function's code for each model: torch.compile keeps its compiled steps, and its limit of
            # eight, per code object, so models in one process do not share (and exhaust) one list.
            own_code = types.FunctionType(signed_decode_step.__code__.replace(), signed_decode_step.__globals__)
            self._compiled_step = torch.compile(own_code, fullgraph=True, dynamic=False, options=options)
        signature = blocks_signature(self.blocks)
        return lambda token, input_pos: self._compiled_step(self, token, input_pos, signature)

    def sample(self, logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
               generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.real_vocab is not None and logits.shape[-1] > self.real_vocab:  # padding rows are never tokens
            logits = logits.clone()
            logits[:, self.real_vocab:] = float("-inf")
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    def chat(self, tokenizer, query: str, history=None, system: str = "You are a helpful assistant.",
             max_new_tokens: int = 512, **sampling):
        """One ChatML turn: returns (reply, history + [(query, reply)]). Stops at the tokenizer's stop ids
        (<|im_end|>, <|endoftext|>). `system=None` leaves the system turn out. `sampling` goes to generate
        (temperature, top_k, top_p, generator, compile)."""
        from .tokenizer import build_chat_input

        history = list(history or [])
        prompt = build_chat_input(tokenizer, query, history=history, system=system)
        ids = self.generate(prompt, max_new_tokens, stop_ids=tokenizer.stop_ids, **sampling)
        new = ids[0, len(prompt):].tolist()
        new = [t for t in new if t not in tokenizer.stop_ids]
        reply = tokenizer.decode(new)
        return reply, history + [(query, reply)]


COMPILED_CACHE_STEP = 256


def cache_length(tokens: int, compiled: bool) -> int:
    """The KV cache's length for prompt + new tokens: exact when eager, rounded up for a compiled step."""
    return -(-tokens // COMPILED_CACHE_STEP) * COMPILED_CACHE_STEP if compiled else tokens


def blocks_signature(blocks: nn.Module) -> int:
    """A hash of what a compiled decode step assumes about the blocks: every module's type and plain attributes
    (QuantLinear's bits, sizes, kernel group; the heads), every tensor's shape, strides, dtype and device."""
    plain = (int, float, str, bool, type(None))
    modules = tuple((name, type(m).__qualname__, tuple(item for item in sorted(vars(m).items())
                                                       if isinstance(item[1], plain)))
                    for name, m in blocks.named_modules())
    tensors = tuple((name, tuple(t.shape), t.stride(), t.dtype, t.device)
                    for name, t in (*blocks.named_parameters(), *blocks.named_buffers()))
    return hash((modules, tensors))


def decode_compile_options(device: torch.device, blocks: str) -> dict:
    """torch.compile's options for the decode step on `device`, of a model whose blocks are the module at `blocks`."""
    # Rounded as eager rounds (each bf16 / fp16 op's result), so that compiled and eager decoding pick the same
    # tokens; fused kernels would otherwise keep fp32 between ops.
    options = {"emulate_precision_casts": True}
    if device.type == "cuda":  # mode "reduce-overhead", which torch.compile takes only without options
        options.update(torch._inductor.list_mode_options("reduce-overhead"))
    elif device.type == "cpu" and hasattr(torch._inductor.config, "cpp_wrapper_build_separate"):
        # The step's launcher as C++ instead of Python: a step calls some ten kernels a block, and Python's calls
        # were a fifth of a compiled SmolLM2 Int4 step. Built apart from the kernels, the launcher compiles at -O1
        # (one source with the kernels took a minute more at -O3, on the first compile on a machine).
        options.update({"cpp_wrapper": True, "cpp_wrapper_build_separate": True})
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # guard filters came with torch 2.8
        options["guard_filter_fn"] = functools.partial(guards_outside_the_blocks, blocks=blocks)
    return options


def guards_outside_the_blocks(entries, blocks: str = BLOCKS) -> list:
    """torch.compile's guard filter for signed_decode_step: every guard except those on the blocks' modules and
    tensors (the ModuleList at the layout's path `blocks`); the KV caches inside the blocks stay guarded (a new
    batch or length compiles a new step)."""
    inside = f"_modules['{blocks.rsplit('.', 1)[-1]}']._modules["
    return [inside not in entry.name or "cache" in entry.name for entry in entries]


def signed_decode_step(model: "QwenForCausalLM", token: torch.Tensor, input_pos: torch.Tensor,
                       signature: int) -> torch.Tensor:
    """model.decode_step, as compiled_decode_step compiles it. guards_outside_the_blocks leaves out torch.compile's
    own guards on the blocks (about 4,000 on a 30-block model: 1.2 ms of checks a step on a 2-core CPU, an eighth of
    a step); the blocks' signature, computed once per generate call, stands for them: reading the int makes it a
    guard (with dynamic=False an int that the traced code reads is a constant of the graph, checked on each call),
    so blocks that differ from the traced ones get a step of their own instead of a wrong one."""
    if signature is None:
        raise ValueError("signed_decode_step needs the blocks' signature (blocks_signature)")
    return model.decode_step(token, input_pos)


def load_model(path_or_name, dtype=None, device=None, backend: str = "auto",
               allow_pickle: bool = False) -> QwenForCausalLM:
    """A checkpoint folder or published name as a model on `device`: dense, or with QuantLinear layers when the
    config has a quantization_config. dtype None: loading.default_dtype."""
    config, reader = open_checkpoint(path_or_name, allow_pickle=allow_pickle)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    return load_weights(model, reader, dtype, device, backend)


def load_dequantized(path_or_name, dtype=torch.float32, device=None) -> QwenForCausalLM:
    """A quantized checkpoint as a full-precision model, every quantized weight decoded back to dtype."""
    config, reader = open_checkpoint(path_or_name)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    return load_dequantized_weights(model, reader, dtype, device)
