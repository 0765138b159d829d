"""Hostile and unlucky values (issue 8, the value half): every bad config field, quantized tensor, number, evaluation
input and CLI argument is a clear error naming what is at fault, and the CLI answers it with exit code 2."""
import importlib
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_quant import cli
from qwen_quant.calibration import get_calibration_data
from qwen_quant.config import QuantConfig, QwenConfig
from qwen_quant.evaluate import load_eval_tokens, perplexity
from qwen_quant.gptq import gptq_quantize
from qwen_quant.memory import estimate_memory
from qwen_quant.model import load_dequantized, load_model
from qwen_quant.quantize import quantize
from qwen_quant.synthetic import save_random_checkpoint, save_random_quantized_checkpoint
from cli_runner import run_cli
from tiny_model import tiny_config


@pytest.fixture(scope="module")
def stories_config(stories_dir) -> dict:
    return json.loads((stories_dir / "config.json").read_text())


# --- config.json and quantization_config ------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("layer_norm_epsilon", math.nan), ("layer_norm_epsilon", -1e-6), ("layer_norm_epsilon", 0),
    ("rotary_emb_base", math.nan), ("rotary_emb_base", 0), ("rotary_emb_base", -10000),
    ("local_window_size", 0), ("local_window_size", -4), ("seq_length", 0), ("max_position_embeddings", 0),
    ("use_dynamic_ntk", "false"), ("use_logn_attn", 0), ("no_bias", None), ("tie_word_embeddings", "true"),
    ("hidden_size", "64"), ("num_hidden_layers", 5.0), ("vocab_size", True), ("kv_channels", 8.5),
])
def test_config_field_of_wrong_type_or_range_is_an_error_naming_file_and_field(stories_config, tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps({**stories_config, field: value}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: invalid Qwen config: {field}="):
        QwenConfig.from_file(tmp_path)


def test_config_json_that_is_not_an_object_is_an_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must be a JSON object of fields, not a list"):
        QwenConfig.from_file(tmp_path)
    code, err, _ = run_cli(["memory", str(tmp_path)], capsys)
    assert code == 2 and "config.json must be a JSON object" in err


def test_precision_flags_given_as_strings_are_an_error(stories_config):
    d = {k: v for k, v in stories_config.items() if k != "torch_dtype"}
    with pytest.raises(ValueError, match="src/config.json: bf16='false' must be true or false"):
        QwenConfig.from_dict({**d, "bf16": "false"}, "src/config.json")  # "false" is truthy: it would pick bf16


@pytest.mark.parametrize("field, value", [
    ("bits", 4.0), ("bits", 5), ("bits", True), ("group_size", 0), ("group_size", -7), ("group_size", "128"),
    ("desc_act", "false"), ("sym", 1), ("static_groups", None), ("true_sequential", "yes"),
    ("damp_percent", math.nan), ("damp_percent", -0.01), ("damp_percent", 1.5), ("damp_percent", "0.01"),
    ("checkpoint_format", "gptq_v3"), ("checkpoint_format", ["gptq"]),
])
def test_quantization_config_field_is_type_and_range_checked(stories_config, field, value):
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False,
             "sym": True, field: value}
    with pytest.raises(ValueError, match=f"m/config.json quantization_config: invalid quantization config: {field}="):
        QwenConfig.from_dict({**stories_config, "quantization_config": quant}, "m/config.json")


def test_quantization_config_that_is_not_an_object_is_an_error(stories_config, capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**stories_config, "quantization_config": [4, 128]}))
    code, err, _ = run_cli(["memory", str(tmp_path)], capsys)
    assert code == 2 and "quantization_config must be a JSON object of fields, not a list" in err


# --- quantized checkpoints that do not match their config -------------------------------------------------------

@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int4")
    return save_random_quantized_checkpoint(folder, tiny_config(), QuantConfig(bits=4, group_size=32))


