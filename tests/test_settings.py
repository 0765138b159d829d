"""QuantizeSettings: the method's options, checked once where they are made, and the one value the command line and
the Python API hand to quantize(), the plan, the report, the model card and the resume key."""
import dataclasses
import importlib
import json
import math
import random

import pytest
import torch

from qwen_quant import QuantizeSettings, cli
from qwen_quant.output_folder import SETTINGS_NAME
from qwen_quant.plan import plan_report
from qwen_quant.quantize import quantize, summary_table
from qwen_quant.synthetic import save_random_checkpoint
from cli_runner import run_cli
from tiny_model import tiny_config

quantize_module = importlib.import_module("qwen_quant.quantize")  # the package's `quantize` is the function
plan_module = importlib.import_module("qwen_quant.plan")
FIELDS = [f.name for f in dataclasses.fields(QuantizeSettings)]
# Values of the wrong type or range for each option (calibration sources are the calibration module's to check).
WRONG = {
    "bits": [True, 4.0, "4", None, [4], math.nan, 1, 5, 16, 0, -4],
    "group_size": [True, 32.0, "32", None, [32], 0, -2, -128],
    "nsamples": [True, 2.0, "2", None, 0, -1, math.inf],
    "seqlen": [True, 16.0, "16", None, 0, -5],
    "seed": [True, 1.5, "0", None, -1, 2**64],
    "refine_passes": [True, 1.0, "1", None, -1],
    "tp": [True, 2.0, "2", [2], math.nan],
    "asym_calibration": [True, "0.5", None, [0.5], math.nan, math.inf, -0.1, 1.01],
    "max_shard_bytes": [True, "1e9", None, math.nan, math.inf, 0, -5, 0.5],
    "damp_percent": [True, "0.01", None, math.nan, math.inf, -0.01, 1.5],
    "method": ["GPTQ", "awq", "", None, 1, ["gptq"]],
    **{flag: [1, 0, "True", None, [True], 2.0, math.nan]
       for flag in ("desc_act", "sym", "static_groups", "mse", "input_scaling")},
    "group_act_order": [1, 0, "True", [True], 2.0, math.nan],  # None: its default rule
}


def valid_options(rng: random.Random) -> dict:
    """Random valid options: each option drawn, or left at its default."""
    options = dict(bits=rng.choice([2, 3, 4, 8]), group_size=rng.choice([-1, 32, 64, 128]),
                   desc_act=rng.random() < 0.3, sym=rng.random() < 0.7, damp_percent=rng.choice([0, 1, rng.random()]),
                   static_groups=rng.random() < 0.3, method=rng.choice(["gptq", "rtn"]),
                   calibration=rng.choice(["c4", "wikitext2", "chats.jsonl", "ids.npy"]),
                   nsamples=rng.randrange(1, 10**4), seqlen=rng.randrange(1, 10**5), seed=rng.randrange(2**64),
                   mse=rng.random() < 0.5, tp=rng.choice([None, 1, 2, 4, 8]),
                   asym_calibration=rng.choice([0.0, 1.0, round(rng.random(), 3)]), input_scaling=rng.random() < 0.5,
                   refine_passes=rng.randrange(5), max_shard_bytes=rng.randrange(1, 10) * 10**9)
    ordered = options["group_size"] != -1 and not (options["desc_act"] or options["static_groups"])
    options["group_act_order"] = rng.choice([None, False] + [True] * ordered)
    return {name: value for name, value in options.items() if rng.random() < 0.7}


def refusal(make) -> Exception:
    with pytest.raises((TypeError, ValueError)) as refused:
        make()
    return refused.value


def test_every_bad_option_is_refused_with_the_same_message_by_the_settings_quantize_and_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_module, "resolve_model_path", lambda *a: pytest.fail("a file was read"))
    rng = random.Random(0)
    cases = [(name, value) for name in WRONG for value in WRONG[name]]
    assert len(cases) > 100
    for _ in range(150):
        name, value = rng.choice(cases)
        options = {**valid_options(rng), name: value}
        made = refusal(lambda: QuantizeSettings(**options))
        assert name in str(made) or name.replace("_", " ") in str(made), (name, value, made)
        for make in (lambda: quantize(tmp_path / "model", tmp_path / "out", progress=False, **options),
                     lambda: plan_report(tiny_config(), **options)):
            other = refusal(make)
            assert (type(other), str(other)) == (type(made), str(made)), (name, value)
    assert list(tmp_path.iterdir()) == []


def test_rules_between_options_are_the_settings_and_the_cli_gives_their_message(tmp_path, capsys):
    model = save_random_checkpoint(tmp_path / "fp", tiny_config())
    for argv, options in [(["--group-act-order", "--desc-act"], dict(group_act_order=True, desc_act=True)),
                          (["--group-act-order", "--static-groups"], dict(group_act_order=True, static_groups=True)),
                          (["--group-act-order", "--group-size", "-1"], dict(group_act_order=True, group_size=-1)),
                          (["--max-shard-size", "1e-10"], dict(max_shard_bytes=0))]:
        message = str(refusal(lambda: QuantizeSettings(**options)))
        for command in ([str(model), "--output", str(tmp_path / "out")], ["plan", str(model)]):
            code, err, out = run_cli(command + argv, capsys)
            assert (code, err, out) == (2, f"qwen-quantize: error: {message}\n", ""), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp"]


