"""One query's attention over the KV cache on the CPU: qwen_quant::one_query_attention (cpu_attention.cpp), which
decoding uses wherever it runs (Attention.mix): it reads the cache in its own dtype at the positions the mask lets
through, in fp32, so its result does not depend on the cache's length (an eager step's exact one, a compiled step's
rounded up to 256 positions).

Built with our other native kernels (qwen_quant.cpu_native), then checked once against torch's attention in fp32;
where either fails, `ready()` is False (the check with a warning) and decoding runs torch's attention.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from qwen_quant import cpu_native

CACHE_DTYPES = (torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def ready() -> bool:
    """Whether the operator is built and agrees with torch's attention here."""
    return cpu_native.checked(_self_check, "one-query attention", "decoding runs torch's attention instead") is not None


def serves(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether decoding on `device` with a cache of `dtype` and heads of `head_dim` runs the operator."""
    return device.type == "cpu" and dtype in CACHE_DTYPES and head_dim % 16 == 0 and ready()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, heads, 1, D] over the cache k, v [B, kv heads, L, D] under the additive mask [1, L] (or [B, 1, 1, L]):
    [B, heads, 1, D] in q's dtype."""
    out = torch.ops.qwen_quant.one_query_attention(q[:, :, 0], k, v, mask.reshape(-1, k.shape[2]).float())
    return out[:, :, None]


def _self_check(built) -> Optional[str]:
    """What is wrong with the operator on random heads (grouped-query, two rows with masks of their own, both cache
    dtypes), or None: within 1e-5 of torch's attention in fp32, relative to the values' largest magnitude."""
    gen = torch.Generator().manual_seed(0)
    B, heads, kv_heads, L, D = 2, 4, 2, 40, 32
    q = torch.randn(B, heads, 1, D, generator=gen)
    keys, values = torch.randn(2, B, kv_heads, L, D, generator=gen)
    mask = torch.zeros(B, 1, 1, L)
    mask[0, ..., 30:] = float("-inf")  # row 0 at position 29, row 1 at 39 with its first 5 slots padding
    mask[1, ..., :5] = float("-inf")
    for dtype in CACHE_DTYPES:
        k, v = keys.to(dtype), values.to(dtype)
        expected = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        got = built.one_query_attention(q[:, :, 0], k, v, mask.reshape(B, L))[:, :, None]
        error = (got - expected).abs().max().item()
        if not error <= 1e-5 * values.abs().max().item():
            return f"{dtype} cache: error {error:.3g}"
    return None
