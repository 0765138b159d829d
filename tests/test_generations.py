"""Qwen1.5 / 2 / 2.5 (model_type qwen2) and Qwen3 checkpoints in our runtime, against transformers (a test-only
dependency, the independent reference): logits in fp32 within 1e-4 relative, greedy tokens through our KV cache
(eager and compiled) equal to transformers' generate. Plan and memory read the same folders
(tests/test_families_plan.py checks their figures)."""
import json
import random
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from qwen_quant import QwenForCausalLM
from qwen_quant.config import QwenConfig
from qwen_quant.layout import LAYOUTS, layout_of
from qwen_quant.memory import estimate_memory, memory_report
from qwen_quant.plan import plan_report

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def without_repo_root():
    """transformers imports the HF `kernels` package, which the checkout's own top-level kernels/ folder shadows when
    the checkout's root is on sys.path (`python -m pytest` puts it there: "cannot import name 'CUDAProperties' from
    'kernels' (.../kernels/__init__.py)"). transformers is imported with the root off the path, then it is put
    back."""
    saved_path, saved_kernels = list(sys.path), sys.modules.pop("kernels", None)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        if saved_kernels is not None:
            sys.modules["kernels"] = saved_kernels


with without_repo_root():
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

HF = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

# Random models covering what the later generations add: grouped-query attention, qwen2's q/k/v biases and qwen3's
# attention_bias, a tied and an untied head, a head_dim that is not hidden / heads, rope_theta 1e6 written at the top
# level (transformers 4) or inside rope_parameters (transformers 5), qwen3's q/k norms.
CASES = {
    "qwen2-gqa-untied-top-level-theta": dict(family="qwen2", heads=4, kv_heads=2, head_dim=None, tied=False,
                                             rope="top", bias=False),
    "qwen2-mqa-tied-head-dim-24-rope-parameters": dict(family="qwen2", heads=4, kv_heads=1, head_dim=24, tied=True,
                                                       rope="parameters", bias=False),
    "qwen3-gqa-tied-head-dim-32-rope-parameters": dict(family="qwen3", heads=4, kv_heads=2, head_dim=32, tied=True,
                                                       rope="parameters", bias=False),
    "qwen3-mha-untied-attention-bias-top-level-theta": dict(family="qwen3", heads=4, kv_heads=4, head_dim=None,
                                                            tied=False, rope="top", bias=True),
}


def hf_config(family: str, heads: int, kv_heads: int, head_dim, tied: bool, bias: bool, hidden: int = 64,
              layers: int = 2, vocab: int = 96, ffn: int = 80):
    config_class, _ = HF[family]
    extra = {} if head_dim is None else {"head_dim": head_dim}
    if family == "qwen3":
        extra["attention_bias"] = bias
    return config_class(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                        rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=256, initializer_range=0.3,
                        dtype="float32", **NO_SPECIAL_TOKENS, **extra)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm weights (q/k norms included) and biases away from transformers' init (ones, zeros), so that using them
    wrongly shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def random_pair(request, tmp_path_factory):
    """(transformers' model, ours loaded from its save_pretrained folder) for one CASES entry."""
    case = CASES[request.param]
    torch.manual_seed(sorted(CASES).index(request.param))
    config = hf_config(case["family"], case["heads"], case["kv_heads"], case["head_dim"], case["tied"], case["bias"])
    reference = perturbed(HF[case["family"]][1](config).float(), seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder, safe_serialization=True)
    written = json.loads((folder / "config.json").read_text())
    theta = written.get("rope_theta", written.get("rope_parameters", {}).get("rope_theta"))
    assert theta == 1e6
    if case["rope"] == "top":  # transformers 4's spelling
        written.pop("rope_parameters", None)
        written["rope_theta"] = 1e6
    else:  # transformers 5's
        written.pop("rope_theta", None)
        written["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(written))
    ours = QwenForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return reference, ours, case


def test_random_checkpoints_logits_equal_transformers(random_pair):
    reference, ours, case = random_pair
    ids = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
    got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert ours.config.rotary_emb_base == 1e6
    assert (ours.lm_head.weight is ours.embedding.weight) == case["tied"]


def test_random_checkpoints_greedy_tokens_equal_transformers(random_pair):
    reference, ours, _ = random_pair
    prompt = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    expected = reference.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20)
    assert torch.equal(ours.generate(prompt, 20), expected)
    assert torch.equal(ours.generate(prompt, 20, use_cache=False), expected)


