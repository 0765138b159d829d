import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_quant.cli import main
from qwen_quant.evaluate import perplexity
from qwen_quant.model import QwenForCausalLM, load_dequantized
from qwen_quant.quantize import quantize, summary_table
from qwen_quant.synthetic import save_random_checkpoint
from test_packing import unpack_reference
from tiny_model import tiny_config

FP_PERPLEXITY = 5.667345  # stories260k_qwen model card, 256-token windows


@pytest.fixture(scope="module")
def stories_runs(stories_dir, tmp_path_factory):
    """GPTQ and RTN checkpoints of the real stories260k_qwen, with their perplexities (computed once)."""
    root = tmp_path_factory.mktemp("stories")
    eval_ids = torch.from_numpy(np.load(stories_dir / "eval_ids.npy").astype(np.int64))
    runs = {}
    for bits, method in [(4, "gptq"), (4, "rtn"), (3, "gptq"), (3, "rtn"), (8, "gptq")]:
        out = root / f"{method}{bits}"
        report = quantize(stories_dir, out, bits=bits, group_size=32, calibration=stories_dir / "calib_ids.npy",
                          nsamples=128, seqlen=128, method=method, mse=method == "gptq", progress=False)
        ppl = perplexity(load_dequantized(out), eval_ids, seqlen=256, batch_size=64, progress=False).perplexity
        runs[method, bits] = (out, report, ppl)
    return runs


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_keeps_most_of_rtn_quality(stories_runs, bits):
    gptq_ppl, rtn_ppl = stories_runs["gptq", bits][2], stories_runs["rtn", bits][2]
    assert rtn_ppl > FP_PERPLEXITY
    assert gptq_ppl - FP_PERPLEXITY <= 0.6 * (rtn_ppl - FP_PERPLEXITY), (gptq_ppl, rtn_ppl)


def test_every_linear_beats_rtn_on_its_calibration_inputs(stories_runs):
    for bits in (4, 3):
        layers = stories_runs["gptq", bits][1].layers
        assert len(layers) == 25
        for layer in layers:
            assert layer.tokens == 128 * 128
            assert layer.loss < layer.rtn_loss, layer


def test_int8_is_nearly_lossless(stories_runs):
    assert stories_runs["gptq", 8][2] <= FP_PERPLEXITY * 1.001


