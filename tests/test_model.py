import json
import math

import numpy as np
import pytest
import torch

from qwen_quant import QwenForCausalLM
from qwen_quant.config import REAL_VOCAB
from qwen_quant.synthetic import save_random_checkpoint
from qwen_quant.tok512 import decode_tok512
from tiny_model import tiny_config


def test_stories_greedy_reproduces_model_card_text(stories_dir):
    model = QwenForCausalLM.from_pretrained(stories_dir)
    assert not model.training
    out = model.generate(torch.tensor([1]), max_new_tokens=256)[0, 1:].tolist()
    card = json.loads((stories_dir / "verification.json").read_text())["b_greedy"]
    assert out[:200] == card["first_200_ids"]
    text = decode_tok512(stories_dir / "tok512.bin", out)
    assert text.rstrip() == card["documented_text"].rstrip()


def test_stories_perplexity_matches_model_card(stories_dir):
    from qwen_quant.evaluate import perplexity

    model = QwenForCausalLM.from_pretrained(stories_dir)
    ids = np.load(stories_dir / "eval_ids.npy").astype(np.int64)
    ppl = perplexity(model, torch.from_numpy(ids), seqlen=256, batch_size=16, progress=False).perplexity
    assert abs(ppl - 5.667345) / 5.667345 < 0.005, ppl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shards", [False, True])
