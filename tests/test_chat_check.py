"""The chat check (qwen_quant.chat_check, `qwen-quantize eval QUANTIZED --chat --baseline FULL_PRECISION`): the shipped
questions, answers compared with full precision's, and the failure perplexity misses: a quantized model that no longer
ends its turn where full precision does."""
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cli_runner import run_cli
from qwen_quant import QwenForCausalLM
from qwen_quant.chat_check import ChatPrompt, cell, columns, compare, format_report, load_prompts, rendered
from qwen_quant.quantize import quantize
from qwen_quant.synthetic import save_random_checkpoint
from qwen_quant.tokenizer import QwenTokenizer, load_tokenizer
from tiny_model import tiny_config

CJK = re.compile(r"[\u4e00-\u9fff]")
FRANCE, JAPAN, CHINA = 0, 1, 10  # shipped prompts SmolLM2 answers in under 10 tokens, then stops


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def full_precision(smollm2_dir):
    return QwenForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_pair(smollm2_dir, tmp_path_factory) -> tuple:
    """(full precision, its RTN Int4 export) of a 2-block random model over SmolLM2's vocabulary carrying its
    tokenizer.json: the CLI's whole path, all shipped prompts, in seconds."""
    root = tmp_path_factory.mktemp("chat")
    full = save_random_checkpoint(root / "fp", tiny_config(vocab_size=49152))
    load_tokenizer(smollm2_dir).save_pretrained(full)
    quantize(full, root / "int4", method="rtn", bits=4, group_size=32, progress=False)
    return full, root / "int4"


class ScriptedModel:
    """Stands in for a model: answers each prompt with its next script of token ids, ending at the first stop id or
    at the budget, as QwenForCausalLM.generate does; read back (a forward), its top token at each position after the
    last prompt is the one its script has there."""

    device = torch.device("cpu")

    def __init__(self, scripts, vocab_size=49152):
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.scripts = iter(scripts)

    def generate(self, prompt, max_new_tokens, stop_ids):
        self.prompt_length, self.script = len(prompt), next(self.scripts)
        new = []
        for token in self.script[:max_new_tokens]:
            new.append(token)
            if token in stop_ids:
                break
        return torch.tensor([list(prompt) + new])

    def __call__(self, ids):
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        for offset, token in enumerate(self.script[:ids.shape[1] - self.prompt_length + 1]):
            logits[0, self.prompt_length - 1 + offset, token] = 5.0
        return logits


def test_shipped_prompts_parse_and_render(tokenizer, tiktoken_file):
    prompts = load_prompts()
    assert len(prompts) == 20
    chinese = sum(bool(CJK.search(p.messages[-1]["content"])) for p in prompts)
    assert 8 <= chinese <= 12  # about half each
    assert '"chat_prompts.jsonl"' in (Path(__file__).parents[1] / "setup.py").read_text()  # shipped with the package
    for tok in (tokenizer, QwenTokenizer.from_pretrained(tiktoken_file)):  # SmolLM2's tokenizer.json and Qwen's
        header = [tok.im_start_id, *tok.encode("assistant"), *tok.encode("\n")]
        for prompt in prompts:
            assert all(word.strip() for word in prompt.expect)
            ids = rendered(prompt, tok)
            assert ids[0] == tok.im_start_id and ids[-len(header):] == header
            assert prompt.messages[-1]["content"] in tok.decode(ids)


def test_bad_prompt_lines_name_the_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "Q?"}], "expect": ["A"]}
    cases = ['[1, 2]', '{"expect": ["A"]}', '{"messages": [{"role": "user", "content": "Q?"}]}',
             '{"messages": [], "expect": ["A"]}', '{"messages": "Q?", "expect": ["A"]}',
             '{"messages": [{"role": "user"}], "expect": ["A"]}',
             '{"messages": [{"role": "user", "content": 5}], "expect": ["A"]}',
             '{"messages": [{"role": "user", "content": "Q?"}], "expect": []}',
             '{"messages": [{"role": "user", "content": "Q?"}], "expect": "A"}',
             '{"messages": [{"role": "user", "content": "Q?"}], "expect": [" "]}',
             '{"messages": [{"role": "user", "content": "Q?"}], "expect": [true]}', '{not json', '[' * 100_000]
    for case in cases:
        path = tmp_path / "prompts.jsonl"
        path.write_text(f"{json.dumps(good)}\n\n{case}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:3[: ]"):  # file:line, then what is wrong
            load_prompts(path)
    path.write_bytes(b"\n \n")
    with pytest.raises(ValueError, match="holds no chat prompts"):
        load_prompts(path)
    path.write_bytes(b'{"messages": [{"role": "user", "content": "\xff"}], "expect": ["A"]}')
    with pytest.raises(ValueError, match=r":1 is not UTF-8"):
        load_prompts(path)


