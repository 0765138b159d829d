"""Issue 24's family items outside the runtime: every published dense size of Qwen1.5 / 2 / 2.5 / 3 by name, memory and
plan from the layout (GQA's narrower k/v, biases where the layout has them, q/k norms, a tied head held once), --tp by
vLLM's rules for grouped-query attention, the vocabulary a tokenizer can give, and Qwen's output names."""
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cli_runner import run_cli
from qwen_quant import QwenForCausalLM
from qwen_quant.checkpoint import resolve_model_path
from qwen_quant.config import QwenConfig
from qwen_quant.layout import LAYOUTS, layout_of
from qwen_quant.memory import (EMBEDDING, LINEAR_EXTRAS, LINEAR_WEIGHTS, LM_HEAD, NORMS, TENSOR_TERMS,
                               estimate_memory, measure_loaded_bytes, measure_peak_bytes, memory_report)
from qwen_quant.model import load_dequantized
from qwen_quant.plan import check_settings, plan_quantization, plan_report, quantization_terms
from qwen_quant.published import PUBLISHED, SIZES, find_published
from qwen_quant.quantize import default_output_name, quantize, summary_table
from qwen_quant.tensor_parallel import TP_DEGREES, attention_of, largest_tp, padded_ffn, split_problem
from test_generations import HF, hf_config, perturbed
from tiny_model import tiny_config

NEW_TOKENS = 5
WEIGHT_TERMS = (LINEAR_WEIGHTS, LINEAR_EXTRAS, EMBEDDING, LM_HEAD, NORMS)

# A tied qwen2 model with GQA (q/k/v biases), an untied qwen3 one with an explicit head_dim and attention biases; an
# MLP width of whole groups of 32, as the cpu backend's kernels need.
FAMILIES = {"qwen2": dict(heads=4, kv_heads=2, head_dim=None, tied=True, bias=False, ffn=128),
            "qwen3": dict(heads=4, kv_heads=2, head_dim=32, tied=False, bias=True, ffn=128)}


def save_hf_model(folder: Path, family: str, seed: int, **overrides) -> Path:
    """A random model of the family saved by transformers in fp32, norms and biases away from their init."""
    torch.manual_seed(seed)
    arguments = {**FAMILIES[family], **overrides}
    model = perturbed(HF[family][1](hf_config(family, **arguments)).float(), seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def family_sources(tmp_path_factory) -> dict:
    """family -> a random model of it, saved by transformers."""
    return {family: save_hf_model(tmp_path_factory.mktemp(family) / "fp", family, seed=5) for family in FAMILIES}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_exports(request, family_sources) -> tuple:
    """(full-precision folder, its RTN Int4 g32 export, the export's report) of one family."""
    source = family_sources[request.param]
    report = quantize(source, source.parent / "int4", method="rtn", group_size=32, progress=False)
    return source, source.parent / "int4", report


# Item 1: the published sizes as data.

# The brief's facts (config.json): hidden, layers, heads, kv heads, MLP width, vocab rows, tied, head_dim.
LATER_FACTS = {
    "Qwen1.5-0.5B": (1024, 24, 16, 16, 2816, 151936, True, 64),
    "Qwen1.5-32B": (5120, 64, 40, 8, 27392, 152064, False, 128),
    "Qwen1.5-110B": (8192, 80, 64, 8, 49152, 152064, False, 128),
    "Qwen2-1.5B": (1536, 28, 12, 2, 8960, 151936, True, 128),
    "Qwen2-72B": (8192, 80, 64, 8, 29568, 152064, False, 128),
    "Qwen2.5-0.5B": (896, 24, 14, 2, 4864, 151936, True, 64),
    "Qwen2.5-3B": (2048, 36, 16, 2, 11008, 151936, True, 128),
    "Qwen2.5-14B": (5120, 48, 40, 8, 13824, 152064, False, 128),
    "Qwen2.5-72B": (8192, 80, 64, 8, 29568, 152064, False, 128),
    "Qwen3-0.6B": (1024, 28, 16, 8, 3072, 151936, True, 128),
    "Qwen3-4B": (2560, 36, 32, 8, 9728, 151936, True, 128),
    "Qwen3-32B": (5120, 64, 64, 8, 25600, 151936, False, 128),
}


def test_later_sizes_resolve_with_their_architecture():
    for name, facts in LATER_FACTS.items():
        c = find_published(name).size.config()
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.ffn_size,
                c.vocab_size, c.tie_word_embeddings, c.head_dim) == facts, name
        assert c.rotary_emb_base == 1e6 and not c.use_dynamic_ntk and c.model_type in ("qwen2", "qwen3")
    for name, repo, precision in (("Qwen2.5-7B-Instruct-GPTQ-Int4", "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", "int4"),
                                  ("qwen/qwen2.5-7b-instruct-gptq-int8", "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int8", "int8"),
                                  ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B", "bf16"),
                                  ("Qwen3-8B-Base", "Qwen/Qwen3-8B-Base", "bf16"),
                                  ("Qwen3-0.6B-GPTQ-Int8", "Qwen/Qwen3-0.6B-GPTQ-Int8", "int8"),
                                  ("Qwen1.5-7B-Chat-GPTQ-Int4", "Qwen/Qwen1.5-7B-Chat-GPTQ-Int4", "int4"),
                                  ("Qwen/Qwen1.5-7B-Chat", "Qwen/Qwen1.5-7B-Chat", "bf16"),
                                  ("Qwen-1_8B-Chat-Int4", "Qwen/Qwen-1_8B-Chat-Int4", "int4")):
        model = find_published(name)
        assert (model.repo_id, model.precision) == (repo, precision), name
    assert find_published("Qwen2.5-7B-Chat") is None and find_published("Qwen3-7B") is None
    # Every row makes a valid config of its family; only v1's carry Qwen's published figures.
    for size in PUBLISHED:
        assert size.config().model_type == size.generation.model_type
    assert sorted(SIZES) == ["1.8B", "14B", "72B", "7B"]
    assert all(s.generation.name == "Qwen" for s in SIZES.values())