def test_exported_layout_is_the_published_one(stories_runs, stories_dir):
    out, report, _ = stories_runs["gptq", 4]
    tensors = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
                  "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
                  "quant_method": "gptq"}
    assert "checkpoint_format" not in qc and config["torch_dtype"] == "float16"
    assert json.loads((out / "quantize_config.json").read_text()) == {k: v for k, v in qc.items()
                                                                       if k != "quant_method"}
    assert (out / "generation_config.json").is_file() and (out / "README.md").is_file()
    for i in range(5):
        for path, (n, k) in {"attn.c_attn": (192, 64), "attn.c_proj": (64, 64), "mlp.w1": (192, 64),
                             "mlp.w2": (192, 64), "mlp.c_proj": (64, 192)}.items():
            p = f"transformer.h.{i}.{path}."
            assert tensors[p + "qweight"].dtype == torch.int32 and tensors[p + "qweight"].shape == (k // 8, n)
            assert tensors[p + "qzeros"].dtype == torch.int32 and tensors[p + "qzeros"].shape == (k // 32, n // 8)
            assert tensors[p + "scales"].dtype == torch.float16 and tensors[p + "scales"].shape == (k // 32, n)
            assert tensors[p + "g_idx"].dtype == torch.int32 and torch.equal(tensors[p + "g_idx"],
                                                                              torch.arange(k, dtype=torch.int32) // 32)
            assert tensors[p + "bias"].dtype == torch.float16 and tensors[p + "bias"].shape == (n,)
            assert (tensors[p + "qzeros"] == 0x77777777).all()
            assert p + "weight" not in tensors
    for name in ("transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight", "transformer.h.0.ln_1.weight"):
        assert tensors[name].dtype == torch.float16
    fp = load_file(stories_dir / "model.safetensors")
    assert torch.equal(tensors["transformer.h.2.attn.c_attn.bias"], fp["transformer.h.2.attn.c_attn.bias"].half())
    assert not tensors["transformer.h.2.mlp.w1.bias"].any()


def test_exported_tensors_unpack_to_the_quantizer_output(stories_dir, tmp_path):
    """Capture what the quantizer returned (given to on_block) and read it back from the files with an independent
    unpacker."""
    results = {}
    for bits, sym, desc_act in [(4, True, True), (3, False, False), (8, True, False), (2, False, True)]:
        out = tmp_path / f"q{bits}{sym}{desc_act}"
        results.clear()
        quantize(stories_dir, out, bits=bits, group_size=32, sym=sym, desc_act=desc_act,
                 calibration=stories_dir / "calib_ids.npy", nsamples=16, seqlen=64, progress=False,
                 on_block=lambda block: results.update(block.results))
        tensors = load_file(out / "model.safetensors")
        fmt = json.loads((out / "config.json").read_text())["quantization_config"].get("checkpoint_format", "gptq")
        assert fmt == ("gptq" if sym else "gptq_v2")
        for name in ("transformer.h.0.attn.c_attn", "transformer.h.4.mlp.c_proj"):
            r = results[name]
            n, k = r.codes.shape
            qweight, qzeros = tensors[name + ".qweight"], tensors[name + ".qzeros"]
            codes = torch.tensor([unpack_reference(qweight[:, col], bits, k) for col in range(n)])  # [N, K]
            assert torch.equal(codes, r.codes.long())
            stored = torch.tensor([unpack_reference(qzeros[g], bits, n) for g in range(qzeros.shape[0])])
            assert torch.equal(stored + (1 if fmt == "gptq" else 0), r.zeros.long())
            assert torch.equal(tensors[name + ".scales"], r.scales.half())
            g_idx = tensors[name + ".g_idx"]
            assert torch.equal(g_idx, r.g_idx)
            counts = torch.bincount(g_idx.long())
            assert (counts == 32).all()  # every group has exactly group_size columns
            if desc_act:
                assert not torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // 32)


# Asymmetric calibration carries the full-precision activations across blocks: a resumed run must carry them too.
@pytest.mark.parametrize("options", [{}, dict(asym_calibration=0.5, input_scaling=True)])
def test_resume_after_a_kill_gives_identical_bytes(tmp_path, options, cpu_bf16):
    model = save_random_checkpoint(tmp_path / "fp", tiny_config(num_hidden_layers=4), dtype=torch.bfloat16)
    calib = torch.randint(0, 512, (4000,), generator=torch.Generator().manual_seed(0)).numpy()
    np.save(tmp_path / "calib.npy", calib)
    # 72 windows of 32 tokens: two forward chunks, the last one shorter (plan.CHUNK_TOKENS, 2048, is 64 windows).
    kwargs = dict(bits=4, group_size=32, calibration=tmp_path / "calib.npy", nsamples=72, seqlen=32, progress=False,
                  **options)
    quantize(model, tmp_path / "straight", **kwargs)

    def killed_after_second_block(block):
        if block.index == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        quantize(model, tmp_path / "resumed", on_block=killed_after_second_block, **kwargs)
    assert not (tmp_path / "resumed").exists()  # nothing that looks like a checkpoint
    assert sorted(p.name for p in (tmp_path / "resumed.partial" / "blocks").glob("*.safetensors")) == \
        ["block_00000.safetensors", "block_00001.safetensors"]
    report = quantize(model, tmp_path / "resumed", resume=True, **kwargs)
    assert report.resumed_blocks == 2
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert not (tmp_path / "resumed.partial").exists()


def test_sharded_output(tmp_path):
    model = save_random_checkpoint(tmp_path / "fp", tiny_config())
    quantize(model, tmp_path / "q", method="rtn", group_size=32, max_shard_bytes=100_000, progress=False)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert load_dequantized(tmp_path / "q")(torch.tensor([[1, 2, 3]])).isfinite().all()


@pytest.fixture
def tiny(tmp_path):
    folder = save_random_checkpoint(tmp_path / "fp", tiny_config(hidden_size=128))
    np.save(tmp_path / "calib.npy", np.arange(5000) % 512)
    return folder, tmp_path / "calib.npy"


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=0), "group size 0 must be positive or -1"),
    (dict(bits=5), "bits=5 is not supported"),
    (dict(nsamples=2, seqlen=4096), "seqlen 4096 exceeds the model's max_position_embeddings 512"),
    (dict(method="awq"), "method 'awq' is not one of"),
    (dict(refine_passes=-1), "refine_passes must be a whole number >= 0, got -1"),
    (dict(refine_passes=1.5), "refine_passes must be a whole number >= 0, got 1.5"),
])
def test_bad_settings(tiny, tmp_path, kwargs, message):
    folder, calib = tiny
    with pytest.raises(ValueError, match=message):
        quantize(folder, tmp_path / "out", calibration=calib, progress=False, **{"nsamples": 4, "seqlen": 32, **kwargs})


