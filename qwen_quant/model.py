"""The Qwen (v1) decoder in plain PyTorch: no transformers, no trust_remote_code.

One block: x = x + c_proj(attn(ln_1(x))); x = x + c_proj(w1(x) * silu(w2(x))) on ln_2(x) -- w2 is the gate.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import REAL_VOCAB, QwenConfig
from .layout import BLOCKS, RESIDUAL_GROUP, TRUE_SEQUENTIAL_GROUPS, linear_shapes
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

    cos: torch.Tensor  # [T, head_dim] fp32
    sin: torch.Tensor
    logn: Optional[torch.Tensor]  # [T] fp32 query scale, or None when every factor is 1
    positions: torch.Tensor  # [T] absolute positions of the queries
    use_cache: bool = False  # write keys/values into the preallocated cache and attend over it


def make_rope(config: QwenConfig, positions: torch.Tensor, alpha: float, use_cache: bool = False) -> Rope:
    d = config.head_dim
    base = config.rotary_emb_base * alpha ** (d / (d - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    logn = None
    if config.use_logn_attn and int(positions.max()) + 1 > config.seq_length:
        n = positions.double() + 1
        logn = torch.where(n > config.seq_length, n.log() / math.log(config.seq_length), torch.ones_like(n)).float()
    return Rope(angles.cos(), angles.sin(), logn, positions, use_cache)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dim, in fp32. x: [B, T, H, D]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    cos, sin = rope.cos[:, None, :], rope.sin[:, None, :]
    return (xf * cos).add_(rotated.mul_(sin)).type_as(x)  # in place: two temporaries of x's size, not four


class KVCache(nn.Module):
    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def block_linear(config: QwenConfig, path: str) -> nn.Linear:
    """The dense linear at `path` in a block, shaped as layout.linear_shapes says."""
    k, n, bias = linear_shapes(config)[path]
    return nn.Linear(k, n, bias=bias)


class Attention(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.c_attn = block_linear(config, "attn.c_attn")
        self.c_proj = block_linear(config, "attn.c_proj")
        self.cache: Optional[KVCache] = None

    def mix(self, qkv: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Fused q|k|v [B, T, 3h] -> the heads' attention outputs [B, T, h], before c_proj."""
        B, T, h3 = qkv.shape
        h = h3 // 3
        q, k, v = qkv.split(h, dim=-1)
        q = apply_rope(q.view(B, T, self.heads, self.head_dim), rope)
        k = apply_rope(k.view(B, T, self.heads, self.head_dim), rope)
        if rope.logn is not None:
            q = (q.float() * rope.logn[:, None, None]).type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        if rope.use_cache:
            k, v = self.cache.update(int(rope.positions[0]), k, v)
        window = self.config.local_window_size
        if window is None and (T == 1 or k.shape[2] == T):
            # No past keys (plain causal), or one query at the end of the cache (sees every key): no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(rope.positions, k.shape[2], window))
        return y.transpose(1, 2).reshape(B, T, h)


def attention_mask(query_pos: torch.Tensor, key_len: int, window: Optional[int]) -> torch.Tensor:
    """Boolean [T, key_len] mask (True = attend): causal, optionally limited to the last `window` positions."""
    key_pos = torch.arange(key_len, device=query_pos.device)
    mask = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        mask &= key_pos[None, :] > query_pos[:, None] - window
    return mask