def test_a_published_later_name_downloads_its_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RuntimeError, match="Qwen/Qwen2.5-7B-Instruct from the Hugging Face Hub"):
        resolve_model_path("Qwen2.5-7B-Instruct")


def test_memory_and_plan_of_published_later_names_print_without_weights(capsys):
    code, err, out = run_cli(["memory", "Qwen2.5-7B-Instruct-GPTQ-Int4"], capsys)
    assert code == 0 and err == ""
    assert out.startswith("Qwen2.5-7B-Instruct-GPTQ-Int4\nPeak memory: Int4 g128")
    assert "no published figure" in out and "All precisions" not in out
    assert "lm_head" in out and "(untied)" in out
    code, err, out = run_cli(["memory", "Qwen3-0.6B"], capsys)
    assert code == 0 and "tied: the embedding's matrix" in out and "q/k norms" in out
    code, err, out = run_cli(["plan", "Qwen/Qwen3-8B", "--nsamples", "4", "--seqlen", "64"], capsys)
    assert code == 0 and err == "" and out.startswith("Qwen3-8B: GPTQ 4-bit g128")
    code, err, _ = run_cli(["plan", "Qwen2.5-7B-Instruct-GPTQ-Int4"], capsys)
    assert code == 2 and "already quantized: plan its full-precision model (Qwen2.5-7B-Instruct)" in err


def test_v1_published_memory_still_compares_with_qwens_figure():
    report = memory_report("Qwen-7B-Chat-Int4")
    assert "Qwen README, A100-80G" in report and "All precisions of Qwen-7B" in report
    assert "no published figure" not in report


# Item 2: memory and plan from the layout.

def loaded_tensor_terms(model) -> dict:
    measured = measure_loaded_bytes(model)
    assert measured.keys() == set(TENSOR_TERMS) | {"total"}, "tensors outside every estimate term"
    return {t: measured[t] for t in TENSOR_TERMS}


def test_memory_counts_the_loaded_dense_model_exactly(family_exports):
    source = family_exports[0]
    model = QwenForCausalLM.from_pretrained(source)
    measure_peak_bytes(model, NEW_TOKENS)  # allocates the KV cache
    estimate = estimate_memory(model.config, tokens=NEW_TOKENS, device="cpu")
    assert loaded_tensor_terms(model) == {t: estimate.terms[t] for t in TENSOR_TERMS}
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied head once
    assert sum(estimate.terms[t] for t in WEIGHT_TERMS) == parameters
    assert (estimate.terms[LM_HEAD] == 0) == model.config.tie_word_embeddings


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_memory_counts_the_loaded_int4_export_exactly(family_exports, backend):
    export = family_exports[1]
    model = QwenForCausalLM.from_pretrained(export, backend=backend)
    measure_peak_bytes(model, NEW_TOKENS)
    quant = model.config.quantization_config
    estimate = estimate_memory(model.config, bits=quant.bits, group_size=quant.group_size, tokens=NEW_TOKENS,
                               device="cpu", sym=quant.sym, desc_act=quant.desc_act, backend=backend)
    assert loaded_tensor_terms(model) == {t: estimate.terms[t] for t in TENSOR_TERMS}