def test_calibration_shorter_than_a_window(tiny, tmp_path):
    folder, _ = tiny
    np.save(tmp_path / "short.npy", np.arange(10))
    with pytest.raises(ValueError, match="fewer than one window"):
        quantize(folder, tmp_path / "out", calibration=tmp_path / "short.npy", nsamples=4, seqlen=32, progress=False)


def test_model_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        quantize(tmp_path, tmp_path / "out", progress=False)


def test_nan_in_weight_is_named(tiny, tmp_path):
    folder, calib = tiny
    state = load_file(folder / "model.safetensors")
    state["transformer.h.1.mlp.w2.weight"][3, 4] = float("nan")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.w2"):
        quantize(folder, tmp_path / "out", calibration=calib, nsamples=4, seqlen=32, progress=False)
    assert not (tmp_path / "out").exists()


def test_inf_in_calibration_activations_is_named(tiny, tmp_path):
    folder, calib = tiny
    state = load_file(folder / "model.safetensors")
    state["transformer.h.0.attn.c_attn.bias"][5] = float("inf")
    save_file(state, folder / "model.safetensors")
    # The bias is named itself, as the fp16 export checks it, before c_proj's activations carry the inf on.
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.bias contains NaN or inf"):
        quantize(folder, tmp_path / "out", calibration=calib, nsamples=4, seqlen=32, progress=False)


def test_existing_output_needs_overwrite(tiny, tmp_path):
    folder, calib = tiny
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        quantize(folder, tmp_path / "out", calibration=calib, nsamples=4, seqlen=32, progress=False)
    quantize(folder, tmp_path / "out", calibration=calib, nsamples=4, seqlen=32, progress=False, overwrite=True)
    assert (tmp_path / "out" / "config.json").is_file()