def test_compare_checks_its_arguments_before_generating(tokenizer):
    class Refuses(ScriptedModel):
        def generate(self, *args, **kwargs):
            raise AssertionError("generated before the arguments were checked")

    model = Refuses([])
    prompt = {"messages": [{"role": "user", "content": "Q?"}], "expect": ["A"]}
    for kwargs, error, match in [
            (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
            (dict(max_new_tokens=True), ValueError, "max_new_tokens"),  # JSON-style true is not 1
            (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"), (dict(prompts="Q?"), TypeError, "prompts"),
            (dict(prompts=[]), TypeError, "prompts"), (dict(prompts=prompt), TypeError, "prompts"),
            (dict(prompts=[prompt, {"messages": [], "expect": ["A"]}]), ValueError, r"prompts\[1\]: 'messages'"),
            (dict(prompts=[prompt, {"messages": [{"role": "bot", "content": "Q?"}], "expect": ["A"]}]), ValueError,
             r"prompts\[1\]: message 0: role 'bot'")]:
        with pytest.raises(error, match=match):
            compare(model, model, tokenizer, **kwargs)
    with pytest.raises(TypeError, match="tokenizer"):
        compare(model, model, None)
    with pytest.raises(ValueError, match=r"different vocabularies \(vocab_size \[49152, 151936\]\)"):
        compare(model, Refuses([], vocab_size=151936), tokenizer)


def test_same_model_twice_agrees_and_stops_alike(full_precision, tokenizer):
    prompts = load_prompts()
    report = compare(full_precision, full_precision, tokenizer, prompts=[prompts[FRANCE], prompts[CHINA]],
                     max_new_tokens=12)
    assert report.agreements == 2 and report.stops_where_full_precision_stops
    assert report.full_precision_stops == report.quantized_stops
    for row in report.rows:
        assert row.full_precision == row.quantized
        assert row.ends_turn_on_full_precision_answer is True and row.kl_sum == 0.0  # the same logits
        assert row.full_precision_end_margin > 0 and row.decisive_end == (row.full_precision_end_margin >= 1.5)
    assert report.rows[0].full_precision.text == "The capital of France is Paris."  # 8 tokens, then <|im_end|>
    assert report.rows[0].full_precision.stopped
    assert report.rows[0].full_precision.tokens == len(tokenizer.encode("The capital of France is Paris.")) + 1
    table = format_report(report)
    assert "agree: 2/2 prompts" in table and "stops wherever full precision stops: yes" in table
    assert "the quantized model's top token is the end of turn where full precision's is on 2/2\n" in table
    assert "mean KL(full precision || quantized) per answer token: 0.0000 nats" in table
    assert "in full" not in table  # nothing disagrees


def test_a_quantized_model_that_never_stops_is_reported(full_precision, smollm2_dir, tokenizer, monkeypatch):
    # The failure users report, made certain: a model whose end-of-turn ids never win, so its answer goes on to the
    # budget where full precision ended its turn.
    quantized = QwenForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    sample = quantized.sample

    def never_ends_turn(logits, *args):
        logits = logits.clone()
        logits[:, list(tokenizer.stop_ids)] = float("-inf")
        return sample(logits, *args)

    monkeypatch.setattr(quantized, "sample", never_ends_turn)
    forward = quantized.forward

    def end_of_turn_last(*args, **kwargs):  # read back, the end of turn is never its top token either
        logits = forward(*args, **kwargs).clone()
        logits[..., list(tokenizer.stop_ids)] = logits.min() - 1
        return logits

    monkeypatch.setattr(quantized, "forward", end_of_turn_last)
    prompts = load_prompts()
    report = compare(full_precision, quantized, tokenizer, prompts=[prompts[FRANCE], prompts[JAPAN]],
                     max_new_tokens=12)
    assert [row.full_precision.stopped for row in report.rows] == [True, True]
    assert [(row.quantized.stopped, row.quantized.tokens) for row in report.rows] == [(False, 12), (False, 12)]
    assert report.missed_stops == [1, 2] and not report.stops_where_full_precision_stops
    assert (report.full_precision_stops, report.quantized_stops) == (2, 0)
    assert [row.ends_turn_on_full_precision_answer for row in report.rows] == [False, False]
    assert report.missed_ends_on_full_precision_answers == [1, 2] and report.mean_kl > 0
    # SmolLM2 ends these two answers by more than 2 nats (fp32): decisive ends, missed.
    assert all(row.full_precision_end_margin > 2 for row in report.rows)
    assert report.decisive_ends == 2 and report.missed_decisive_ends == [1, 2]
    table = format_report(report)
    assert table.count("<- never stops") == 2
    assert "stops wherever full precision stops: NO - the quantized model runs to the budget where full precision " \
           "stopped, on prompts 1, 2" in table
    assert "the end of turn where full precision's is on 0/2 (not on prompts 1, 2)" in table
    assert "where full precision ends its turn decisively (by 1.5 nats or more): 0/2" in table


def test_report_follows_the_answers_property(tokenizer):
    """Random scripted answers (seeded): stopped, tokens, text, agreement and the missed stops are what the scripts
    say, and the table marks exactly the missed stops."""
    rng = random.Random(0)
    words = [tokenizer.encode(w)[0] for w in (" Paris", " Rome", " the", " capital", ".", " 巴")]
    for case in range(150):
        budget, count = rng.randint(1, 8), rng.randint(1, 4)
        expected_rows, scripts = [], {"fp": [], "q": []}
        for _ in range(count):
            for side in ("fp", "q"):
                script = [rng.choice(words) for _ in range(budget + 3)]
                if side == "q" and rng.random() < 0.3:
                    script = list(scripts["fp"][-1])  # the same answer
                elif rng.random() < 0.6:
                    script[rng.randrange(budget + 2)] = rng.choice(tokenizer.stop_ids)
                scripts[side].append(script)
            row = []
            for script in (scripts["fp"][-1], scripts["q"][-1]):
                stop = next((i for i, t in enumerate(script[:budget]) if t in tokenizer.stop_ids), None)
                text = tokenizer.decode(script[:stop] if stop is not None else script[:budget])
                row.append((stop is not None, stop + 1 if stop is not None else budget, text, "paris" in text.lower()))
            expected_rows.append(row)
        prompts = [ChatPrompt([{"role": "user", "content": f"Q{i}?"}], ["Paris"], "test") for i in range(count)]
        report = compare(ScriptedModel(scripts["fp"]), ScriptedModel(scripts["q"]), tokenizer, prompts=prompts,
                         max_new_tokens=budget, progress=False)
        missed = []
        for number, (row, (fp, q)) in enumerate(zip(report.rows, expected_rows), start=1):
            for answer, (stopped, tokens, text, expected) in ((row.full_precision, fp), (row.quantized, q)):
                assert (answer.stopped, answer.tokens, answer.text, answer.expected) == \
                    (stopped, tokens, text, expected)
            assert row.agree == (fp[2].strip() == q[2].strip() or fp[3] and q[3])
            missed += [number] * (fp[0] and not q[0])
        assert report.missed_stops == missed
        assert report.missed_decisive_ends == report.missed_ends_on_full_precision_answers
        for row, fp_script, q_script in zip(report.rows, scripts["fp"], scripts["q"]):
            # Reading full precision's answer, the quantized script's token where full precision stopped.
            answer = row.full_precision
            expected_end = q_script[answer.tokens - 1] in tokenizer.stop_ids if answer.stopped else None
            assert row.ends_turn_on_full_precision_answer == expected_end
            # A script's token leads the others by 5 nats: every end of turn is decisive.
            assert row.full_precision_end_margin == (5.0 if answer.stopped else None)
            assert (row.kl_sum > 1e-6) == (q_script[:answer.tokens] != fp_script[:answer.tokens])
        assert report.agreements == sum(row.agree for row in report.rows)
        table = format_report(report)
        assert table.count("<- never stops") == len(missed)
        assert ("stops wherever full precision stops: yes" in table) == (not missed)


def test_cells_are_as_wide_as_asked_property():
    rng = random.Random(0)
    alphabet = "abc XYZ 1.\n\t北京是中国的首都，？😀"
    for case in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        width = rng.randint(2, 40)
        shown = cell(text, width)
        assert columns(shown) == width  # CJK and emoji take two columns: the table's columns line up
        one_line = " ".join(text.split())  # newlines and tabs never break a row
        kept = shown.rstrip()
        assert kept == one_line or kept.endswith("…") and one_line.startswith(kept[:-1])


def test_cli_prints_the_table(tiny_pair, capsys):
    full, int4 = tiny_pair
    code, err, out = run_cli(["eval", str(int4), "--chat", "--baseline", str(full), "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    table = out.split("\n\n")[0].splitlines()
    assert len(table) == 2 + 20 and "full precision" in table[0] and "quantized" in table[0]
    assert "What is the capital of France?" in out and "中国的首都是哪个城市？" in out
    assert re.search(r"^agree: \d+/20 prompts", out, flags=re.M)
    assert re.search(r"^stopped within 3 new tokens: full precision \d+/20, quantized \d+/20$", out, flags=re.M)
    assert re.search(r"^stops wherever full precision stops: (yes|NO - .* on prompts? [\d, ]+)$", out, flags=re.M)
    assert re.search(r"^reading full precision's answers: .* on \d+/\d+( \(not on prompts? [\d, ]+\))?$", out,
                     flags=re.M)
    assert re.search(r"^mean KL\(full precision \|\| quantized\) per answer token: \d+\.\d{4} nats$", out,
                     flags=re.M)


def test_cli_refuses_chat_without_baseline_and_bad_budgets(smollm2_dir, tmp_path, capsys):
    code, err, _ = run_cli(["eval", str(smollm2_dir), "--chat"], capsys)
    assert code == 2 and "argument --chat: needs --baseline" in err
    for budget in ("0", "-3", "1.5", "many"):
        code, err, _ = run_cli(["eval", str(smollm2_dir), "--chat", "--baseline", str(smollm2_dir),
                                "--max-new-tokens", budget], capsys)
        assert code == 2 and "argument --max-new-tokens" in err
    bare = save_random_checkpoint(tmp_path / "bare", tiny_config())  # no tokenizer file
    code, err, out = run_cli(["eval", str(bare), "--chat", "--baseline", str(bare)], capsys)
    assert code == 2 and err.startswith("qwen-quantize: error: ") and "holds no tokenizer" in err and out == ""
