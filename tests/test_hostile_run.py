"""The second hostile pass on a run (issue 22): the pre-flight refuses what the run would refuse before any folder
exists (memory this machine does not have, a seqlen past the model's positions), `qwen-quantize plan` refuses the
same with the same message, a refused or failed run leaves nothing behind but finished blocks to resume, --resume is
keyed by the content each block was made from, and quantize()'s arguments are type-checked before any file is read."""
import importlib
import logging
import math
import random
import re
import shutil

import numpy as np
import pytest
import torch

from qwen_quant.checkpoint import read_safetensors_header
from qwen_quant.plan import plan_report
from qwen_quant.quantize import quantize
from qwen_quant.settings import check_arguments
from qwen_quant.synthetic import save_random_checkpoint
from test_safety_files import Killed, same_checkpoint
from cli_runner import run_cli
from tiny_model import tiny_config

quantize_module = importlib.import_module("qwen_quant.quantize")  # the package's `quantize` is the function
plan_module = importlib.import_module("qwen_quant.plan")
SETTINGS = dict(group_size=32, calibration=torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0)),
                nsamples=2, seqlen=16, progress=False)
CLI_SETTINGS = ["--group-size", "32", "--nsamples", "2", "--seqlen", "16"]


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("dense"), tiny_config())


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(path, np.arange(4096) % 512)
    return path