def test_cli_quantizes_and_names_output_like_qwen(tiny, tmp_path, monkeypatch, capsys):
    folder, calib = tiny
    named = tmp_path / "Qwen-Tiny-Chat"
    folder.rename(named)
    monkeypatch.chdir(tmp_path)
    assert main([str(named), "--bits", "8", "--group-size", "32", "--dataset", str(calib), "--nsamples", "4",
                 "--seqlen", "32"]) == 0
    assert (tmp_path / "Qwen-Tiny-Chat-Int8" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "GPTQ loss" in out and "total time" in out and "peak RSS" in out
    assert main([str(named), "--bits", "8", "--group-size", "32", "--dataset", str(calib)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_on_block_reports_each_block_with_its_timings(tiny, tmp_path):
    folder, calib = tiny
    seen = []

    def record(block):
        seen.append((block.index, sorted(block.results), [layer.name for layer in block.layers]))

    report = quantize(folder, tmp_path / "out", calibration=calib, nsamples=4, seqlen=32, progress=False,
                      on_block=record)
    linears = ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"]
    assert seen == [(i, sorted(f"transformer.h.{i}.{p}" for p in linears), [f"transformer.h.{i}.{p}" for p in linears])
                    for i in range(2)]
    assert [b.index for b in report.blocks] == [0, 1] and report.layers == report.blocks[0].layers + report.blocks[1].layers
    for b in report.blocks:
        assert min(b.read_s, b.forward_s, b.hessian_s, b.gptq_s, b.write_s, b.cpu_s) > 0 and not b.resumed
        assert b.seconds >= b.read_s + b.forward_s + b.hessian_s + b.gptq_s + b.write_s
        assert b.results == {}  # the tensors were for the callback only
    assert report.calibration_s > 0 and report.export_s > 0
    assert report.seconds >= sum(b.seconds for b in report.blocks) + report.calibration_s + report.export_s


def test_group_act_order_is_the_default_where_it_applies_and_the_card_says_so(tmp_path):
    model = save_random_checkpoint(tmp_path / "fp", tiny_config(num_hidden_layers=1))
    np.save(tmp_path / "calib.npy", np.arange(2000) % 512)
    kwargs = dict(bits=4, calibration=tmp_path / "calib.npy", nsamples=4, seqlen=32, progress=False)
    for name, options, expected in [("default", {}, True), ("desc_act", dict(desc_act=True), False),
                                    ("per_channel", dict(group_size=-1), False),
                                    ("off", dict(group_act_order=False), False)]:
        report = quantize(model, tmp_path / name, **{"group_size": 32, **options}, **kwargs)
        assert report.settings.group_act_order is expected, name
        assert ("group act-order" in summary_table(report)) is expected
        assert f"| group act-order | {expected} |" in (tmp_path / name / "README.md").read_text()


def test_refine_lowers_every_layers_error_and_the_card_says_how_many_passes(tmp_path):
    model = save_random_checkpoint(tmp_path / "fp", tiny_config(num_hidden_layers=1))
    np.save(tmp_path / "calib.npy", np.arange(2000) % 512)
    kwargs = dict(bits=4, group_size=32, calibration=tmp_path / "calib.npy", nsamples=4, seqlen=32, progress=False,
                  asym_calibration=0)  # the same inputs for both runs, so their layers can be compared one by one
    plain = quantize(model, tmp_path / "plain", refine_passes=0, **kwargs)
    refined = quantize(model, tmp_path / "refined", **kwargs)
    assert refined.settings.refine_passes == 2 and "2 refine passes" in summary_table(refined)
    assert "refine passes" not in summary_table(plain)
    assert "| refine passes | 2 |" in (tmp_path / "refined" / "README.md").read_text()
    # c_attn sees the same inputs in both runs (the layers after it see the quantized layers before them).
    assert [r.name for r in plain.layers] == [r.name for r in refined.layers]
    assert plain.layers[0].name.endswith("attn.c_attn") and refined.layers[0].loss < plain.layers[0].loss
    assert np.mean([a.loss / b.loss for a, b in zip(refined.layers, plain.layers)]) < 1


def test_input_scaling_folds_into_the_norms_without_changing_the_function(stories_dir, tmp_path):
    """At 8 bits the rounding is nearly lossless, so a wrong fold (scales not undone in ln_1 / ln_2) would show."""
    ids = torch.from_numpy(np.load(stories_dir / "eval_ids.npy").astype(np.int64))[:8192]
    fp = perplexity(QwenForCausalLM.from_pretrained(stories_dir), ids, seqlen=256, batch_size=32, progress=False).perplexity
    report = quantize(stories_dir, tmp_path / "q", bits=8, group_size=32, calibration=stories_dir / "calib_ids.npy",
                      nsamples=32, seqlen=128, progress=False, input_scaling=True)
    assert report.settings.input_scaling and "input scaling" in summary_table(report)
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    original = load_file(stories_dir / "model.safetensors")
    assert not torch.equal(tensors["transformer.h.0.ln_1.weight"], original["transformer.h.0.ln_1.weight"].half())
    quantized = perplexity(load_dequantized(tmp_path / "q"), ids, seqlen=256, batch_size=32, progress=False)
    assert quantized.perplexity == pytest.approx(fp, rel=2e-3)