@pytest.mark.parametrize("case", ["qwen2-mqa-tied-head-dim-24-rope-parameters",
                                  "qwen3-gqa-tied-head-dim-32-rope-parameters"])
def test_compiled_decode_greedy_tokens_equal_transformers(case, tmp_path):
    """The compiled decode step (fullgraph) runs the later families too: the cache holds the kv heads only."""
    spec = CASES[case]
    torch.manual_seed(5)
    config = hf_config(spec["family"], spec["heads"], spec["kv_heads"], spec["head_dim"], spec["tied"], spec["bias"])
    reference = perturbed(HF[spec["family"]][1](config).float(), seed=6)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = QwenForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(7))
    expected = reference.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(ours.generate(prompt, 12, compile=True), expected)
    assert ours.blocks[0].attention.cache.k.shape[1] == spec["kv_heads"]


def test_model_state_dict_names_and_shapes_equal_transformers_property():
    """Many random qwen2 / qwen3 shapes (seeded): our model's state_dict names and shapes are transformers' (so
    loading is by name), the head left out where it is tied, as save_pretrained leaves it out."""
    rng = random.Random(0)
    for _ in range(60):
        family = rng.choice(["qwen2", "qwen3"])
        kv_heads = rng.choice([1, 2, 3])
        heads = kv_heads * rng.choice([1, 2, 3])
        head_dim = rng.choice([None, 2 * rng.randint(2, 12)])
        config = hf_config(family, heads, kv_heads, head_dim, tied=rng.random() < 0.5, bias=rng.random() < 0.5,
                           hidden=heads * 2 * rng.randint(2, 6), layers=rng.randint(1, 3), vocab=rng.randint(8, 50),
                           ffn=rng.randint(1, 40))
        with torch.device("meta"):
            reference = HF[family][1](config)
            ours = QwenForCausalLM(QwenConfig.from_dict(config.to_dict()))
        expected = {n: tuple(p.shape) for n, p in reference.state_dict().items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        got = {n: tuple(p.shape) for n, p in ours.named_parameters()}
        assert got == expected, config


def test_smollm2_qwen2_layout_logits_equal_v1_layout_and_transformers(smollm2_dir, smollm2_qwen2_dir):
    """The same GGUF in two layouts computes one function in our runtime; transformers agrees on the qwen2 one."""
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3432, 1789]])
    v1 = QwenForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    qwen2 = QwenForCausalLM.from_pretrained(smollm2_qwen2_dir, dtype=torch.float32)
    assert qwen2.config.num_key_value_heads == 3 and qwen2.config.tie_word_embeddings
    ours = qwen2(ids)
    assert (ours - v1(ids)).abs().max() <= 1e-6 * ours.abs().max()
    with without_repo_root():
        reference = Qwen2ForCausalLM.from_pretrained(smollm2_qwen2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(ids).logits
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    greedy = reference.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=None,
                                pad_token_id=0)
    assert torch.equal(qwen2.generate(ids, 8), greedy)


def qwen2_config_dict(**overrides) -> dict:
    d = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 96, "intermediate_size": 80, "rope_theta": 1e6,
         "rms_norm_eps": 1e-6, "dtype": "float32", "use_sliding_window": False, "sliding_window": 4096,
         "max_window_layers": 28, "bos_token_id": 1}
    d.update(overrides)
    return d


