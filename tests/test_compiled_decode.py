"""generate(compile=True): one decode step compiled whole (fullgraph) gives exactly the tokens of eager decoding.

fullgraph=True turns any host read in the cached forward (int(tensor), .item(), a branch on a tensor's value) into a
compile error, so these tests also keep the cached forward free of them (test_a_host_read_in_the_cached_forward_fails
shows that they would catch one)."""

import pytest
import torch

from qwen_quant import QwenForCausalLM
from qwen_quant.synthetic import save_random_checkpoint
from tiny_model import tiny_config


def same_tokens_eager_and_compiled(model, prompt, new_tokens, **sampling):
    eager = model.generate(prompt, new_tokens, **sampling)
    compiled = model.generate(prompt, new_tokens, compile=True, **sampling)
    assert torch.equal(eager, compiled), (eager[0, prompt.shape[-1]:].tolist(), compiled[0, prompt.shape[-1]:].tolist())
    return compiled


def test_stories_compiled_greedy_equals_eager(stories_dir):
    model = QwenForCausalLM.from_pretrained(stories_dir)
    same_tokens_eager_and_compiled(model, torch.tensor([1]), 64)


@pytest.mark.parametrize("precision, backend", [("fp", "auto"), ("int4", "cpu"), ("int4", "torch")])
def test_smollm2_compiled_greedy_equals_eager(smollm2_two_blocks, precision, backend):
    from qwen_quant.tokenizer import load_tokenizer

    model = QwenForCausalLM.from_pretrained(smollm2_two_blocks / precision, dtype=torch.bfloat16, backend=backend)
    tokenizer = load_tokenizer(smollm2_two_blocks / "fp")
    question = "What is the capital of France?"
    eager = model.chat(tokenizer, question, system=None, max_new_tokens=24)
    assert model.chat(tokenizer, question, system=None, max_new_tokens=24, compile=True) == eager


def tiny_model(tmp_path, **overrides) -> QwenForCausalLM:
    save_random_checkpoint(tmp_path, tiny_config(**overrides))
    return QwenForCausalLM.from_pretrained(tmp_path)


def test_dynamic_ntk_and_logn_past_seq_length(tmp_path):
    """A prompt longer than seq_length (NTK's alpha fixed from it, logN on the prompt) and one that crosses seq_length
    while decoding (logN switched on per position by the cached table)."""
    model = tiny_model(tmp_path, seq_length=16, use_dynamic_ntk=True, use_logn_attn=True)
    gen = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(0, 512, (1, 20), generator=gen)
    same_tokens_eager_and_compiled(model, long_prompt, 12)
    assert model.cache_alpha == 3.0
    short_prompt = torch.randint(0, 512, (1, 5), generator=gen)
    same_tokens_eager_and_compiled(model, short_prompt, 27)  # the same cache length: the compiled step is reused
    assert model.cache_alpha == 1.0


def test_logn_from_the_cached_table_equals_recomputing(tmp_path):
    """Without dynamic NTK (whose alpha the cache fixes at prefill while recomputing changes it) the cached, compiled
    decode crossing seq_length equals recomputing the whole sequence each step."""
    model = tiny_model(tmp_path, seq_length=16, use_dynamic_ntk=False, use_logn_attn=True)
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(model.generate(prompt, 27, compile=True), model.generate(prompt, 27, use_cache=False))


def test_local_window(tmp_path):
    model = tiny_model(tmp_path, local_window_size=4)
    prompt = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(6))
    compiled = same_tokens_eager_and_compiled(model, prompt, 10)
    assert torch.equal(compiled, model.generate(prompt, 10, use_cache=False))


def test_sampling_and_stop_ids_through_the_compiled_step(tmp_path):
    model = tiny_model(tmp_path)
    prompt = torch.tensor([[3, 4, 5]])
    sampled = [model.generate(prompt, 12, temperature=0.8, top_k=20, top_p=0.9, compile=compiled,
                              generator=torch.Generator().manual_seed(7)) for compiled in (False, True)]
    assert torch.equal(*sampled)
    stop = int(model.generate(prompt, 12)[0, 6])
    stopped = model.generate(prompt, 12, stop_ids=[stop], compile=True)
    assert stopped[0, -1] == stop and stopped.shape[1] <= 7


def test_one_compiled_step_serves_every_call_with_the_same_cache(tmp_path):
    from torch._dynamo.utils import counters

    model = tiny_model(tmp_path)
    prompt = torch.tensor([[3, 4, 5]])
    model.generate(prompt, 10, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    model.generate(torch.tensor([[7, 8]]), 11, compile=True)  # fits the cache made for 3 + 10
    assert counters["stats"]["unique_graphs"] == graphs
    batch = model.generate(torch.tensor([[3, 4, 5], [6, 7, 8]]), 10, compile=True)  # a new batch: a new step
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert torch.equal(batch, model.generate(torch.tensor([[3, 4, 5], [6, 7, 8]]), 10))


def test_a_host_read_in_the_cached_forward_fails(tmp_path, monkeypatch):
    from qwen_quant import model as model_module

    model = tiny_model(tmp_path)
    mix = model_module.Attention.mix

    def mix_reading_a_position(self, qkv, rope):
        if int(rope.positions[0]) >= 0:  # the kind of host read the static step removed
            return mix(self, qkv, rope)
        raise AssertionError("unreachable")

    monkeypatch.setattr(model_module.Attention, "mix", mix_reading_a_position)
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|unsupported"):
        model.generate(torch.tensor([[3, 4]]), 4, compile=True)


def test_compile_needs_the_cache(tmp_path):
    model = tiny_model(tmp_path)
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(torch.tensor([[3, 4]]), 4, compile=True, use_cache=False)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_options_are_accepted_for_each_device(device):
    """torch.compile checks its options when it wraps a function (no GPU needed): CUDA's CUDA graphs come as options,
    since torch.compile refuses a mode beside options."""
    from qwen_quant.model import decode_compile_options

    options = decode_compile_options(torch.device(device), "transformer.h")
    assert options.get("triton.cudagraphs", False) == (device == "cuda")
    # The CPU's step launches its kernels from C++ where torch builds that launcher apart from the kernels (2.8 on).
    separate_build = hasattr(torch._inductor.config, "cpp_wrapper_build_separate")
    assert options.get("cpp_wrapper", False) == (device == "cpu" and separate_build)
    torch.compile(lambda x: x + 1, fullgraph=True, dynamic=False, options=options)