def listing(folder) -> list:
    """Everything under folder, to show that a refused run left nothing behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def patch_tensor(folder, name: str, change) -> None:
    """Change tensor `name` of folder's model.safetensors in place (its header, dtype and shape stay): change(values)
    edits the float32 values."""
    file = folder / "model.safetensors"
    info = read_safetensors_header(file)[name]
    assert info["dtype"] == "F32"
    begin, end = info["data_offsets"]
    with open(file, "r+b") as f:
        f.seek(info["data_start"] + begin)
        raw = bytearray(f.read(end - begin))
        change(torch.frombuffer(raw, dtype=torch.float32))
        f.seek(info["data_start"] + begin)
        f.write(raw)


def without_numbers(message: str) -> str:
    """A memory refusal without its sizes (the baseline RSS differs from one call to the next)."""
    return re.sub(r"\d+\.\d+ GiB", "N GiB", message)


# Finding 1: a calibration larger than the machine's memory is refused by the plan, before any folder is made.

def test_calibration_larger_than_the_machine_is_refused_before_any_folder(dense_checkpoint, ids_file, tmp_path,
                                                                            capsys):
    code, err, _ = run_cli([str(dense_checkpoint), "--dataset", str(ids_file), "--output", str(tmp_path / "out"),
                            *CLI_SETTINGS, "--nsamples", "1000000000000"], capsys)
    assert code == 2, err
    assert re.search(r"the run \(GPTQ 4-bit g32, 1000000000000 x 16 calibration tokens, float32 on cpu\) needs about "
                     r"[\d.]+ GiB of host memory \(peak RSS\) and this machine has [\d.]+ GiB: lower --nsamples or "
                     r"--seqlen \(the calibration windows take [\d.]+ GiB of it\)", err), err
    assert "alloc" not in err and listing(tmp_path) == []


def test_physical_memory_bounds_quantize_and_plan_alike(dense_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plan_module, "physical_memory_bytes", lambda: 2**20)  # any run needs more than 1 MiB
    with pytest.raises(ValueError, match=r"this machine has 0\.00 GiB: lower --nsamples or --seqlen") as refused:
        quantize(dense_checkpoint, tmp_path / "out", **SETTINGS)
    assert listing(tmp_path) == []
    code, err, out = run_cli(["plan", str(dense_checkpoint), *CLI_SETTINGS], capsys)
    assert code == 2 and out == ""
    assert without_numbers(err) == without_numbers(f"qwen-quantize: error: {refused.value}\n")


# Finding 2: a run refused or failed after its work folder exists removes it (and the folders made for it).

def no_disk(monkeypatch, tmp_path, model):
    monkeypatch.setattr(plan_module, "free_disk_bytes", lambda path: 1000)
    return []


def truncated_tokenizer_json(monkeypatch, tmp_path, model):
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0')
    (tmp_path / "calib.txt").write_text("Once upon a time there was a tiny model. " * 50)
    return ["--dataset", str(tmp_path / "calib.txt")]


def calibration_that_is_not_numpy(monkeypatch, tmp_path, model):
    (tmp_path / "calib.npy").write_bytes(b"not a numpy file at all")
    return ["--dataset", str(tmp_path / "calib.npy")]


def nan_in_block_0(monkeypatch, tmp_path, model):
    patch_tensor(model, "transformer.h.0.mlp.w2.weight", lambda values: values.__setitem__(3, math.nan))
    return []


def nested_output_and_bad_calibration(monkeypatch, tmp_path, model):
    return [*calibration_that_is_not_numpy(monkeypatch, tmp_path, model), "--output", str(tmp_path / "a/b/out")]


def seqlen_past_the_positions(monkeypatch, tmp_path, model):
    return ["--seqlen", "4096"]


@pytest.mark.parametrize("refusal", [no_disk, truncated_tokenizer_json, calibration_that_is_not_numpy, nan_in_block_0,
                                     nested_output_and_bad_calibration, seqlen_past_the_positions])
def test_a_refused_run_leaves_nothing_behind(dense_checkpoint, ids_file, tmp_path, monkeypatch, capsys, refusal):
    model = shutil.copytree(dense_checkpoint, tmp_path / "model")
    args = [str(model), "--output", str(tmp_path / "out"), "--dataset", str(ids_file), *CLI_SETTINGS]
    args += refusal(monkeypatch, tmp_path, model)
    before = listing(tmp_path)
    code, err, _ = run_cli(args, capsys)
    assert code == 2 and err.splitlines()[-1].startswith("qwen-quantize: error: "), err  # after a progress bar
    assert listing(tmp_path) == before


def test_a_failed_run_keeps_finished_blocks_and_folders_it_did_not_make(dense_checkpoint, tmp_path):
    def killed_after_block_0(report):
        raise Killed

    with pytest.raises(Killed):
        quantize(dense_checkpoint, tmp_path / "q", on_block=killed_after_block_0, **SETTINGS)
    kept = listing(tmp_path / "q.partial")
    assert "blocks/block_00000.safetensors" in kept
    with pytest.raises(ValueError, match="fewer than one window"):  # a resume that fails keeps them for the next
        quantize(dense_checkpoint, tmp_path / "q", resume=True, **{**SETTINGS, "calibration": torch.arange(10)})
    assert listing(tmp_path / "q.partial") == kept
    (tmp_path / "r.partial").mkdir()  # an empty work folder from before: not this run's to remove
    with pytest.raises(ValueError, match="fewer than one window"):
        quantize(dense_checkpoint, tmp_path / "r", **{**SETTINGS, "calibration": torch.arange(10)})
    assert (tmp_path / "r.partial").is_dir() and not (tmp_path / "r").exists()


# Finding 3: `qwen-quantize plan` makes quantize()'s checks, with the same message and exit code.

@pytest.mark.parametrize("args", [["--seqlen", "1000000000"], ["--tp", "3"], ["--tp", "8"],
                                  ["--nsamples", "1000000000000"], ["--method", "rtn", "--tp", "3"]])
def test_plan_refuses_what_quantize_refuses_with_the_same_message(dense_checkpoint, ids_file, tmp_path, capsys, args):
    code, plan_err, plan_out = run_cli(["plan", str(dense_checkpoint), *CLI_SETTINGS, *args], capsys)
    assert code == 2 and plan_out == "" and plan_err.startswith("qwen-quantize: error: "), plan_err
    code, run_err, _ = run_cli([str(dense_checkpoint), "--dataset", str(ids_file), "--output", str(tmp_path / "out"),
                                *CLI_SETTINGS, *args], capsys)
    assert code == 2
    assert without_numbers(plan_err) == without_numbers(run_err)
    assert listing(tmp_path) == []


def test_plan_of_settings_the_run_accepts_is_printed(dense_checkpoint, capsys):
    code, err, out = run_cli(["plan", str(dense_checkpoint), *CLI_SETTINGS, "--tp", "2"], capsys)
    assert code == 0, err
    assert "GPTQ 4-bit g32, 2 x 16 calibration tokens" in out and "Peak host memory" in out


# Finding 4: --resume reuses a finished block only when the source content it was made from is unchanged.

@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    """A 3-block checkpoint, and its uninterrupted run (asymmetric calibration and refine on, as by default)."""
    root = tmp_path_factory.mktemp("resume")
    model = save_random_checkpoint(root / "fp", tiny_config(num_hidden_layers=3))
    quantize(model, root / "straight", **SETTINGS)
    return model, root / "straight"


def killed_after(model, out, block: int) -> None:
    def kill(report):
        if report.index == block:
            raise Killed

    with pytest.raises(Killed):
        quantize(model, out, on_block=kill, **SETTINGS)


def test_an_unchanged_resume_gives_the_uninterrupted_bytes(resume_setup, tmp_path, caplog):
    model, straight = resume_setup
    for block in range(3):
        out = tmp_path / f"q{block}"
        killed_after(model, out, block)
        with caplog.at_level(logging.WARNING, logger="qwen_quant"):
            report = quantize(model, out, resume=True, **SETTINGS)
        assert report.resumed_blocks == block + 1 and same_checkpoint(out, straight)
    assert "changed since" not in caplog.text and "damaged" not in caplog.text


def changed_block(name: str):
    """The first block whose output depends on tensor `name` (the embedding feeds block 0), or None (export only)."""
    match = re.match(r"transformer\.h\.(\d+)\.", name)
    return int(match[1]) if match else 0 if name == "transformer.wte.weight" else None


def test_resume_after_a_kill_and_a_changed_weight_equals_a_fresh_run(resume_setup, tmp_path, caplog):
    """Killed after block k, then one source tensor's bytes change (same shape): resuming gives what a fresh run on
    the changed weights gives, reusing the blocks before the first one the change reaches, with a warning naming it."""
    model, straight = resume_setup
    names = sorted(read_safetensors_header(model / "model.safetensors"))
    rng = random.Random(0)
    cases = [(rng.randrange(3), rng.choice(names)) for _ in range(6)]
    cases += [(2, "transformer.wte.weight"), (1, "transformer.h.1.ln_2.weight"), (0, "lm_head.weight")]
    for case, (k, name) in enumerate(cases):
        source = shutil.copytree(model, tmp_path / f"fp{case}")
        out, fresh = tmp_path / f"q{case}", tmp_path / f"fresh{case}"
        killed_after(source, out, k)
        noise = torch.randn(read_safetensors_header(source / "model.safetensors")[name]["shape"],
                            generator=torch.Generator().manual_seed(case)).view(-1)
        patch_tensor(source, name, lambda values: values.add_(0.05 * noise))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qwen_quant"):
            report = quantize(source, out, resume=True, **SETTINGS)
        quantize(source, fresh, **SETTINGS)
        assert same_checkpoint(out, fresh) and not same_checkpoint(fresh, straight), (k, name)
        first = changed_block(name)
        if first is not None and first <= k:
            assert f"the source weights of block {first} or of those before it" in caplog.text, (k, name)
            assert report.resumed_blocks == first, (k, name)
        else:
            assert "changed since" not in caplog.text and report.resumed_blocks == k + 1, (k, name)


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b"\xff\xfe\x00", b"[" * 100_000])
def test_damaged_settings_are_a_warning_and_a_fresh_start(resume_setup, tmp_path, caplog, damage):
    model, straight = resume_setup
    killed_after(model, tmp_path / "q", 1)
    (tmp_path / "q.partial" / "settings.json").write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="qwen_quant"):
        report = quantize(model, tmp_path / "q", resume=True, **SETTINGS)
    assert "settings.json" in caplog.text and "quantized again" in caplog.text
    assert report.resumed_blocks == 0 and same_checkpoint(tmp_path / "q", straight)


# Finding 5: quantize()'s arguments, types before values, each error naming the argument, before any file is read.

KINDS = {"bits": "whole", "group_size": "whole", "nsamples": "whole", "seqlen": "whole", "seed": "whole",
         "refine_passes": "whole", "tp": "whole", "desc_act": "flag", "sym": "flag", "static_groups": "flag",
         "mse": "flag", "resume": "flag", "overwrite": "flag", "input_scaling": "flag", "progress": "flag",
         "group_act_order": "flag", "damp_percent": "number", "asym_calibration": "number",
         "max_shard_bytes": "number"}
WRONG_TYPES = {"whole": [True, 2.0, "2", None, [2], math.nan, 2 + 0j], "number": [True, "0.5", None, [0.5], math.nan,
               math.inf, -math.inf], "flag": [1, 0, "True", None, [True], 2.0, math.nan]}
OUT_OF_RANGE = {"nsamples": [0, -1], "seqlen": [0], "seed": [-1, 2**64], "refine_passes": [-1],
                "damp_percent": [-0.01, 1.5], "asym_calibration": [1.01, -1], "max_shard_bytes": [0, -5, 0.5]}


def wrong_values(name: str) -> list:
    values = WRONG_TYPES[KINDS[name]] + OUT_OF_RANGE.get(name, [])
    return [v for v in values if not (v is None and name in ("tp", "group_act_order"))]  # None: their default


def test_every_argument_of_the_wrong_type_or_range_is_named_before_any_file_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_module, "resolve_model_path", lambda *a: pytest.fail("a file was read"))
    cases = [(name, value) for name in KINDS for value in wrong_values(name)]
    assert len(cases) > 130
    for name, value in cases:
        with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b") as refused:
            quantize(tmp_path / "model", tmp_path / "out", **{"progress": False, name: value})
        assert "is not supported" not in str(refused.value), (name, value)
    assert listing(tmp_path) == []


def test_the_briefs_examples_name_their_argument(tmp_path):
    for kwargs, message in [(dict(tp=2.0), "tp must be a whole number or None, got 2.0"),
                            (dict(tp="2"), "tp must be a whole number or None, got '2'"),
                            (dict(nsamples=2.0), "nsamples must be a whole number >= 1, got 2.0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            quantize(tmp_path / "model", tmp_path / "out", **kwargs)


def test_plan_report_checks_the_same_argument_types():
    for name in ("bits", "group_size", "nsamples", "seqlen", "tp"):
        for value in wrong_values(name):
            with pytest.raises(ValueError, match=rf"\b{name}\b"):
                plan_report(tiny_config(), **{name: value})


def test_valid_arguments_of_every_kind_pass():
    rng = random.Random(0)
    for _ in range(200):
        check_arguments(bits=rng.choice([2, 3, 4, 8]), group_size=rng.choice([-1, 32, 128]),
                        nsamples=rng.randrange(1, 10**6), seqlen=rng.randrange(1, 10**5), seed=rng.randrange(2**64),
                        refine_passes=rng.randrange(5), tp=rng.choice([None, 1, 2, 4, 8]),
                        asym_calibration=rng.choice([0, 1, rng.random()]),
                        max_shard_bytes=rng.choice([1, 4 * 10**9, 1e9 * rng.random() + 1]),
                        group_act_order=rng.choice([None, True, False]),
                        **{flag: rng.random() < 0.5 for flag in ("mse", "resume", "overwrite", "input_scaling",
                                                                 "progress")})
