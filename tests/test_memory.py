import pytest
import torch

from qwen_quant import QwenForCausalLM
from qwen_quant.checkpoint import write_shards
from qwen_quant.config import QuantConfig
from qwen_quant.layout import linear_shapes
from qwen_quant.memory import (EMBEDDING, GIB, KV_CACHE, LM_HEAD, TENSOR_TERMS, estimate_memory,
                               estimate_published, measure_loaded_bytes, measure_peak_bytes, memory_report,
                               published_table)
from qwen_quant.packing import pack_qzeros
from qwen_quant.synthetic import random_tensors, save_random_checkpoint
from tiny_model import tiny_config

GROUP = 128
NEW_TOKENS = 5


def small_config():
    # Qwen's proportions at a small scale: ff about 2.5 x hidden, a vocabulary much wider than hidden; every K a
    # multiple of 128 and every N of 16 so that the CPU int4pack / int8pack kernels take the layers, as at full size.
    return tiny_config(hidden_size=256, num_attention_heads=4, intermediate_size=2 * 640, vocab_size=4096,
                       num_hidden_layers=2, seq_length=2048, max_position_embeddings=4096)


def save_quantized_checkpoint(folder, bits: int):
    """A random checkpoint in the layout of Qwen's published Int4 / Int8 files (symmetric, g128, desc_act off)."""
    config = small_config()
    config.torch_dtype = "float16"
    config.quantization_config = QuantConfig(bits=bits, group_size=GROUP)
    folder.mkdir()
    config.save(folder)
    g = torch.Generator().manual_seed(bits)
    quantized = {f"transformer.h.{i}.{name}.weight": (K, N) for i in range(config.num_hidden_layers)
                 for name, (K, N, _) in linear_shapes(config).items()}

    def tensors():
        for name, tensor in random_tensors(config, torch.float16):
            if name.endswith(".bias"):
                continue  # every quantized linear gets its bias below, as in Qwen's files
            if name not in quantized:
                yield name, tensor
                continue
            K, N = quantized[name]
            prefix = name.removesuffix(".weight")
            yield prefix + ".qweight", torch.randint(-2**31, 2**31 - 1, (K * bits // 32, N), dtype=torch.int32,
                                                     generator=g)
            yield prefix + ".qzeros", pack_qzeros(torch.full((K // GROUP, N), 2 ** (bits - 1)), bits)
            yield prefix + ".scales", (torch.rand(K // GROUP, N, generator=g) * 0.01 + 1e-3).half()
            yield prefix + ".g_idx", (torch.arange(K) // GROUP).to(torch.int32)
            yield prefix + ".bias", torch.zeros(N, dtype=torch.float16)

    write_shards(tensors(), folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {None: save_random_checkpoint(root / "bf16", small_config(), dtype=torch.bfloat16),
            8: save_quantized_checkpoint(root / "int8", 8), 4: save_quantized_checkpoint(root / "int4", 4)}


def test_every_published_cell_is_at_most_qwens_figure():
    cells = published_table()
    assert len(cells) == 12
    over = [(c.size, c.precision, round(c.ours_gib, 2), c.published_gib) for c in cells
            if c.ours_gib > c.published_gib]
    assert not over, f"our estimate exceeds the published figure: {over}"


def test_published_gb_are_gib():
    # 72B BF16 weights and KV cache exceed "144.69" in units of 1e9 bytes, so only GiB can hold them.
    tensors = estimate_published("72B", "bf16").tensor_bytes()
    assert tensors > 144.69e9
    assert tensors / GIB <= 144.69


@pytest.mark.parametrize("bits", [None, 8, 4], ids=["bf16", "int8", "int4"])
def test_estimate_matches_cpu_measurement(checkpoints, bits):
    model = QwenForCausalLM.from_pretrained(checkpoints[bits])
    if bits is not None:
        assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"cpu"}
    peak = measure_peak_bytes(model, NEW_TOKENS)
    measured = measure_loaded_bytes(model)
    estimate = estimate_memory(model.config, bits=bits, tokens=NEW_TOKENS, device="cpu")
    assert measured.keys() == set(TENSOR_TERMS) | {"total"}, "tensors outside every estimate term"
    # Every tensor term is exact bytes, the KV cache included (generate allocated it for 1 + NEW_TOKENS positions).
    assert {t: measured[t] for t in TENSOR_TERMS} == {t: estimate.terms[t] for t in TENSOR_TERMS}
    assert measured[KV_CACHE] > 0
    assert peak == measured["total"]
    assert abs(estimate.total / peak - 1) < 0.05


def test_gpu_layout_is_counted_exactly(checkpoints):
    # The Triton backend keeps the tensors it would keep on a GPU; under TRITON_INTERPRET=1 it loads on the CPU, so
    # the GPU accounting is checked tensor by tensor here too.
    model = QwenForCausalLM.from_pretrained(checkpoints[4], backend="triton")
    model.setup_cache(1, 1 + NEW_TOKENS, 1)
    measured = measure_loaded_bytes(model)
    estimate = estimate_memory(model.config, bits=4, tokens=NEW_TOKENS, device="cpu", backend="triton")
    assert {t: measured[t] for t in TENSOR_TERMS} == {t: estimate.terms[t] for t in TENSOR_TERMS}


def test_quantized_linears_keep_only_what_the_kernels_need():
    # Qwen's symmetric g128 files: on a GPU each layer keeps qweight, scales and bias; qzeros and g_idx are dropped.
    config = small_config()
    estimate = estimate_memory(config, bits=4, tokens=NEW_TOKENS, device="cpu", backend="triton")
    L, kept = config.num_hidden_layers, 0
    for K, N, _ in linear_shapes(config).values():
        kept += L * (K * N // 2 + (K // GROUP) * N * 2 + N * 2)  # int4 qweight, activation-dtype scales and bias
    assert estimate.terms["linear weights"] + estimate.terms["scales, zeros, g_idx, biases"] == kept
    assert set(estimate.not_kept) == {"qzeros", "g_idx"}


def test_shared_storage_is_counted_once():
    model = QwenForCausalLM(tiny_config())
    untied = measure_loaded_bytes(model)
    model.lm_head.weight = model.transformer.wte.weight
    tied = measure_loaded_bytes(model)
    assert tied[LM_HEAD] == 0
    assert tied[EMBEDDING] == untied[EMBEDDING]
    assert tied["total"] == untied["total"] - untied[LM_HEAD]


def test_kv_cache_term_follows_the_generated_length():
    config = small_config()
    short, long = (estimate_memory(config, tokens=t, device="cpu").terms[KV_CACHE] for t in (127, 255))
    per_position = 2 * config.num_hidden_layers * config.hidden_size * 4  # k and v, fp32 (the config's dtype)
    assert (short, long) == (128 * per_position, 256 * per_position)


def test_report_shows_the_published_figure_and_our_total():
    report = memory_report("Qwen-7B-Chat", bits=4, tokens=2048)
    ours = estimate_published("7B", "int4").total / GIB
    assert "8.21" in report
    assert f"{ours:.3f} GiB" in report
    assert "Where the saving comes from" in report
    assert "Int4 g128 sym" in report
    # The bits come from a published -Int8 name when not given; a non-published length shows no published figure.
    assert "Int8 g128 sym" in memory_report("Qwen-1.8B-Chat-Int8")
    assert "Qwen README" not in memory_report("Qwen-1.8B-Chat", tokens=100)


def test_report_measures_a_local_folder(checkpoints):
    report = memory_report(checkpoints[8], tokens=NEW_TOKENS, measure=True)
    assert "Int8 g128 sym" in report  # bits and group from the folder's quantization_config
    assert "Measured on cpu" in report and "(+0.00%)" in report