def test_config_reads_the_later_generations_keys():
    config = QwenConfig.from_dict(qwen2_config_dict(model_type="qwen3", head_dim=32, attention_bias=True))
    assert (config.model_type, config.num_key_value_heads, config.head_dim, config.ffn_size) == ("qwen3", 2, 32, 80)
    assert (config.rotary_emb_base, config.layer_norm_epsilon, config.torch_dtype) == (1e6, 1e-6, "float32")
    assert config.attention_bias and not config.use_dynamic_ntk and not config.use_logn_attn
    assert config.extra["bos_token_id"] == 1 and config.extra["sliding_window"] == 4096
    assert layout_of(config) is LAYOUTS["qwen3"]
    # rope_theta inside rope_parameters (transformers 5), the dtype as transformers 4 spells it
    nested = qwen2_config_dict(rope_parameters={"rope_theta": 5e5, "rope_type": "default"}, torch_dtype="bfloat16")
    del nested["rope_theta"], nested["dtype"]
    config = QwenConfig.from_dict(nested)
    assert (config.rotary_emb_base, config.torch_dtype, config.ffn_size) == (5e5, "bfloat16", 80)
    # written back in the family's own spelling, and read back the same
    written = config.to_dict()
    assert written["rms_norm_eps"] == 1e-6 and "layer_norm_epsilon" not in written and "use_logn_attn" not in written
    assert QwenConfig.from_dict(written) == config


@pytest.mark.parametrize("overrides, message", [
    (dict(use_sliding_window=True), "use_sliding_window true is not supported"),
    (dict(use_sliding_window=1), r"use_sliding_window=1 must be true or false"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters rope_type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling rope_type 'dynamic' is not supported"),
    (dict(rope_parameters=[1e6]), "rope_parameters=.* must be a JSON object"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(num_key_value_heads=True), "num_key_value_heads=True must be a positive integer"),
    (dict(head_dim=15), "head dim 15 must be even"),
    (dict(model_type="llama"), "model_type 'llama' is not one of the Qwen generations"),
])
def test_config_refuses_what_the_runtime_does_not_compute(overrides, message):
    with pytest.raises(ValueError, match=message):
        QwenConfig.from_dict(qwen2_config_dict(**overrides), "config.json")


def test_v1_config_keeps_v1_rules():
    """v1's own keys only: a num_key_value_heads key stays in extra, the head dim still times heads is hidden."""
    d = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96,
         "intermediate_size": 160, "num_key_value_heads": 2}
    config = QwenConfig.from_dict(d)
    assert (config.num_key_value_heads, config.ffn_size, config.extra["num_key_value_heads"]) == (4, 80, 2)
    assert "attention_bias" not in config.to_dict() and config.to_dict()["num_key_value_heads"] == 2
    with pytest.raises(ValueError, match="kv_channels 32 x num_attention_heads 4 != hidden_size 64"):
        QwenConfig.from_dict({**d, "kv_channels": 32})


@pytest.fixture()
def qwen2_folder(tmp_path) -> Path:
    torch.manual_seed(8)
    config = hf_config("qwen2", heads=4, kv_heads=2, head_dim=None, tied=True, bias=False)
    HF["qwen2"][1](config).save_pretrained(tmp_path / "qwen2", safe_serialization=True)
    return tmp_path / "qwen2"


def test_plan_and_memory_read_the_later_families(qwen2_folder, capsys):
    """(quantize takes them: tests/test_quantize_families.py)"""
    assert str(qwen2_folder) in plan_report(qwen2_folder, nsamples=4, seqlen=32)
    assert "Peak memory" in memory_report(qwen2_folder)
    assert estimate_memory(QwenConfig.from_file(qwen2_folder), bits=4).total > 0
    for argv in (["plan", str(qwen2_folder), "--nsamples", "4", "--seqlen", "32"], ["memory", str(qwen2_folder)]):
        code, err, _ = run_cli(argv, capsys)
        assert code == 0 and err == "", argv


# quantization_config as Qwen's own Qwen2.5-*-GPTQ-Int4 config.json carries it (optimum's form: no
# quantize_config.json); the keys our runtime does not use are kept as they are.
PUBLISHED_QUANTIZATION_CONFIG = {"batch_size": 1, "bits": 4, "block_name_to_quantize": None, "cache_block_outputs": True,
                                 "damp_percent": 0.01, "dataset": None, "desc_act": False,
                                 "exllama_config": {"version": 1}, "group_size": 32, "max_input_length": None,
                                 "model_seqlen": None, "module_name_preceding_first_block": None,
                                 "modules_in_block_to_quantize": None, "pad_token_id": None, "quant_method": "gptq",
                                 "sym": True, "tokenizer": None, "true_sequential": True, "use_cuda_fp16": False,
                                 "use_exllama": True}