def random_later_config(rng: random.Random) -> QwenConfig:
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 16, 32])
    family = rng.choice(["qwen2", "qwen3"])
    explicit = rng.random() < 0.5  # a head_dim key, or hidden / heads
    return QwenConfig(hidden_size=rng.choice([32, 48, 64, 96]) if explicit else heads * head_dim,
                      num_hidden_layers=rng.randint(1, 3), num_attention_heads=heads, num_key_value_heads=kv_heads,
                      kv_channels=head_dim if explicit else None,
                      vocab_size=rng.randint(50, 300), intermediate_size=rng.choice([40, 64, 96, 136]),
                      tie_word_embeddings=rng.random() < 0.5, attention_bias=rng.random() < 0.5,
                      model_type=family, torch_dtype=rng.choice(["float32", "bfloat16"]), use_dynamic_ntk=False,
                      use_logn_attn=False)


def test_memory_weights_equal_the_models_parameters_for_random_later_configs():
    rng = random.Random(0)
    for _ in range(120):
        config = random_later_config(rng)
        with torch.device("meta"):
            model = QwenForCausalLM(config)
        parameters = sum(p.numel() for p in model.parameters()) * config.dtype.itemsize  # a tied head once
        estimate = estimate_memory(config, tokens=3, device="cpu")
        assert sum(estimate.terms[t] for t in WEIGHT_TERMS) == parameters, config


def test_plan_disk_term_is_the_exports_tensor_bytes(family_exports):
    source, export, _ = family_exports
    config = QwenConfig.from_file(source)
    _, _, disk, _ = quantization_terms(config, 4, 32, 4, 32, "cpu", torch.float32, method="rtn")
    with safe_open(export / "model.safetensors", "pt") as f:
        written = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    assert disk["output checkpoint"] == written


def test_plan_runs_for_later_families(family_exports, capsys):
    source = family_exports[0]
    report = plan_report(source, group_size=32, nsamples=4, seqlen=32)
    assert report.startswith(f"{source}: GPTQ 4-bit g32, 4 x 32 calibration tokens")
    config = QwenConfig.from_file(source)
    for asym in (0.0, 0.25):
        plan = plan_quantization(config, bits=4, group_size=32, nsamples=4, seqlen=32, asym_calibration=asym,
                                 refine_passes=1)
        assert plan.host_memory.total > 0 and plan.disk.total > 0 and plan.seconds > 0
    code, err, out = run_cli(["plan", str(source), "--group-size", "32", "--nsamples", "4", "--seqlen", "32"], capsys)
    assert code == 0 and err == "" and out.startswith(str(source))


# Item 3: --tp for grouped-query attention.