def altered_copy(src, dst, config_change=None, tensor_change=None):
    """A copy of a single-file checkpoint with its config.json and tensors edited."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if config_change:
        config_change(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_v2_format_declared_on_a_v1_file_is_an_error_naming_the_tensor(int4_checkpoint, tmp_path):
    def declare_v2(config):
        config["quantization_config"]["checkpoint_format"] = "gptq_v2"

    folder = altered_copy(int4_checkpoint, tmp_path / "m", declare_v2)
    for loader in (load_model, load_dequantized):
        with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.qzeros unpacks to zero points \[7\] "
                                             r"with checkpoint_format='gptq_v2'.*sym=true.*be 8: is checkpoint_format"):
            loader(folder)


def test_desc_act_without_g_idx_is_an_error_and_without_desc_act_loads(int4_checkpoint, tmp_path):
    def drop_g_idx(tensors):
        for name in [n for n in tensors if n.endswith(".g_idx")]:
            del tensors[name]

    def declare_desc_act(config):
        config["quantization_config"]["desc_act"] = True

    plain = load_model(altered_copy(int4_checkpoint, tmp_path / "plain", tensor_change=drop_g_idx))
    ids = torch.arange(8)[None]
    torch.testing.assert_close(plain(ids), load_model(int4_checkpoint)(ids))  # g_idx k // group is implied
    folder = altered_copy(int4_checkpoint, tmp_path / "act", declare_desc_act, drop_g_idx)
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.g_idx is missing, but the config says "
                                         "desc_act=true"):
        load_model(folder)


def test_nan_scale_is_an_error_naming_the_tensor(int4_checkpoint, tmp_path):
    def nan_scale(tensors):
        tensors["transformer.h.1.mlp.w2.scales"][0, 3] = math.nan

    folder = altered_copy(int4_checkpoint, tmp_path / "m", tensor_change=nan_scale)
    for loader in (load_model, load_dequantized):
        with pytest.raises(ValueError, match="transformer.h.1.mlp.w2.scales contains NaN or inf"):
            loader(folder)


def test_integer_tensor_for_a_float_weight_is_an_error_at_load_time(int4_checkpoint, tmp_path):
    def int_norm(tensors):
        tensors["transformer.ln_f.weight"] = torch.ones(64, dtype=torch.int32)

    with pytest.raises(ValueError, match="tensor transformer.ln_f.weight has dtype int32, but it is a float weight"):
        load_model(altered_copy(int4_checkpoint, tmp_path / "m", tensor_change=int_norm))


# --- numbers stay finite: fp16 export and damping ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("dense"), tiny_config())


def quantize_altered(src, tmp_path, name, index, value, **kwargs):
    folder = altered_copy(src, tmp_path / "m", tensor_change=lambda t: t[name].view(-1).__setitem__(index, value))
    out = tmp_path / "out"
    calibration = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = dict(bits=4, group_size=32, calibration=calibration, nsamples=2, seqlen=16, progress=False)
    quantize(folder, out, **{**settings, **kwargs})
    return out


@pytest.mark.parametrize("name, value, message", [
    ("lm_head.weight", 1e5, "tensor lm_head.weight has values up to 1e\\+05, beyond the range of fp16"),
    ("transformer.wte.weight", math.nan, "tensor transformer.wte.weight contains NaN or inf"),
    ("transformer.h.1.ln_2.weight", math.nan, "tensor transformer.h.1.ln_2.weight contains NaN or inf"),
    ("transformer.h.0.attn.c_attn.bias", 7e4, "tensor transformer.h.0.attn.c_attn.bias has values up to 7e\\+04"),
])
def test_fp16_export_refuses_values_that_are_not_finite_in_fp16(dense_checkpoint, tmp_path, name, value, message):
    with pytest.raises(ValueError, match=message):
        quantize_altered(dense_checkpoint, tmp_path, name, 3, value, method="rtn")
    assert not (tmp_path / "out").exists()


def test_fp16_conversion_in_place_reuses_the_memory_and_names_the_largest_value_past_the_first_slice():
    from qwen_quant.finite import SLICE_ELEMENTS
    from qwen_quant.quantize import to_fp16

    gen = torch.Generator().manual_seed(0)
    original = (torch.randn(3 * SLICE_ELEMENTS // 1000 + 1, 1000, generator=gen) * 100).to(torch.bfloat16)
    copied = to_fp16(original, "w")
    assert copied.dtype == torch.float16 and torch.equal(copied, original.to(torch.float16))
    assert original.dtype == torch.bfloat16  # the copy left the input alone
    given_up = original.clone()
    converted = to_fp16(given_up, "w", in_place=True)
    assert converted.data_ptr() == given_up.data_ptr() and torch.equal(converted, copied)
    for in_place in (False, True):  # a value beyond fp16 in the second slice, a larger one in the third
        bad = original.clone()
        bad.view(-1)[SLICE_ELEMENTS + 5], bad.view(-1)[2 * SLICE_ELEMENTS + 7] = 1e5, -2e5
        with pytest.raises(ValueError, match=r"tensor w has values up to 1\.997e\+05, beyond the range of fp16"):
            to_fp16(bad, "w", in_place=in_place)


def test_scale_overflow_in_block_0_is_blamed_on_block_0(dense_checkpoint, tmp_path):
    # The scale GPTQ picks for the 1e6 weight depends on the clipping search and refine, so on the machine's
    # arithmetic: the property is a value beyond fp16's range, blamed on block 0's w1 scales, not its digits.
    with pytest.raises(ValueError, match=r"tensor transformer.h.0.mlp.w1.scales has values up to (\S+), beyond the "
                                         r"range of fp16") as e:
        quantize_altered(dense_checkpoint, tmp_path, "transformer.h.0.mlp.w1.weight", 5, 1e6)
    largest = float(re.search(r"values up to (\S+),", str(e.value)).group(1))
    assert largest > torch.finfo(torch.float16).max
    assert "h.1" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_block_output_overflow_is_blamed_on_that_block(dense_checkpoint, tmp_path, monkeypatch):
    # fp16-bounded weights cannot overflow the fp32 compute of the CPU; on CUDA in fp16 they can. Stand in for that:
    # block 0's output holds an inf after its (otherwise normal) quantization.
    module = importlib.import_module("qwen_quant.quantize")  # the package's `quantize` is the function
    original = module.quantize_block

    def overflowing_block(block, prefix, hidden, *args):
        result = original(block, prefix, hidden, *args)
        if prefix == "transformer.h.0.":
            hidden[0, 0, 0] = math.inf
        return result

    monkeypatch.setattr(module, "quantize_block", overflowing_block)
    with pytest.raises(ValueError, match=r"block 0 \(transformer.h.0.\*\) outputs NaN or inf on the calibration "
                                         "inputs: its weights overflow the compute dtype float32"):
        quantize(dense_checkpoint, tmp_path / "out", group_size=32, calibration=torch.randint(0, 512, (2, 16)),
                 nsamples=2, seqlen=16, progress=False)


@pytest.mark.parametrize("damp", [math.nan, math.inf, -0.5, 1.5])
def test_damping_outside_0_1_is_refused_before_the_cholesky_loop(damp, dense_checkpoint, tmp_path, capsys):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"lin: damp_percent must be in \[0, 1\]"):
        gptq_quantize(torch.randn(8, 32), x.t() @ x, 4, 32, damp_percent=damp, name="lin")
    with pytest.raises(ValueError, match=f"invalid quantization config: damp_percent={damp}"):
        quantize(dense_checkpoint, tmp_path / "out", damp_percent=damp, group_size=32,
                 calibration=torch.zeros(1, 8, dtype=int),
                 nsamples=1, seqlen=8, progress=False)
    code, err, _ = run_cli([str(dense_checkpoint), "--damp", str(damp)], capsys)
    assert code == 2 and "argument --damp" in err and "must be a finite number at least 0 and at most 1" in err


def test_hessian_whose_diagonal_overflows_is_an_error_not_a_loop():
    hessian = torch.diag(torch.full((32,), 3e38))  # finite entries, but their mean is not
    with pytest.raises(ValueError, match="lin: the Hessian's diagonal is too large to damp"):
        gptq_quantize(torch.randn(8, 32), hessian, 4, 32, name="lin")


# --- evaluation and calibration token ids -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_model(stories_dir):
    return load_model(stories_dir)


@pytest.mark.parametrize("ids", [np.linspace(0, 500, 300), np.ones(300, dtype=bool), np.ones((10, 30), np.int32)])
def test_npy_of_floats_bools_or_not_1d_is_an_error(tmp_path, ids):
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(ValueError, match="ids.npy must hold a 1-D array of integer token ids"):
        load_eval_tokens(tmp_path / "ids.npy")
    if ids.ndim == 1:
        with pytest.raises(ValueError, match="evaluation token ids must be integers"):
            load_eval_tokens(ids)


def test_npy_header_claiming_more_than_the_file_holds_fails_before_allocating(tmp_path):
    path = tmp_path / "forged.npy"
    with open(path, "wb") as f:  # 7 TiB of int64 claimed, 80 bytes present
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (7 * 2**40 // 8,)})
        f.write(np.arange(10, dtype=np.int64).tobytes())
    message = r"forged.npy: its header claims 962072674304 ids of int64 \(7696581394432 bytes\), but the file holds " \
              r"only 80 bytes"
    with pytest.raises(ValueError, match=message):
        load_eval_tokens(path)
    with pytest.raises(ValueError, match=message):
        get_calibration_data(path, nsamples=1, seqlen=4)


def test_ids_outside_the_vocabulary_are_an_error_naming_range_and_vocabulary(stories_model):
    tokens = torch.arange(0, 600)
    with pytest.raises(ValueError, match=r"ids span \[0, 599\], outside the model's vocabulary of 512 \(ids 0..511\)"):
        perplexity(stories_model, tokens, seqlen=64, progress=False)


@pytest.mark.parametrize("option, value", [("seqlen", 1), ("seqlen", 0), ("seqlen", -5), ("batch_size", 0),
                                           ("max_windows", 0), ("max_windows", -1)])
def test_perplexity_settings_out_of_range_are_errors(stories_model, option, value):
    with pytest.raises(ValueError, match=f"{option} must be at least"):
        perplexity(stories_model, torch.zeros(256, dtype=torch.long), **{"seqlen": 64, option: value},
                   progress=False)


def test_max_windows_evaluates_exactly_the_first_windows(stories_model, stories_dir, tmp_path, capsys):
    tokens = torch.from_numpy(np.load(stories_dir / "eval_ids.npy")[:64 * 5].astype(np.int64))
    first_two = perplexity(stories_model, tokens[:128], seqlen=64, progress=False)
    limited = perplexity(stories_model, tokens, seqlen=64, max_windows=2, progress=False)
    assert (limited.windows, limited.targets, limited.nll) == (2, 2 * 63, pytest.approx(first_two.nll, rel=1e-6))
    sliding = perplexity(stories_model, tokens, seqlen=64, stride=32, max_windows=3, progress=False)
    assert (sliding.windows, sliding.targets) == (3, 63 + 32 + 32)  # each window after the first scores 32 new
    np.save(tmp_path / "ids.npy", tokens.numpy())
    code, _, out = run_cli(["eval", str(stories_dir), "--dataset", str(tmp_path / "ids.npy"), "--seqlen", "64",
                            "--max-windows", "2"], capsys)
    assert code == 0 and f"perplexity {first_two.perplexity:.4f}" in out and "2 windows of 64" in out


# --- memory estimate --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=0), "group_size must be a positive integer or -1"),
    (dict(group_size=-7), "group_size must be a positive integer or -1"),
    (dict(tokens=-5), "tokens must be a positive integer"), (dict(tokens=0), "tokens must be a positive integer"),
])
def test_memory_estimate_refuses_bad_group_size_and_tokens(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(tiny_config(), bits=4, **kwargs)


def test_memory_terms_are_never_negative():
    for group_size in (-1, 32, 48, 4096):
        assert min(estimate_memory(tiny_config(), bits=4, group_size=group_size).terms.values()) >= 0


# --- the command line -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["memory", "Qwen-7B", "--group-size", "-7"], "argument --group-size: -7 must be at least -1"),
    (["memory", "Qwen-7B", "--group-size", "0"], "argument --group-size: 0 is not a group size"),
    (["memory", "Qwen-7B", "--tokens", "-5"], "argument --tokens: -5 must be at least 1"),
    (["eval", "m", "--seqlen", "1"], "argument --seqlen: 1 must be at least 2"),
    (["eval", "m", "--seqlen", "-5"], "argument --seqlen: -5 must be at least 2"),
    (["eval", "m", "--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    (["eval", "m", "--max-windows", "0"], "argument --max-windows: 0 must be at least 1"),
    (["eval", "m", "--max-windows", "-1"], "argument --max-windows: -1 must be at least 1"),
    (["eval", "m", "--stride", "0"], "argument --stride: 0 must be at least 1"),
    (["eval", "m", "--seqlen", "64", "--stride", "65"], "argument --stride: 65 must be at most --seqlen \\(64\\)"),
    (["eval", "m", "--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
    (["m", "--bits", "4.0"], "argument --bits: invalid int value: '4.0'"),
    (["m", "--nsamples", "0"], "argument --nsamples: 0 must be at least 1"),
    (["m", "--seed", "-1"], "argument --seed: -1 must be at least 0"),
    (["m", "--max-shard-size", "nan"], "argument --max-shard-size: nan must be a finite number above 0"),
    (["m", "--asym-calibration", "1.5"], "argument --asym-calibration: 1.5 must be a finite number at least 0 and "
                                         "at most 1"),
    (["m", "--refine-passes", "-1"], "argument --refine-passes: -1 must be at least 0"),
])
def test_cli_refuses_out_of_range_arguments_naming_the_option(argv, message, capsys):
    code, err, _ = run_cli(argv, capsys)
    assert code == 2
    assert re.search(message, err), err


def test_cli_device_cuda_without_cuda_is_a_clear_error(capsys):
    code, err, _ = run_cli(["eval", "m", "--device", "cuda:99"], capsys)
    expected = "this machine has" if torch.cuda.is_available() else "CUDA is not available on this machine"
    assert code == 2 and f"argument --device: cuda:99: {expected}" in err


@pytest.mark.parametrize("error, message", [
    (PermissionError(13, "Permission denied", "/models/out/config.json"),
     "qwen-quantize: error: [Errno 13] Permission denied: '/models/out/config.json'"),
    (MemoryError(), "qwen-quantize: error: out of memory"),
    (KeyError("tensor lm_head.weight is missing"), "qwen-quantize: error: tensor lm_head.weight is missing\n"),
    (ZeroDivisionError("division by zero"),
     "qwen-quantize: error: unexpected ZeroDivisionError: division by zero (run with QWEN_QUANT_DEBUG=1 for the "
     "traceback)"),
])
def test_cli_turns_every_failure_into_one_line_and_exit_code_2(error, message, capsys, monkeypatch):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "run_memory", fail)
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    code, err, _ = run_cli(["memory", "Qwen-7B"], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(type(error)):
        cli.main(["memory", "Qwen-7B"])


def test_group_act_order_with_column_act_order_is_refused_before_any_work(dense_checkpoint, tmp_path, capsys):
    code, err, _ = run_cli([str(dense_checkpoint), "--group-act-order", "--desc-act", "--output",
                            str(tmp_path / "out")], capsys)
    assert code == 2 and "group_act_order orders whole groups" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