def gptq_folder(folder: Path, family: str, bits: int, desc_act: bool) -> Path:
    """A random model of `family` written as a published GPTQ folder: every block linear RTN-quantized (g32,
    symmetric) into qweight / qzeros / scales / g_idx (shuffled groups with desc_act) and fp16 biases, the rest
    fp16, quantization_config inside config.json."""
    from safetensors.torch import save_file

    from qwen_quant.gptq import rtn_quantize
    from qwen_quant.packing import pack_qweight, pack_qzeros

    torch.manual_seed(11)
    config = hf_config(family, heads=4, kv_heads=2, head_dim=None, tied=family == "qwen3", bias=False, ffn=128)
    reference = perturbed(HF[family][1](config).float(), seed=12)
    reference.save_pretrained(folder, safe_serialization=True)
    ours = QwenConfig.from_file(folder)
    layout = layout_of(ours)
    linears = {layout.block_prefix(i) + path for i in range(ours.num_hidden_layers) for path in layout.linears}
    gen = torch.Generator().manual_seed(13)
    tensors = {}
    for name, tensor in reference.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner not in linears or leaf == "bias":
            tensors[name] = tensor.half().contiguous()
            continue
        q = rtn_quantize(tensor, bits, group_size=32)
        g_idx = q.g_idx
        if desc_act:  # act-order: the inputs' groups in a shuffled order, as GPTQ with desc_act stores them
            order = torch.randperm(tensor.shape[1], generator=gen)
            q = rtn_quantize(tensor[:, order], bits, group_size=32)
            g_idx = torch.empty_like(q.g_idx).index_copy_(0, order, q.g_idx)
            codes = torch.empty_like(q.codes).index_copy_(1, order, q.codes)
        else:
            codes = q.codes
        tensors[owner + ".qweight"] = pack_qweight(codes.t().contiguous(), bits)
        tensors[owner + ".qzeros"] = pack_qzeros(q.zeros, bits)
        tensors[owner + ".scales"] = q.scales.half()
        tensors[owner + ".g_idx"] = g_idx.to(torch.int32)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    written = json.loads((folder / "config.json").read_text())
    written.update(torch_dtype="float16", quantization_config={**PUBLISHED_QUANTIZATION_CONFIG, "bits": bits,
                                                               "desc_act": desc_act})
    (folder / "config.json").write_text(json.dumps(written))
    return folder


@pytest.mark.parametrize("family, bits, desc_act", [("qwen2", 4, False), ("qwen2", 8, True), ("qwen3", 4, True)])
def test_published_gptq_folders_of_the_later_families_run_on_every_backend(tmp_path, family, bits, desc_act):
    """Issue 24 item 5, the format part: a Qwen2.5-GPTQ-style folder (quantization_config in config.json) loads as
    QuantLinear layers on each CPU backend and gives the logits of its weights decoded back to full precision."""
    from qwen_quant.model import load_dequantized
    from qwen_quant.qlinear import QuantLinear

    folder = gptq_folder(tmp_path, family, bits, desc_act)
    ids = torch.randint(0, 96, (1, 19), generator=torch.Generator().manual_seed(14))
    expected = load_dequantized(folder)(ids)
    # What bf16 arithmetic alone costs this model (its weights decoded, run densely in bf16): the cpu kernels'
    # activations are bf16, so that is their yardstick; a misread layout costs orders of magnitude more.
    bf16_error = (load_dequantized(folder, dtype=torch.bfloat16)(ids) - expected).norm() / expected.norm()
    for backend in ("torch", "cpu", "auto"):
        model = QwenForCausalLM.from_pretrained(folder, backend=backend, dtype=torch.float32 if backend == "torch"
                                                else None)
        quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
        # q/k/v and gate/up run as one layer each where they sort their inputs alike: here unless each linear has
        # its own act-order.
        assert len(quantized) == (7 if desc_act else 4) * model.config.num_hidden_layers
        error = (model(ids) - expected).norm() / expected.norm()
        assert error <= (1e-5 if backend == "torch" else 1.5 * bf16_error), backend