def test_valid_options_make_valid_settings_with_their_defaults_resolved():
    rng = random.Random(1)
    for _ in range(200):
        options = valid_options(rng)
        settings = QuantizeSettings(**options)
        gptq = settings.method == "gptq"
        assert settings.refine_passes == (options.get("refine_passes", 2) if gptq else 0)
        if options.get("group_act_order") is None:  # the default rule
            assert settings.group_act_order == (gptq and settings.group_size != -1
                                                and not (settings.desc_act or settings.static_groups))
        assert settings.quant_config().checkpoint_format == ("gptq" if settings.sym else "gptq_v2")
        assert QuantizeSettings(**{f: getattr(settings, f) for f in FIELDS}) == settings  # resolved stays resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.bits = 8


def command_line(options: dict) -> list:
    """qwen-quantize's options for these QuantizeSettings options."""
    argv = []
    for name, value in options.items():
        flag = "--" + {"damp_percent": "damp", "calibration": "dataset", "max_shard_bytes": "max_shard_size"}.get(
            name, name).replace("_", "-")
        if name in ("desc_act", "static_groups"):
            argv += [flag] * value
        elif name in ("sym", "mse"):
            argv += [f"--no-{name}"] * (not value)
        elif name in ("group_act_order", "input_scaling"):
            argv += [] if value is None else [flag if value else flag.replace("--", "--no-")]
        elif name == "max_shard_bytes":
            argv += [flag, str(value // 10**9)]
        elif value is not None:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def test_the_cli_and_the_api_build_equal_settings_and_hand_them_to_quantize_and_plan(monkeypatch):
    given = {}
    monkeypatch.setattr(quantize_module, "quantize", lambda model, output, settings, **run: given.update(
        quantize=settings, run=run) or quantize_module.QuantizeReport(output, settings))
    monkeypatch.setattr(quantize_module, "summary_table", lambda report: "")
    monkeypatch.setattr(plan_module, "plan_report", lambda model, settings, device: given.update(plan=settings) or "")
    rng = random.Random(2)
    for _ in range(60):
        options = valid_options(rng)
        expected = QuantizeSettings(**options)
        argv = command_line(options)
        assert cli.main(["model", *argv, "--output", "out"]) == 0
        assert cli.main(["plan", "model", *argv]) == 0
        assert given["quantize"] == expected == given["plan"], argv
        assert given["run"] == dict(device=None, resume=False, overwrite=False, hub=None)


def test_settings_round_trip_through_the_resume_key():
    rng = random.Random(3)
    for _ in range(100):
        settings = QuantizeSettings(**valid_options(rng))
        key = json.loads(json.dumps(settings.key()))
        quant = {k: v for k, v in key.pop("quant").items() if k not in ("true_sequential", "checkpoint_format")}
        rebuilt = QuantizeSettings(**quant, **key, calibration=settings.calibration,
                                   max_shard_bytes=settings.max_shard_bytes)
        assert rebuilt == settings


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_the_report_card_and_work_folder_carry_the_settings_given(method, tmp_path):
    model = save_random_checkpoint(tmp_path / "fp", tiny_config())
    calibration = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = QuantizeSettings(method=method, group_size=32, calibration=calibration, nsamples=2, seqlen=16,
                                refine_passes=1, input_scaling=True)
    report = quantize(model, tmp_path / "q", settings, progress=False)
    assert report.settings is settings
    card = (tmp_path / "q" / "README.md").read_text(encoding="utf-8")
    assert settings.description() in summary_table(report) and settings.description() in card
    assert f"| refine passes | {settings.refine_passes} |" in card and "| input scaling | True |" in card
    assert "| calibration | a torch tensor of token ids (2 x 16 tokens, seed 0) |" in card

    class Killed(Exception):
        pass

    def killed(block):
        raise Killed

    with pytest.raises(Killed):  # the old keyword form builds the same settings
        quantize(model, tmp_path / "k", progress=False, on_block=killed, **{f: getattr(settings, f) for f in FIELDS})
    saved = json.loads((tmp_path / "k.partial" / SETTINGS_NAME).read_text())
    assert {name: saved[name] for name in settings.key()} == settings.key()


def test_settings_beside_options_or_in_place_of_options_are_type_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_module, "resolve_model_path", lambda *a: pytest.fail("a file was read"))
    settings = QuantizeSettings(method="rtn")
    with pytest.raises(TypeError, match="options bits, seqlen given beside settings"):
        quantize(tmp_path / "model", tmp_path / "out", settings, seqlen=16, bits=8)
    with pytest.raises(TypeError, match="options tp given beside settings"):
        plan_report(tiny_config(), settings, tp=2)
    with pytest.raises(TypeError, match="settings must be a QuantizeSettings, got int 4"):
        quantize(tmp_path / "model", tmp_path / "out", 4)  # the old positional bits
    with pytest.raises(TypeError, match="unexpected keyword argument 'bitz'"):
        quantize(tmp_path / "model", tmp_path / "out", bitz=4)
    with pytest.raises(ValueError, match="resume must be True or False, got 1"):
        quantize(tmp_path / "model", tmp_path / "out", settings, resume=1)
    assert list(tmp_path.iterdir()) == []
