"""One query's attention on the CPU (qwen_quant::one_query_attention, qwen_quant/cpu_attention.cpp) against torch's
attention in fp32 on fresh random heads, its independence from the cache's length, inside a compiled function, and
what decoding does where it does not run."""
import logging

import pytest
import torch
import torch.nn.functional as F

from qwen_quant import QwenForCausalLM, cpu_attention, cpu_native
from qwen_quant.model import KVCache, attention_mask
from qwen_quant.synthetic import save_random_checkpoint
from tiny_model import tiny_config

NEG_INF = float("-inf")


def random_heads(B, heads, kv_heads, L, D, cache_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, 1, D, generator=gen)
    k, v = (torch.randn(B, kv_heads, L, D, generator=gen).to(cache_dtype) for _ in range(2))
    return q, k, v


def row_masks(B, L, positions, window=None, padding=None) -> torch.Tensor:
    """[B, 1, 1, L] additive masks as generate builds them: row b at positions[b], its first padding[b] slots not
    attended, optionally only the last `window` positions."""
    mask = attention_mask(torch.tensor(positions)[:, None], L, window)[:, None]
    for b, pad in enumerate(padding or []):
        mask[b, ..., :pad] = NEG_INF
    return mask


CASES = [  # B, heads, kv heads, L, D, row positions, window, padding
    (1, 4, 4, 37, 16, [36], None, None),
    (1, 9, 3, 256, 64, [93], None, None),
    (3, 8, 2, 64, 32, [10, 63, 40], None, [0, 5, 2]),
    (2, 16, 16, 128, 128, [100, 127], 20, None),
]


@pytest.mark.parametrize("B, heads, kv_heads, L, D, positions, window, padding", CASES)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
def test_equals_torchs_attention_in_fp32(B, heads, kv_heads, L, D, positions, window, padding, cache_dtype, q_dtype):
    assert cpu_attention.ready()
    q, k, v = random_heads(B, heads, kv_heads, L, D, cache_dtype, seed=L + D)
    q = q.to(q_dtype)
    mask = row_masks(B, L, positions, window, padding)
    got = cpu_attention.attend(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=kv_heads != heads)
    assert got.dtype == q_dtype and got.shape == (B, heads, 1, D)
    tolerance = 1e-5 if q_dtype == torch.float32 else 2.0**-8
    assert (got.float() - expected).abs().max() <= tolerance * v.float().abs().max()


def test_the_result_does_not_depend_on_the_cache_length():
    """The same heads over a cache of the exact length and over one four times as long, whose extra slots hold other
    numbers under the mask: the same bits (what lets an eager and a compiled step agree)."""
    q, k, v = random_heads(2, 6, 3, 200, 64, torch.bfloat16, seed=1)
    short = row_masks(2, 50, [49, 30], padding=[0, 4])
    long = torch.cat([short, torch.full((2, 1, 1, 150), NEG_INF)], -1)
    assert torch.equal(cpu_attention.attend(q, k[:, :, :50], v[:, :, :50], short), cpu_attention.attend(q, k, v, long))


def test_runs_inside_a_compiled_function():
    q, k, v = random_heads(1, 4, 2, 64, 32, torch.bfloat16, seed=2)
    mask = row_masks(1, 64, [40])
    compiled = torch.compile(cpu_attention.attend, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(q, k, v, mask), cpu_attention.attend(q, k, v, mask))


def test_bad_shapes_are_refused_with_a_message():
    q, k, v = random_heads(1, 4, 2, 16, 32, torch.float32, seed=3)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        torch.ops.qwen_quant.one_query_attention(q[:, :3, 0], k, v, torch.zeros(1, 16))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.qwen_quant.one_query_attention(q[..., 0, :8], k[..., :8], v[..., :8], torch.zeros(1, 16))


def test_which_caches_it_serves():
    assert cpu_attention.serves(torch.device("cpu"), torch.bfloat16, 64)
    assert cpu_attention.serves(torch.device("cpu"), torch.float32, 128)
    assert not cpu_attention.serves(torch.device("cpu"), torch.float16, 64)  # torch's attention then
    assert not cpu_attention.serves(torch.device("cpu"), torch.float32, 8)  # stories260k's heads
    assert not cpu_attention.serves(torch.device("meta"), torch.float32, 64)
    assert KVCache(1, 2, 8, 16, torch.float32, torch.device("cpu")).one_query_op
    assert not KVCache(1, 2, 8, 8, torch.float32, torch.device("cpu")).one_query_op


@pytest.fixture
def fresh_check():
    cpu_native.ops.cache_clear()
    cpu_attention.ready.cache_clear()
    yield
    cpu_native.ops.cache_clear()
    cpu_attention.ready.cache_clear()


def test_without_the_operator_decoding_runs_torchs_attention(fresh_check, tmp_path, monkeypatch, caplog):
    """A failed build or a failed check: a warning, the cache keeps torch's attention, and greedy decoding gives the
    tokens it gives with the operator (a random tiny model, whose logits stand far apart)."""
    assert cpu_attention._self_check(cpu_native.ops()) is None
    save_random_checkpoint(tmp_path, tiny_config())
    model = QwenForCausalLM.from_pretrained(tmp_path)
    prompt = torch.tensor([[3, 4, 5, 6]])
    with_op = model.generate(prompt, 20)
    assert model.blocks[0].attention.cache.one_query_op
    cpu_attention.ready.cache_clear()
    monkeypatch.setattr(cpu_attention, "_self_check", lambda built: "bfloat16 cache: error 1")
    with caplog.at_level(logging.WARNING, logger="qwen_quant"):
        model.clear_cache()
        without = model.generate(prompt, 20)
    assert not model.blocks[0].attention.cache.one_query_op
    assert "disagrees with torch's own results" in caplog.text and "bfloat16 cache: error 1" in caplog.text
    assert torch.equal(with_op, without)