def test_random_checkpoint_cache_matches_recompute(tmp_path, dtype, shards):
    config = tiny_config()
    save_random_checkpoint(tmp_path, config, dtype=dtype, max_shard_bytes=50_000 if shards else 10**9)
    assert (tmp_path / "model.safetensors.index.json").is_file() == shards
    model = QwenForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == dtype
    prompt = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, max_new_tokens=20)
    recomputed = model.generate(prompt, max_new_tokens=20, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert cached.shape == (2, 27)
    logits = model(prompt)
    assert logits.dtype == torch.float32 and logits.shape == (2, 7, config.vocab_size)


def reference_forward(state, config, ids):
    """A straightforward fp64 Qwen v1 forward with Qwen's formulas for dynamic NTK and logN written out."""
    sd = {k: v.double() for k, v in state.items()}
    T, h, H = ids.shape[0], config.hidden_size, config.num_attention_heads
    d, S = h // H, config.seq_length
    # Qwen: context_value = log2(L / seq_length) + 1; alpha = max(2 ** ceil(context_value) - 1, 1)
    alpha = max(2 ** math.ceil(math.log(T / S, 2) + 1) - 1, 1) if config.use_dynamic_ntk else 1
    base = config.rotary_emb_base * alpha ** (d / (d - 2))
    inv_freq = [1.0 / base ** (2 * j / d) for j in range(d // 2)]
    logn = [math.log(i, S) if i > S and config.use_logn_attn else 1.0 for i in range(1, T + 1)]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.layer_norm_epsilon) * w

    def rope(v, pos):  # v: [d]
        out = torch.empty_like(v)
        for j in range(d // 2):
            c, s = math.cos(pos * inv_freq[j]), math.sin(pos * inv_freq[j])
            out[j] = v[j] * c - v[j + d // 2] * s
            out[j + d // 2] = v[j + d // 2] * c + v[j] * s
        return out

    x = sd["transformer.wte.weight"][ids]
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        a = rms(x, sd[p + "ln_1.weight"])
        qkv = a @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        out = torch.zeros(T, h, dtype=torch.float64)
        for head in range(H):
            sl = slice(head * d, head * d + d)
            q = torch.stack([rope(qkv[t, sl], t) * logn[t] for t in range(T)])
            k = torch.stack([rope(qkv[t, h:][sl], t) for t in range(T)])
            v = qkv[:, 2 * h:][:, sl]
            scores = q @ k.T / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            out[:, sl] = scores.softmax(-1) @ v
        x = x + out @ sd[p + "attn.c_proj.weight"].T
        m = rms(x, sd[p + "ln_2.weight"])
        up, gate = m @ sd[p + "mlp.w1.weight"].T, m @ sd[p + "mlp.w2.weight"].T
        x = x + (up * gate * torch.sigmoid(gate)) @ sd[p + "mlp.c_proj.weight"].T
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("length", [16, 40, 70])
def test_long_context_ntk_and_logn_match_reference(tmp_path, length):
    config = tiny_config(seq_length=16, num_attention_heads=2, hidden_size=32, intermediate_size=64)
    save_random_checkpoint(tmp_path, config)
    model = QwenForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, config.vocab_size, (length,), generator=torch.Generator().manual_seed(2))
    state = {n: p.detach() for n, p in model.named_parameters()}
    expected = reference_forward(state, config, ids)
    got = model(ids[None])[0].double()
    assert torch.allclose(got, expected, atol=2e-4, rtol=1e-4), (got - expected).abs().max()
    if length > 16:  # the long-context terms must matter, or this test checks nothing
        config.use_dynamic_ntk = config.use_logn_attn = False
        plain = reference_forward(state, config, ids)
        assert (plain - expected).abs().max() > 1e-2


def test_alpha_fixed_at_prefill_when_generation_passes_seq_length(tmp_path):
    config = tiny_config(seq_length=16)
    save_random_checkpoint(tmp_path, config)
    model = QwenForCausalLM.from_pretrained(tmp_path)
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=30)
    assert model.cache_alpha == 1.0  # the short prompt fixed alpha = 1, as the original does
    model.generate(torch.arange(20)[None], max_new_tokens=2)
    assert model.cache_alpha == 3.0


def test_local_window_attention(tmp_path):
    config = tiny_config()
    save_random_checkpoint(tmp_path, config)
    model = QwenForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    model.config.local_window_size = 4
    windowed = model(ids)
    # The first 4 positions see the same keys either way; later ones lose the distant keys.
    assert torch.allclose(full[:, :4], windowed[:, :4], atol=1e-5)
    assert (full[:, 4:] - windowed[:, 4:]).abs().max() > 1e-3
    # The cache path must apply the same window.
    step = model.generate(ids, max_new_tokens=5)
    recompute = model.generate(ids, max_new_tokens=5, use_cache=False)
    assert torch.equal(step, recompute)


def test_padding_ids_never_generated(tmp_path):
    config = tiny_config(vocab_size=151936, num_hidden_layers=1)
    save_random_checkpoint(tmp_path, config)
    model = QwenForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        model.lm_head.weight[REAL_VOCAB:] = 10.0  # the padding rows would win every argmax
    assert int(model(torch.tensor([[5]]))[0, -1].argmax()) >= REAL_VOCAB
    out = model.generate(torch.tensor([[5]]), max_new_tokens=8)
    assert int(out.max()) < REAL_VOCAB
    out = model.generate(torch.tensor([[5]]), max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9,
                         generator=torch.Generator().manual_seed(0))
    assert int(out.max()) < REAL_VOCAB


def test_sampling_respects_top_k_and_stop(tmp_path):
    config = tiny_config()
    save_random_checkpoint(tmp_path, config)
    model = QwenForCausalLM.from_pretrained(tmp_path)
    prompt = torch.tensor([[3, 4]])
    logits = model(prompt)[0, -1]
    top2 = set(torch.topk(logits, 2).indices.tolist())
    g = torch.Generator().manual_seed(0)
    first = [int(model.generate(prompt, 1, temperature=1.0, top_k=2, generator=g)[0, -1]) for _ in range(20)]
    assert set(first) <= top2
    greedy = model.generate(prompt, 10)
    stop = int(greedy[0, 4])
    seen = []
    stopped = model.generate(prompt, 10, stop_ids=[stop], streamer=lambda t: seen.append(int(t[0])))
    assert stopped[0, -1] == stop and stopped.shape[1] <= 5 and seen == stopped[0, 2:].tolist()



def test_chat_stops_at_im_end_and_keeps_history(tmp_path, tiktoken_file):
    from qwen_quant import QwenTokenizer

    tokenizer = QwenTokenizer.from_pretrained(tiktoken_file)
    save_random_checkpoint(tmp_path, tiny_config(vocab_size=151936, num_hidden_layers=1))
    model = QwenForCausalLM.from_pretrained(tmp_path)
    hello = tokenizer.encode("Hello")[0]
    model.lm_head = torch.nn.Linear(64, 151936)  # fixed logits: whatever comes in, the bias decides
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[hello] = 1.0  # the reply is "Hello" repeated ...
    reply, history = model.chat(tokenizer, "Hi <|im_end|> there", max_new_tokens=3)
    assert reply == "HelloHelloHello" and history == [("Hi <|im_end|> there", reply)]
    with torch.no_grad():
        model.lm_head.bias[tokenizer.im_end_id] = 2.0  # ... until <|im_end|> wins: an empty reply, no marker text
    reply, history = model.chat(tokenizer, "again", history=history)
    assert reply == "" and history[-1] == ("again", "") and len(history) == 2
