"""Hostile JSON in a model folder (issue 22, the second hostile pass): config.json, generation_config.json, the
safetensors index and headers are read through one parser, every field we read is type-checked before it is used, and
the tokenizer is the one whose ids fit the model. Every failure is a ValueError naming the file and the field; the CLI
turns it into exit code 2."""
import dataclasses
import json
import math
import random
import shutil
import struct
import typing
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from qwen_quant.checkpoint import INDEX_NAME, WeightReader, read_safetensors_header
from qwen_quant.config import DTYPES, MAX_INT, QuantConfig, QwenConfig, is_int, is_number
from qwen_quant.json_files import MAX_JSON_BYTES
from qwen_quant.synthetic import save_random_checkpoint
from qwen_quant.tokenizer import ENDOFTEXT, IM_END, IM_START, JsonTokenizer, QwenTokenizer, load_tokenizer
from cli_runner import run_cli
from tiny_model import tiny_config

DEEP = 100_000  # far past the nesting Python's JSON parser recurses through


def copy_files(src: Path, dst: Path, names) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return dst


def set_vocab(folder: Path, vocab_size: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": vocab_size}))


@pytest.fixture
def smollm2_files(smollm2_dir, tmp_path) -> Path:
    """SmolLM2's config.json, tokenizer.json and generation_config.json (no weights: load_tokenizer needs none)."""
    return copy_files(smollm2_dir, tmp_path / "smollm2", ["config.json", "tokenizer.json", "generation_config.json"])


@pytest.fixture
def stories_model(stories_dir, tmp_path) -> Path:
    """A copy of the tiny real model (vocab 512), which carries no tokenizer file load_tokenizer reads."""
    return copy_files(stories_dir, tmp_path / "stories", ["config.json", "model.safetensors"])


# --- finding 1: the tokenizer is the one that fits the model ----------------------------------------------------

def test_folder_with_both_tokenizers_uses_the_one_that_fits_the_model(smollm2_files, tiktoken_file):
    shutil.copyfile(tiktoken_file, smollm2_files / "qwen.tiktoken")
    tokenizer = load_tokenizer(smollm2_files)
    assert isinstance(tokenizer, JsonTokenizer)
    assert tokenizer.vocab_size == 49152 and tokenizer.stop_ids == (2, 0)


def test_qwen_vocab_folder_with_a_stray_small_tokenizer_json_is_ambiguous(smollm2_files, tiktoken_file):
    # Both tokenizers' ids have embedding rows in a Qwen-sized model: nothing says which one is the model's.
    shutil.copyfile(tiktoken_file, smollm2_files / "qwen.tiktoken")
    set_vocab(smollm2_files, 151936)
    with pytest.raises(ValueError, match="holds two tokenizers") as e:
        load_tokenizer(smollm2_files)
    message = str(e.value)
    assert all(s in message for s in ("qwen.tiktoken (151851 ids)", "tokenizer.json (49152 ids)", "both fit",
                                      "encode text differently", "vocab_size 151936",
                                      "remove the one that is not the model's"))
    (smollm2_files / "tokenizer.json").unlink()  # removing the stray one settles it
    assert isinstance(load_tokenizer(smollm2_files), QwenTokenizer)


def test_two_tokenizers_that_fit_and_agree_are_one_tokenizer_in_two_formats(smollm2_files, tiktoken_file,
                                                                             monkeypatch):
    # A tokenizer.json converted from qwen.tiktoken encodes every text as it does: stood in for by a JsonTokenizer
    # whose encode is the tiktoken one's.
    shutil.copyfile(tiktoken_file, smollm2_files / "qwen.tiktoken")
    set_vocab(smollm2_files, 151936)
    qwen = QwenTokenizer(tiktoken_file)
    monkeypatch.setattr(JsonTokenizer, "encode", lambda self, text, allowed_special=(): qwen.encode(text))
    assert isinstance(load_tokenizer(smollm2_files), QwenTokenizer)


def test_folder_whose_two_tokenizers_neither_fit_is_an_error_also_from_the_cli(stories_model, smollm2_dir,
                                                                                 tiktoken_file, capsys):
    shutil.copyfile(tiktoken_file, stories_model / "qwen.tiktoken")
    shutil.copyfile(smollm2_dir / "tokenizer.json", stories_model / "tokenizer.json")
    with pytest.raises(ValueError, match="neither fits the model's vocab_size 512") as e:
        load_tokenizer(stories_model)
    assert "qwen.tiktoken (151851 ids)" in str(e.value) and "tokenizer.json (49152 ids)" in str(e.value)
    code, err, _ = run_cli(["eval", str(stories_model), "--seqlen", "64"], capsys)
    assert code == 2 and "holds two tokenizers" in err and "neither fits" in err


def test_folder_with_two_tokenizers_and_no_config_is_an_error(smollm2_dir, tiktoken_file, tmp_path):
    folder = copy_files(smollm2_dir, tmp_path / "m", ["tokenizer.json"])
    shutil.copyfile(tiktoken_file, folder / "qwen.tiktoken")
    with pytest.raises(ValueError, match="no config.json vocab_size tells which is the model's"):
        load_tokenizer(folder)


def test_a_lone_tokenizer_that_does_not_fit_the_model_is_an_error(smollm2_files, tiktoken_file, stories_model,
                                                                   capsys):
    (smollm2_files / "tokenizer.json").unlink()
    shutil.copyfile(tiktoken_file, smollm2_files / "qwen.tiktoken")
    with pytest.raises(ValueError, match=r"qwen.tiktoken \(151851 ids\) does not fit the model") as e:
        load_tokenizer(smollm2_files)
    assert "vocab_size 49152" in str(e.value)
    shutil.copyfile(tiktoken_file, stories_model / "qwen.tiktoken")  # today: ids out of range, later, or silently
    code, err, _ = run_cli(["eval", str(stories_model), "--seqlen", "64"], capsys)
    assert code == 2 and "qwen.tiktoken (151851 ids) does not fit the model" in err and "vocab_size 512" in err


def test_tokenizer_choice_reads_only_vocab_size_of_config_json(smollm2_files, stories_dir, tiktoken_file):
    config = json.loads((smollm2_files / "config.json").read_text())
    (smollm2_files / "config.json").write_text(json.dumps({**config, "hidden_size": "wide", "model_type": "llama"}))
    assert isinstance(load_tokenizer(smollm2_files), JsonTokenizer)
    assert load_tokenizer(stories_dir) is None  # tok512.bin only: token ids need no tokenizer
    assert isinstance(load_tokenizer(tiktoken_file.parent), QwenTokenizer)  # no config.json: nothing to fit
    set_vocab(smollm2_files, True)
    with pytest.raises(ValueError, match=r"config.json: vocab_size=True must be a positive integer"):
        load_tokenizer(smollm2_files)


# --- findings 2 and 3: generation_config.json -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer_json(tmp_path_factory) -> Path:
    """A five-id tokenizer.json with the ChatML tokens: loads in a millisecond, so a property test can load many."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    specials = [ENDOFTEXT, IM_START, IM_END]
    tokenizer = Tokenizer(models.WordLevel({**{s: i for i, s in enumerate(specials)}, "a": 3, "[UNK]": 4},
                                           unk_token="[UNK]"))
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def tokenizer_with_generation_config(tiny_tokenizer_json, folder: Path, text: str) -> JsonTokenizer:
    folder.mkdir(exist_ok=True)
    shutil.copyfile(tiny_tokenizer_json, folder / "tokenizer.json")
    (folder / "generation_config.json").write_text(text)
    return JsonTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("eos, stop_words", [(True, None), (2.0, None), ([], None), ([1, True], None),
                                             (None, [[True]]), (None, [2]), (None, [[]]), (None, "2")])
def test_generation_config_field_of_wrong_type_is_an_error_naming_it(tiny_tokenizer_json, tmp_path, eos, stop_words):
    config = {"eos_token_id": eos, "stop_words_ids": stop_words}
    field = "eos_token_id" if eos is not None else "stop_words_ids"
    with pytest.raises(ValueError, match=f"generation_config.json: {field}=") as e:
        tokenizer_with_generation_config(tiny_tokenizer_json, tmp_path / "m", json.dumps(config))
    assert str(tmp_path / "m" / "generation_config.json") in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("[2, 0]", "generation_config.json must be a JSON object of fields, not a list"),
    ('{"eos_token_id": true}', "generation_config.json: eos_token_id=True must be a token id"),
])
def test_generation_config_not_an_object_or_eos_true_is_an_error_also_from_the_cli(stories_model, tiny_tokenizer_json,
                                                                                    capsys, text, message):
    shutil.copyfile(tiny_tokenizer_json, stories_model / "tokenizer.json")  # 5 ids: fits the model's 512
    (stories_model / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(stories_model)
    code, err, _ = run_cli(["eval", str(stories_model), "--seqlen", "64"], capsys)
    assert code == 2 and message in err and str(stories_model) in err


# --- finding 4: config.json is read through the one JSON parser ------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b'{"hidden_size": 64\xff}', "is not UTF-8 text"),
    (b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nests its JSON arrays or objects too deeply"),
    (b'{"hidden_size": ', "is not valid JSON"),
])
def test_config_json_that_cannot_be_read_is_an_error_naming_it_also_from_the_cli(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        QwenConfig.from_file(tmp_path)
    assert str(path) in str(e.value)
    for command in ("memory", "plan"):
        code, err, _ = run_cli([command, str(tmp_path)], capsys)
        assert code == 2 and str(path) in err and message in err, (command, err)


def test_huge_config_json_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing is written, nothing is read
    with pytest.raises(ValueError, match=f"{path} is {MAX_JSON_BYTES + 1} bytes, larger than"):
        QwenConfig.from_file(path)
    code, err, _ = run_cli(["memory", str(tmp_path)], capsys)
    assert code == 2 and "bytes, larger than" in err


def test_config_json_number_of_too_many_digits_names_the_file(stories_model, capsys):
    path = stories_model / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config)[:-1] + ', "rope_scaling": ' + "9" * 5000 + "}")
    with pytest.raises(ValueError, match=f"{path} holds a number of more digits than Python converts"):
        QwenConfig.from_file(path)
    code, err, _ = run_cli(["memory", str(stories_model)], capsys)
    assert code == 2 and "holds a number of more digits" in err


# --- finding 5: the safetensors index and headers -----------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path) -> Path:
    folder = tmp_path / "model"
    save_random_checkpoint(folder, tiny_config(num_hidden_layers=1), max_shard_bytes=150_000)
    return folder


@pytest.mark.parametrize("content, message", [
    (b'{"weight_map": {}\xff}', "is not UTF-8 text"),
    (b'{"weight_map": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nests its JSON arrays or objects too deeply"),
    (b"[1, 2]", "is not a valid safetensors weight index: TypeError"),
    (b'{"metadata": {}}', "is not a valid safetensors weight index: KeyError"),
])
def test_safetensors_index_that_cannot_be_read_is_an_error_naming_it(sharded, capsys, content, message):
    (sharded / INDEX_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        WeightReader(sharded)
    assert str(sharded / INDEX_NAME) in str(e.value)
    code, err, _ = run_cli(["eval", str(sharded), "--seqlen", "16"], capsys)
    assert code == 2 and INDEX_NAME in err and message in err


@pytest.mark.parametrize("header, message", [
    (b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}", "its header nests its JSON arrays or objects too deeply"),
    (b'{"a": "\xff"}', "its header is not UTF-8 text"),
    (b'{"a": ', "its header is not valid JSON"),
    (b"[]", "its header is not a JSON object"),
])
def test_safetensors_header_that_cannot_be_read_is_an_error_naming_the_file(tmp_path, capsys, header, message):
    folder = save_random_checkpoint(tmp_path / "model", tiny_config())
    file = folder / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match=message) as e:
        read_safetensors_header(file)
    assert f"cannot read {file}: not a valid safetensors file" in str(e.value)
    code, err, _ = run_cli(["eval", str(folder), "--seqlen", "16"], capsys)
    assert code == 2 and str(file) in err and message in err


# --- property tests: every field, many hostile values -----------------------------------------------------------

HOSTILE_VALUES = [True, False, None, 0, -1, 1, 2, 2.5, -0.5, 1e308, math.inf, math.nan, "4", "", "bfloat16", [], {},
                  [1], [[1]], {"a": 1}, 10**30, -(10**30), 10**400, 2**63, MAX_INT, [[[[[]]]]],
                  json.loads("[" * 500 + "]" * 500)]


def random_json(rng: random.Random, depth: int = 0):
    """A random JSON value: numbers of every size, strings, and (shallowly) nested lists and objects."""
    kind = rng.choice(["small int", "big int", "float", "bool", "null", "str"] + ["list", "object"] * (depth < 3))
    if kind == "small int":
        return rng.randint(-3, 10)
    if kind == "big int":
        return rng.choice([-1, 1]) * 10 ** rng.randint(9, 400)
    if kind == "float":
        return rng.choice([rng.uniform(-4, 4), 10.0 ** rng.randint(-320, 308), -math.inf, math.nan])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "str":
        return rng.choice(["", "1", "true", "float16", "gptq", "x" * 10_000])
    items = [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return items if kind == "list" else {str(i): item for i, item in enumerate(items)}


def field_values(rng: random.Random, count: int) -> list:
    """Each hostile value once, then random ones from the seeded generator."""
    return HOSTILE_VALUES + [random_json(rng) for _ in range(count)]


def holds_right_type(value, annotation) -> bool:
    """Whether an accepted field holds exactly a value of its declared type: bools are bools, ints are ints in range
    (and not bools), floats are finite numbers."""
    if typing.get_origin(annotation) is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return value is None or holds_right_type(value, inner[0])
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return is_int(value) and abs(value) <= MAX_INT
    if annotation is float:
        return is_number(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation is QuantConfig:
        return isinstance(value, QuantConfig)
    raise AssertionError(f"no type rule for {annotation}: add one for the new field")


def config_fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "extra"}  # extra: unknown keys


def check_config(path: Path, field: str, config: dict, accepted) -> None:
    """QwenConfig.from_file accepts the config only as `accepted(config)` allows, or names the file and the field."""
    path.write_text(json.dumps(config))
    try:
        qwen = QwenConfig.from_file(path)
    except ValueError as e:
        assert str(path) in str(e) and field in str(e), (field, str(e)[:300])
        assert len(str(e)) < 2000, field  # a huge value is shown cut short
        return
    assert accepted(qwen), (field, str(config)[:300])


def test_every_config_json_field_takes_a_hostile_value_or_names_itself(stories_dir, tmp_path):
    rng = random.Random(0)
    base = json.loads((stories_dir / "config.json").read_text())
    old = {k: v for k, v in base.items() if k != "torch_dtype"}  # old configs: precision flags, no torch_dtype
    path = tmp_path / "config.json"
    for field, annotation in config_fields(QwenConfig).items():
        for value in field_values(rng, 12):
            check_config(path, field, {**base, field: value},
                         lambda q: holds_right_type(getattr(q, field), annotation))
    for value in field_values(rng, 12):  # fields read but not kept
        check_config(path, "model_type", {**base, "model_type": value}, lambda q: value == "qwen")
        for flag in ("bf16", "fp16"):
            check_config(path, flag, {**old, flag: value},
                         lambda q: isinstance(value, bool) and q.torch_dtype in DTYPES)


def test_every_quantization_config_field_takes_a_hostile_value_or_names_itself(stories_dir, tmp_path):
    rng = random.Random(1)
    base = json.loads((stories_dir / "config.json").read_text())
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False,
             "static_groups": False, "sym": True, "true_sequential": True, "checkpoint_format": "gptq"}
    path = tmp_path / "config.json"
    for field, annotation in config_fields(QuantConfig).items():
        for value in field_values(rng, 12):
            check_config(path, field, {**base, "quantization_config": {**quant, field: value}},
                         lambda q: holds_right_type(getattr(q.quantization_config, field), annotation))
    for value in field_values(rng, 12):  # read but not kept
        check_config(path, "quant_method", {**base, "quantization_config": {**quant, "quant_method": value}},
                     lambda q: value == "gptq")


def test_generation_config_fields_take_a_hostile_value_or_name_themselves(tiny_tokenizer_json, tmp_path):
    rng = random.Random(2)
    folder, vocab = tmp_path / "m", 5
    path = folder / "generation_config.json"
    id_lists = [[rng.randint(-1, vocab) for _ in range(rng.randint(0, 3))] for _ in range(12)]
    candidates = field_values(rng, 24) + id_lists + [[rng.choice(id_lists) for _ in range(2)] for _ in range(12)]
    cases = [{field: value} for field in ("eos_token_id", "stop_words_ids") for value in candidates]
    cases += [{"eos_token_id": rng.choice(candidates), "stop_words_ids": rng.choice(candidates)} for _ in range(40)]
    cases += [random_json(rng) for _ in range(40)] + [v for v in HOSTILE_VALUES if not isinstance(v, dict)]
    for config in cases:
        try:
            tokenizer = tokenizer_with_generation_config(tiny_tokenizer_json, folder, json.dumps(config))
        except ValueError as e:
            message = str(e)
            assert str(path) in message and len(message) < 2000, message[:300]
            if isinstance(config, dict):
                fields = [f for f in ("eos_token_id", "stop_words_ids") if config.get(f) is not None]
                assert any(f in message for f in fields), (config, message[:300])
            else:
                assert "must be a JSON object" in message, (config, message[:300])
            continue
        assert isinstance(config, dict), config
        stops = tokenizer.stop_ids
        assert stops and all(is_int(i) and 0 <= i < vocab for i in stops), (config, stops)
        eos = config.get("eos_token_id")
        assert eos is None or eos in stops or set(eos) <= set(stops), (config, stops)