class MLP(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.w1 = block_linear(config, "mlp.w1")  # up
        self.w2 = block_linear(config, "mlp.w2")  # gate
        self.c_proj = block_linear(config, "mlp.c_proj")

    def hidden(self, x):
        """The input of c_proj: up * silu(gate), in place in the gate's output (two [tokens, ffn] alive, not four)."""
        gate = self.w2(x)
        return F.silu(gate, inplace=True).mul_(self.w1(x))


class Block(nn.Module):
    """forward is written as stages, one per true-sequential group of linears (GROUPS), so that quantization can run
    one stage over all its calibration chunks, quantize that group, and then run the next stage, without a second
    description of the block.

    Stage i (0 <= i < len(GROUPS)) returns the input of GROUPS[i]; stage len(GROUPS) returns the block's output. The
    stages before RESIDUAL take x, the block's input [B, T, h], and y, a tensor of the same shape into which stage 1
    writes the attention's output; add_attention then makes the residual stream after attention, and the stages from
    RESIDUAL on read only that stream, as y (x is spent: quantization keeps the stream in x's place). Each stage may
    be given the previous stage's result (`previous`, else it is recomputed): forward passes it on.
    """

    GROUPS = TRUE_SEQUENTIAL_GROUPS
    RESIDUAL = RESIDUAL_GROUP  # the first stage that reads the residual stream (add_attention's output)

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        y, result = torch.empty_like(x), None
        for stage in range(len(self.GROUPS) + 1):
            if stage == self.RESIDUAL:
                self.add_attention(x, y, out=y)
            result = self.stage(stage, x, y, rope, result)
        return result

    def add_attention(self, x: torch.Tensor, attended: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention: x + c_proj(the attention's output), written into out."""
        return torch.add(x, self.attn.c_proj(attended), out=out)

    def stage(self, stage: int, x: torch.Tensor, y: torch.Tensor, rope: Rope,
              previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        if stage == 0:  # c_attn sees ln_1(x)
            return self.ln_1(x)
        if stage == 1:  # c_proj sees the heads' attention outputs, kept in y
            normed = self.ln_1(x) if previous is None else previous
            y.copy_(self.attn.mix(self.attn.c_attn(normed), rope))
            return y
        if stage == 2:  # w1 and w2 see ln_2 of the residual stream after attention, which y holds from here on
            return self.ln_2(y)
        if stage == 3:  # mlp.c_proj sees up * silu(gate)
            return self.mlp.hidden(self.ln_2(y) if previous is None else previous)
        if stage == 4:
            hidden = self.mlp.hidden(self.ln_2(y)) if previous is None else previous
            return y + self.mlp.c_proj(hidden)
        raise ValueError(f"a block has stages 0 to {len(self.GROUPS)}, not {stage}")


class Transformer(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class QwenForCausalLM(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cache_len = 0  # max length of the preallocated KV cache; 0 = no cache
        self.cache_alpha = 1.0  # dynamic-NTK factor fixed at prefill for the cached keys

    @classmethod
    def from_pretrained(cls, path_or_name, dtype=None, device=None, backend: str = "auto",
                        allow_pickle: bool = False) -> "QwenForCausalLM":
        return load_model(path_or_name, dtype=dtype, device=device, backend=backend, allow_pickle=allow_pickle)

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order: the module at layout.BLOCKS, the path their tensor names start with."""
        return self.get_submodule(BLOCKS)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def rope_for(self, positions: torch.Tensor, alpha: Optional[float] = None, use_cache: bool = False) -> Rope:
        if alpha is None:
            alpha = self.alpha_for(int(positions[-1]) + 1)
        return make_rope(self.config, positions, alpha, use_cache)

    def alpha_for(self, total_len: int) -> float:
        return ntk_alpha(total_len, self.config.seq_length) if self.config.use_dynamic_ntk else 1.0

    def forward(self, input_ids: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab_rows] as fp32 ([B, 1, vocab_rows] with last_only, all generation needs).
        Without input_pos: a whole sequence from position 0, no cache."""
        if input_pos is None:
            rope = self.rope_for(torch.arange(input_ids.shape[1], device=input_ids.device))
        else:
            if not self.cache_len:
                raise RuntimeError("input_pos needs a KV cache: call setup_cache first")
            rope = self.rope_for(input_pos, self.cache_alpha, use_cache=True)
        x = self.transformer.wte(input_ids)
        for block in self.blocks:
            x = block(x, rope)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x)).float()

    def setup_cache(self, batch: int, max_len: int, prompt_len: int) -> None:
        """Preallocate the KV cache and fix the dynamic-NTK factor from the prompt, as the original does."""
        self.cache_alpha = self.alpha_for(prompt_len)
        if self.cache_len >= max_len and self.blocks[0].attn.cache.k.shape[0] == batch:
            return
        c = self.config
        for block in self.blocks:
            block.attn.cache = KVCache(batch, c.num_attention_heads, max_len, c.head_dim, self.dtype, self.device)
        self.cache_len = max_len

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None
        self.cache_len = 0

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, stop_ids: Sequence[int] = (), streamer: Optional[Callable] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> torch.Tensor:
        """Prompt [B, T] (or [T]) -> prompt plus new tokens. Greedy when temperature is 0.

        Stops after max_new_tokens or when every row has produced one of stop_ids (the stop token is kept).
        `streamer(tokens)` is called with each new [B] tensor of tokens. use_cache=False recomputes the whole
        sequence at every step (slow; for checking the cache).
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
        if use_cache:
            self.setup_cache(B, T + max_new_tokens, T)
            logits = self(ids, torch.arange(T, device=self.device), last_only=True)[:, -1]
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
                logits = self(token[:, None], torch.tensor([T + step], device=self.device))[:, -1]
            else:
                logits = self(torch.cat(out, dim=1), last_only=True)[:, -1]
        return torch.cat(out, dim=1)

    def sample(self, logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
               generator: Optional[torch.Generator]) -> torch.Tensor:
        if logits.shape[-1] > REAL_VOCAB:  # embedding padding rows are never tokens
            logits = logits.clone()
            logits[:, REAL_VOCAB:] = float("-inf")
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
        (<|im_end|>, <|endoftext|>). `system=None` leaves the system turn out."""
        from .tokenizer import build_chat_input

        history = list(history or [])
        prompt = build_chat_input(tokenizer, query, history=history, system=system)
        ids = self.generate(prompt, max_new_tokens, stop_ids=tokenizer.stop_ids, **sampling)
        new = ids[0, len(prompt):].tolist()
        new = [t for t in new if t not in tokenizer.stop_ids]
        reply = tokenizer.decode(new)
        return reply, history + [(query, reply)]


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