def vllm_accepts(hidden, heads, kv_heads, head_dim, ffn, bits, group_size, tp) -> bool:
    """vLLM's conditions for a qwen2 / qwen3 GPTQ checkpoint, restated literally: heads % tp == 0; kv heads split
    when kv >= tp (kv % tp == 0), else replicated (tp % kv == 0, one kv head per GPU); each GPTQ linear's inputs per
    GPU whole groups (group -1: no check) and whole packed words, its outputs per GPU, part by part, whole words."""
    pack = 32 // math.gcd(32, bits)  # values per packed period of int32 words
    if heads % tp or (kv_heads >= tp and kv_heads % tp) or (kv_heads < tp and tp % kv_heads):
        return False
    q, kv_per_gpu = heads * head_dim // tp, max(kv_heads // tp, 1) * head_dim
    # (inputs per GPU, output parts per GPU): q/k/v (merged), o, gate + up (merged), down
    for inputs, parts in ((hidden, [q, kv_per_gpu, kv_per_gpu]), (heads * head_dim // tp, [hidden]),
                          (hidden, [ffn / tp, ffn / tp]), (ffn / tp, [hidden])):
        if inputs != int(inputs) or any(p != int(p) for p in parts):
            return False
        if group_size != -1 and inputs % group_size:
            return False
        if inputs % pack or any(int(p) % pack for p in parts):
            return False
    return True


def test_tp_rule_follows_vllm_for_random_gqa_shapes():
    rng = random.Random(1)
    verdicts = []
    for _ in range(300):
        kv_heads = rng.choice([1, 2, 3, 4, 8])
        heads = kv_heads * rng.choice([1, 2, 3, 4, 7])
        head_dim = rng.choice([32, 64, 128])
        hidden = rng.choice([heads * head_dim, 64 * rng.randint(1, 40)])
        ffn = rng.randrange(1, 200) * rng.choice([8, 16, 64, 128])
        bits, group = rng.choice([2, 3, 4, 8]), rng.choice([-1, 32, 64, 128])
        layout = LAYOUTS[rng.choice(["qwen2", "qwen3"])]
        for tp in TP_DEGREES:
            problem = split_problem(hidden, heads, ffn, bits, group, tp, kv_heads=kv_heads, head_dim=head_dim,
                                    layout=layout)
            verdicts.append(problem is None)
            assert verdicts[-1] == vllm_accepts(hidden, heads, kv_heads, head_dim, ffn, bits, group, tp), \
                (hidden, heads, kv_heads, head_dim, ffn, bits, group, tp, problem)
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8  # the cases cover both verdicts


def test_72b_mlp_width_is_padded_as_qwens_own_int4():
    config = find_published("Qwen2.5-72B-Instruct").size.config()
    assert padded_ffn(config.ffn_size, 128, 8) == 29696
    out = check_settings(config, "Qwen2.5-72B-Instruct", 4, 128, "gptq", 2048, tp=8)
    assert (out.intermediate_size, out.ffn_size) == (29696, 29696)
    attention = attention_of(config)
    assert largest_tp(config.hidden_size, config.num_attention_heads, 29568, 4, 128, **attention) == 1
    assert largest_tp(config.hidden_size, config.num_attention_heads, 29696, 4, 128, **attention) == 8
    v1 = find_published("Qwen-14B-Chat").size.config()  # v1's intermediate_size stays twice the width
    assert check_settings(v1, "Qwen-14B-Chat", 4, 128, "gptq", 2048, tp=8).intermediate_size == 2 * 14336


@pytest.mark.parametrize("fields, tp, message", [
    (dict(num_attention_heads=9, num_key_value_heads=3, kv_channels=64), 2,
     "--tp 2: the 9 attention heads do not split over 2 GPUs"),  # SmolLM2-135M's heads
    (dict(num_attention_heads=6, num_key_value_heads=3, kv_channels=64), 2,
     "--tp 2: the 3 kv heads do not split over 2 GPUs"),
    (dict(num_attention_heads=12, num_key_value_heads=3, kv_channels=64), 4,
     "--tp 4: the 3 kv heads cannot be replicated evenly over 4 GPUs (4 is no multiple of 3)"),
    (dict(num_attention_heads=8, num_key_value_heads=8, kv_channels=16), 8,
     "--tp 8: heads x head_dim 128 / 8 = 16 inputs per GPU of self_attn.o_proj is not a whole number of groups of 32"),
])
def test_gqa_tp_refusals_name_the_option_and_the_numbers(fields, tp, message):
    config = tiny_config(model_type="qwen2", hidden_size=576, intermediate_size=1536, **fields)
    with pytest.raises(ValueError) as e:
        check_settings(config, "model", 4, 32, "gptq", 64, tp=tp)
    assert str(e.value).startswith(message)


def test_tp_refusal_on_a_later_family_comes_before_any_work(tmp_path, capsys):
    source = save_hf_model(tmp_path / "fp", "qwen2", seed=3, heads=6, kv_heads=3, head_dim=16, hidden=96, ffn=96)
    capsys.readouterr()  # transformers' own output while saving
    out = tmp_path / "out"
    code, err, _ = run_cli([str(source), "--output", str(out), "--method", "rtn", "--group-size", "32", "--tp", "2"],
                           capsys)
    assert code == 2 and err.startswith("qwen-quantize: error: --tp 2: the 3 kv heads do not split over 2 GPUs")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_tp_export_of_a_qwen2_model_equals_the_unpadded_one(tmp_path, kv_heads):
    """kv_heads 2: split over the 2 GPUs; 1: replicated on both (named in the notes)."""
    source = save_hf_model(tmp_path / "fp", "qwen2", seed=4, heads=4, kv_heads=kv_heads, head_dim=None, ffn=96,
                           tied=False)
    plain = quantize(source, tmp_path / "plain", method="rtn", group_size=32, progress=False)
    padded = quantize(source, tmp_path / "tp2", method="rtn", group_size=32, tp=2, progress=False)
    assert json.loads((tmp_path / "tp2" / "config.json").read_text())["intermediate_size"] == 128  # 96 -> 128
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(6))
    want = load_dequantized(tmp_path / "tp2")(ids)
    assert (want - load_dequantized(tmp_path / "plain")(ids)).abs().max() <= 1e-5 * want.abs().max()
    runtime = QwenForCausalLM.from_pretrained(tmp_path / "tp2", backend="torch", dtype=torch.float32)(ids)
    assert (runtime - want).abs().max() <= 1e-3 * want.abs().max()
    line = "the largest degree vLLM accepts for this checkpoint is 2"
    assert line in summary_table(padded) and line not in summary_table(plain)
    replicated = f"on more than {kv_heads} GPUs vLLM replicates the {kv_heads} kv heads"
    assert (replicated in summary_table(padded)) == (kv_heads == 1)
    card = (tmp_path / "tp2" / "README.md").read_text(encoding="utf-8")
    assert line in card and (replicated in card) == (kv_heads == 1)


# Item 4: the vocabulary a tokenizer can give.

def save_tokenizer_json(folder: Path, ordinary: int) -> int:
    """A word-level tokenizer.json of `ordinary` ids and the three ChatML tokens after them; returns its id count."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(ordinary)}, unk_token="w0"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tokenizer.save(str(folder / "tokenizer.json"))
    return ordinary + 3


def test_padding_rows_past_the_tokenizer_are_never_sampled(tmp_path):
    source = save_hf_model(tmp_path / "fp", "qwen2", seed=7, tied=False)  # 96 embedding rows
    assert QwenForCausalLM.from_pretrained(source).real_vocab is None  # no tokenizer: every row may be sampled
    ids = save_tokenizer_json(source, 77)
    model = QwenForCausalLM.from_pretrained(source)
    assert model.real_vocab == ids == 80
    prompt = torch.tensor([[5, 9]])
    with torch.no_grad():  # the padding rows would win the argmax: 5 times the winning row
        model.lm_head.weight[ids:] = 5 * model.lm_head.weight[model(prompt)[0, -1].argmax()]
    assert int(model(prompt)[0, -1].argmax()) >= ids
    assert int(model.generate(prompt, max_new_tokens=8).max()) < ids
    for seed in range(5):
        out = model.generate(prompt, max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.95,
                             generator=torch.Generator().manual_seed(seed))
        assert int(out[:, 2:].max()) < ids
    export = tmp_path / "int4"
    quantize(source, export, method="rtn", group_size=32, progress=False)  # tokenizer.json is copied beside it
    assert QwenForCausalLM.from_pretrained(export).real_vocab == ids
    assert load_dequantized(export).real_vocab == ids


def test_the_tokenizer_file_decides_the_limit_or_names_itself(tmp_path, tiktoken_file):
    source = save_hf_model(tmp_path / "fp", "qwen2", seed=8, tied=False)
    (source / "tokenizer.json").write_bytes(b"\xff not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizers-library tokenizer.json"):
        QwenForCausalLM.from_pretrained(source)
    # Beside qwen.tiktoken a tokenizer.json is a copy or a side file: the tiktoken file's fixed ids decide.
    (source / "qwen.tiktoken").write_bytes(Path(tiktoken_file).read_bytes())
    assert QwenForCausalLM.from_pretrained(source).real_vocab == 151851


def test_v1_keeps_its_tokenizers_limit():
    model = QwenForCausalLM(tiny_config())
    assert model.real_vocab == layout_of(model.config).real_vocab == 151851
    assert layout_of(tiny_config(model_type="qwen3")).real_vocab is None


# Item 5: output names.

def test_default_output_names_follow_qwens_naming(tmp_path, monkeypatch, family_sources):
    v1, qwen2 = LAYOUTS["qwen"], LAYOUTS["qwen2"]
    assert default_output_name("Qwen/Qwen-7B-Chat", tmp_path, 4, v1) == "Qwen-7B-Chat-Int4"
    assert default_output_name("Qwen-1.8B-Chat", tmp_path, 8, v1) == "Qwen-1_8B-Chat-Int8"
    assert default_output_name("Qwen/Qwen2.5-7B-Instruct", tmp_path, 4, qwen2) == "Qwen2.5-7B-Instruct-GPTQ-Int4"
    assert default_output_name("qwen3-8b", tmp_path, 8, LAYOUTS["qwen3"]) == "Qwen3-8B-GPTQ-Int8"
    assert default_output_name(tmp_path / "my-model", tmp_path / "my-model", 4, qwen2) == "my-model-GPTQ-Int4"
    source = family_sources["qwen2"]
    monkeypatch.chdir(tmp_path)
    report = quantize(source, method="rtn", group_size=32, bits=8, progress=False)
    assert report.output == Path(f"{source.name}-GPTQ-Int8") and (tmp_path / f"{source.name}-GPTQ-Int8").is_dir()
