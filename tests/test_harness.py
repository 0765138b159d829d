"""qwen_quant.harness: our runtime as an lm-evaluation-harness model, and `qwen-quantize eval --tasks`.

Every score is checked against a computation by hand from the model's logits (log-softmax at the continuation's
tokens), on SmolLM2 in full precision and on an Int4 export of it; documents against evaluate.perplexity where the
window rules agree; generation against QwenForCausalLM.generate; batches against one request at a time."""
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model, model_registry

from cli_runner import run_cli
from qwen_quant.evaluate import perplexity
from qwen_quant.harness import CHATML_TEMPLATE, QwenQuantLM, results_table
from qwen_quant.quantize import quantize
from qwen_quant.synthetic import save_random_checkpoint
from qwen_quant.tokenizer import build_chat_input, encode_chatml, load_tokenizer
from tiny_model import tiny_config

TASKS = Path(__file__).with_name("harness_tasks")
CHATML_QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
WINDOW = 32  # max_length of the SmolLM2 model below: documents of a few dozen tokens span several windows


def close(a: float, b: float, dtype: torch.dtype = torch.float32) -> bool:
    """Equal but for the rounding of the activations' dtype (batches pad, which may change a kernel's blocking)."""
    tolerance = 1e-5 if dtype == torch.float32 else 4e-3  # bf16 keeps 8 bits of mantissa
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)


@pytest.fixture(autouse=True)
def offline(monkeypatch, data_dir):
    """No test here may reach the network; the local WikiText-2 task reads the shared data."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("QWEN_QUANT_DATA", str(data_dir))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return QwenQuantLM(smollm2_dir, max_length=WINDOW)


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_two_blocks):
    """SmolLM2's first two blocks RTN-quantized to Int4 (conftest's smollm2_two_blocks), three requests a batch."""
    return QwenQuantLM(smollm2_two_blocks / "int4", batch_size=3, max_length=WINDOW)


@pytest.fixture(scope="module")
def tiny_models(smollm2_dir, tmp_path_factory):
    """Two 2-block random models over SmolLM2's vocabulary, carrying its tokenizer: whole tasks in seconds."""
    root = tmp_path_factory.mktemp("tiny")
    folders = [save_random_checkpoint(root / name, tiny_config(vocab_size=49152), seed=seed)
               for seed, name in enumerate(("a", "b"))]
    for folder in folders:
        load_tokenizer(smollm2_dir).save_pretrained(folder)
    return folders


def requests(kind: str, *arguments) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


@torch.inference_mode()
def continuation_logprob(lm: QwenQuantLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """By hand: one forward over context + continuation (all but the last token), log-softmax at the continuation."""
    ids = torch.tensor((context + continuation)[:-1])[None]
    logprobs = lm.model(ids)[0, -len(continuation):].log_softmax(-1)
    target = torch.tensor(continuation)
    return float(logprobs[torch.arange(len(continuation)), target].sum()), bool((logprobs.argmax(-1) == target).all())


def wiki_words(data_dir) -> list[str]:
    text = (data_dir / "wikitext2" / "raw_test_nonempty_lines" / "wiki.test.raw").read_text(encoding="utf-8")
    return text.replace("\r\n", "\n").split(" ")[:3000]


def text_of_tokens(lm: QwenQuantLM, words: list[str], count: int) -> str:
    """The first run of whole words that encodes to exactly `count` tokens."""
    for start in range(len(words)):
        for end in range(start + 1, len(words)):
            found = len(lm.tok_encode(" ".join(words[start:end])))
            if found >= count:
                break
        if found == count:
            return " ".join(words[start:end])
    raise AssertionError(f"no run of the words encodes to {count} tokens")


# loglikelihood: the sum of our log-softmax over the continuation's tokens.

@pytest.mark.parametrize("which", ["full precision", "Int4"])
def test_loglikelihood_is_the_log_softmax_sum_by_hand(which, request):
    lm = request.getfixturevalue("smollm2" if which == "full precision" else "smollm2_int4")
    assert (lm.model.config.quantization_config is None) == (which == "full precision")
    pairs = [("The capital of France is", " Paris"), ("Two plus two equals ", "four, and three plus three six."),
             ("", "Hello world")]
    scores = lm.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    encode = lm.tokenizer.encode
    for (context, continuation), score in zip(pairs, scores):
        if context:  # a context's trailing space belongs to the continuation (lm_eval's rule)
            context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
            context_ids = encode(context)
            continuation_ids = encode(context + continuation)[len(context_ids):]
        else:  # no context: <|endoftext|> stands before the continuation
            context_ids, continuation_ids = [lm.tokenizer.eod_id], encode(continuation)
        logprob, greedy = continuation_logprob(lm, context_ids, continuation_ids)
        assert close(score[0], logprob, lm.model.dtype) and score[1] == greedy


def test_greedy_flag_marks_the_models_own_continuation(smollm2):
    # The end of the model's greedy reply ("The capital of France is Paris.") is greedy; another answer is not.
    context = CHATML_QUESTION + "The capital of France is"
    (own, greedy), (other, not_greedy) = smollm2.loglikelihood(
        requests("loglikelihood", (context, " Paris."), (context, " Rome.")), disable_tqdm=True)
    assert greedy and not not_greedy and own > other


def test_long_context_is_cut_from_the_left_and_a_too_long_continuation_refused(smollm2, data_dir):
    words = wiki_words(data_dir)
    context, continuation = " ".join(words[:80]), " " + " ".join(words[80:83])
    ids = smollm2.tok_encode(context + continuation)
    continuation_ids = ids[len(smollm2.tok_encode(context)):]
    assert len(ids) > WINDOW + 1
    (score, _), = smollm2.loglikelihood(requests("loglikelihood", (context, continuation)), disable_tqdm=True)
    window = ids[-(WINDOW + 1):]  # the last max_length + 1 tokens: the model reads all but the last
    assert close(score, continuation_logprob(smollm2, window[:-len(continuation_ids)], continuation_ids)[0])
    with pytest.raises(ValueError, match=f"does not fit in max_length {WINDOW}"):
        smollm2.loglikelihood(requests("loglikelihood", ("A", " ".join(words[:60]))), disable_tqdm=True)


# loglikelihood_rolling: every token of the document once, after <|endoftext|>, in windows of max_length.

def test_rolling_equals_perplexity_when_the_windows_agree(smollm2, data_dir):
    """With a document of a whole number of windows, lm_eval's windows are evaluate.perplexity's sliding windows of
    max_length + 1 tokens every max_length over <|endoftext|> + document; the last window differs otherwise."""
    text = text_of_tokens(smollm2, wiki_words(data_dir), 2 * WINDOW)
    (logprob,) = smollm2.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)), disable_tqdm=True)
    tokens = torch.tensor([smollm2.tokenizer.eod_id] + smollm2.tok_encode(text))
    result = perplexity(smollm2.model, tokens, seqlen=WINDOW + 1, stride=WINDOW, progress=False)
    assert result.targets == 2 * WINDOW and result.windows == 2
    assert close(-logprob, result.nll * result.targets)


@pytest.mark.parametrize("length", [5, 2 * WINDOW + 7])
def test_rolling_last_window_has_a_full_context_by_hand(smollm2, data_dir, length):
    """Token j is predicted in window j // max_length; the last, partial window reads the max_length tokens before
    the document's last token (perplexity's last window would read fewer): computed here from model(ids)."""
    text = text_of_tokens(smollm2, wiki_words(data_dir), length)
    (logprob,) = smollm2.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)), disable_tqdm=True)
    stream = [smollm2.tokenizer.eod_id] + smollm2.tok_encode(text)  # stream[j + 1] is the document's token j
    expected, scored = 0.0, 0
    while scored < length:
        end = min(scored + WINDOW, length)  # this window predicts document tokens scored..end-1
        start = max(0, end - WINDOW)  # its input: stream[start:end], the max_length tokens before token end - 1
        expected += continuation_logprob(smollm2, stream[start:scored + 1], stream[scored + 1:end + 1])[0]
        scored = end
    assert close(logprob, expected)


# generate_until: greedy, stopped by a stop string, a stop id or max_gen_toks.

def reference_reply(lm: QwenQuantLM, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """QwenForCausalLM.generate's greedy reply with the folder's stop ids, the stop token left out."""
    ids = lm.tok_encode(prompt)
    new = lm.model.generate(ids, max_new_tokens, stop_ids=lm.tokenizer.stop_ids)[0, len(ids):].tolist()
    new = new[:-1] if new[-1] in lm.tokenizer.stop_ids else new
    return lm.tok_decode(new), new


def test_generate_until_stops_at_stop_ids_strings_and_max_gen_toks(smollm2, monkeypatch):
    full, full_ids = reference_reply(smollm2, CHATML_QUESTION, 16)
    assert full == "The capital of France is Paris." and len(full_ids) < 16  # <|im_end|> ended it
    streamed = []
    generate = smollm2.model.generate

    def counting_generate(*args, streamer, **kwargs):  # how many tokens each call produced
        streamed.append(0)

        def count(token):
            streamed[-1] += 1
            streamer(token)
        return generate(*args, streamer=count, **kwargs)

    monkeypatch.setattr(smollm2.model, "generate", counting_generate)
    replies = smollm2.generate_until(requests(
        "generate_until", (CHATML_QUESTION, {"until": ["\n\n", "never"], "max_gen_toks": 16}),
        (CHATML_QUESTION, {"until": " Paris", "max_gen_toks": 16}), (CHATML_QUESTION, {"until": [], "max_gen_toks": 3})),
        disable_tqdm=True)
    assert replies == [full, "The capital of France is", smollm2.tok_decode(full_ids[:3])]
    # The stop id ended the first; the stop string the second, as soon as its token came.
    assert streamed[0] == len(full_ids) + 1 and streamed[1] < len(full_ids) and streamed[2] == 3


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"until": ["\n"], "do_sample": True, "temperature": 0.7}, "greedily only"),
    ({"until": ["\n"], "top_p": 0.9}, r"\['top_p'\] are not supported"),
    ({"until": [7], "max_gen_toks": 8}, "must be strings"),
    ({"until": ["\n"], "max_gen_toks": WINDOW}, f"max_gen_toks {WINDOW} must be in 1..max_length - 1"),
])
def test_generate_until_refuses_what_it_cannot_do(smollm2, gen_kwargs, message):
    with pytest.raises(ValueError, match=message):
        smollm2.generate_until(requests("generate_until", ("Hi", gen_kwargs)), disable_tqdm=True)


# ChatML: lm_eval's chat template and a task's ChatML text both become encode_chatml's ids.

def test_chat_template_and_chatml_text_are_encode_chatml(smollm2):
    tokenizer = smollm2.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 2?"}]
    rendered = smollm2.apply_chat_template(messages)
    assert smollm2.tok_encode(rendered) != encode_chatml(tokenizer, messages, add_generation_prompt=True)  # typed
    clean = [m for m in messages if "<|" not in m["content"]]  # text holding a marker: as HF tokenizers, an id
    assert smollm2.tok_encode(smollm2.apply_chat_template(clean)) == encode_chatml(tokenizer, clean, True)
    prefill = clean + [{"role": "assistant", "content": "The answer"}]
    assert smollm2.tok_encode(smollm2.apply_chat_template(prefill, add_generation_prompt=False)) == \
        encode_chatml(tokenizer, prefill)[:-2]  # the last turn stays open: no <|im_end|>, no newline
    assert smollm2.tok_encode(CHATML_QUESTION) == build_chat_input(tokenizer, "What is the capital of France?",
                                                                    system=None)
    assert smollm2.chat_template(True) == CHATML_TEMPLATE and smollm2.chat_template(False) is None


# Batches: the same scores as one request at a time, in request order.

def test_batches_equal_one_by_one_property(tiny_models, data_dir):
    one, batched = QwenQuantLM(tiny_models[0], batch_size=1), QwenQuantLM(tiny_models[0], batch_size=7)
    words, rng = wiki_words(data_dir), random.Random(0)
    pairs = []
    for _ in range(40):
        start = rng.randrange(len(words) - 120)
        cut = rng.randrange(0, 60)  # 0: an empty context
        length = rng.randrange(1, 30)  # within max_length (64) with the context cut from the left
        pairs.append((" ".join(words[start:start + cut]), " " + " ".join(words[start + cut:start + cut + length])))
    alone = [one.loglikelihood(requests("loglikelihood", pair), disable_tqdm=True)[0] for pair in pairs]
    together = batched.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    assert all(close(a[0], b[0]) and a[1] == b[1] for a, b in zip(alone, together))
    documents = [(" ".join(words[s:s + rng.randrange(1, 200)]),) for s in rng.sample(range(len(words) - 200), 8)]
    alone = [one.loglikelihood_rolling(requests("loglikelihood_rolling", d), disable_tqdm=True)[0] for d in documents]
    together = batched.loglikelihood_rolling(requests("loglikelihood_rolling", *documents), disable_tqdm=True)
    assert all(close(a, b) for a, b in zip(alone, together))


def test_int4_batches_equal_one_by_one(smollm2_int4, data_dir):
    words = wiki_words(data_dir)
    pairs = [(" ".join(words[s:s + n]), " " + " ".join(words[s + n:s + n + m]))
             for s, n, m in ((0, 3, 9), (40, 12, 2), (90, 1, 5), (130, 7, 7))]
    together = smollm2_int4.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    for pair, score in zip(pairs, together):
        alone = smollm2_int4.loglikelihood(requests("loglikelihood", pair), disable_tqdm=True)[0]
        assert close(alone[0], score[0], smollm2_int4.model.dtype) and alone[1] == score[1]


# Model arguments, the registry, and models without a text tokenizer.

@pytest.mark.parametrize("arguments, error, message", [
    ("batch_size=auto", ValueError, r"batch_size='auto' must be a positive integer"),
    ("max_length=0", ValueError, "max_length=0 must be a positive integer"),
    ("max_length=65", ValueError, r"max_length 65 is past the model's seq_length \(64\)"),
    ("max_gen_toks=true", ValueError, "max_gen_toks=True must be a positive integer"),
    ("batch_size=2,colour=red", TypeError, "colour"),
])
def test_model_args_are_checked(tiny_models, arguments, error, message):
    with pytest.raises(error, match=message):
        QwenQuantLM.create_from_arg_string(f"pretrained={tiny_models[0]},{arguments}")


def test_registered_in_lm_eval_beside_its_own_models(tiny_models):
    assert get_model("qwen_quant") is QwenQuantLM and "hf" in model_registry
    # As lm_eval's command line makes it: --batch_size and --device beside model_args, the batch size as text.
    lm = QwenQuantLM.create_from_arg_string(f"pretrained={tiny_models[0]},max_length=48",
                                            {"device": "cpu", "batch_size": "3", "max_batch_size": None})
    assert (lm.batch_size, lm.max_length, lm.max_gen_toks, str(lm.device)) == (3, 48, 256, "cpu")
    with pytest.raises(TypeError, match="pretrained must be a model folder"):
        QwenQuantLM(None)


def test_stories_has_no_text_tokenizer(stories_dir):
    with pytest.raises(ValueError, match="has no text tokenizer"):
        QwenQuantLM(stories_dir)


# The local tasks and `qwen-quantize eval --tasks`.

def test_local_wikitext_is_the_62_test_articles(data_dir):
    sys.path.insert(0, str(TASKS))
    try:
        from wikitext2_local import articles
    finally:
        sys.path.remove(str(TASKS))
    pages = articles()["test"]["page"]
    raw = (data_dir / "wikitext2" / "raw_test_nonempty_lines" / "wiki.test.raw").read_text(encoding="utf-8")
    assert len(pages) == 62 and pages[0].startswith(" = Robert Boulter = \n") and "".join(pages) == raw.replace(
        "\r\n", "\n")
    with pytest.raises(FileNotFoundError, match="QWEN_QUANT_DATA"):
        articles(wikitext_file=data_dir / "no_such_file")


def test_cli_tasks_table_on_smollm2(smollm2_dir, capsys):
    code, err, out = run_cli(["eval", str(smollm2_dir), "--tasks", "capitals_chatml,capitals_choice", "--limit", "2",
                              "--include-path", str(TASKS), "--batch-size", "16"], capsys)
    assert code == 0, err
    header, *rows = [line.split() for line in out.strip().splitlines()]
    assert header == ["task", "metric", "n", "value", "stderr"]  # --tasks without --dataset: the table alone
    assert rows[0][:4] == ["capitals_chatml", "names_capital", "2", "1.0000"]  # Paris, Tokyo
    assert [row[:3] for row in rows[1:]] == [["capitals_choice", "acc", "2"], ["capitals_choice", "acc_norm", "2"]]
    assert all(0 <= float(row[3]) <= 1 for row in rows[1:])


def test_cli_perplexity_then_tasks_beside_a_baseline(tiny_models, data_dir, tmp_path, capsys):
    text = " ".join(wiki_words(data_dir)[:400])
    (tmp_path / "wiki.txt").write_text(text, encoding="utf-8")
    code, err, out = run_cli(["eval", str(tiny_models[0]), "--dataset", str(tmp_path / "wiki.txt"), "--seqlen", "32",
                              "--tasks", "wikitext2_local", "--include-path", str(TASKS), "--limit", "1",
                              "--baseline", str(tiny_models[1]), "--batch-size", "8"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "perplexity" in lines[0] and lines[2].startswith("increase:")  # perplexity first
    assert lines[3].split() == ["task", "metric", "n", "value", "stderr", "baseline", "difference"]
    rows = {line.split()[1]: [float(v) for v in line.split()[3:]] for line in lines[4:]}
    assert set(rows) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for value, baseline, difference in rows.values():  # no stderr for these metrics
        assert abs(value - baseline - difference) < 2e-4
    # bits per byte is log2 of byte perplexity (both from one loglikelihood and the article's bytes)
    assert abs(math.log2(rows["byte_perplexity"][0]) - rows["bits_per_byte"][0]) < 1e-3


def test_cli_task_errors(tiny_models, tmp_path, capsys, monkeypatch):
    code, err, _ = run_cli(["eval", str(tiny_models[0]), "--tasks", "capitals_chatmll", "--include-path", str(TASKS)],
                           capsys)
    assert code == 2 and "qwen-quantize: error: unknown task 'capitals_chatmll'" in err
    assert "did you mean capitals_chatml" in err
    code, err, _ = run_cli(["eval", str(tiny_models[0]), "--tasks", "x", "--include-path", str(tmp_path / "no")],
                           capsys)
    assert code == 2 and "--include-path" in err and "no such folder" in err
    for argv, message in ((["--limit", "3"], "--limit and --include-path go with --tasks"),
                          (["--tasks", "a,,b"], "none of them empty"),
                          (["--tasks", "a", "--limit", "0"], "at least 1")):
        code, err, _ = run_cli(["eval", str(tiny_models[0]), *argv], capsys)
        assert code == 2 and message in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    monkeypatch.delitem(sys.modules, "qwen_quant.harness")
    code, err, _ = run_cli(["eval", str(tiny_models[0]), "--tasks", "capitals_chatml"], capsys)
    assert code == 2 and 'pip install "qwen_quant[eval]"' in err


def test_results_table_columns():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "ppl,strict": 3.0,
                                 "ppl_stderr,strict": "N/A"}}, "n-samples": {"t": {"original": 9, "effective": 4}}}
    base = {"results": {"t": {"acc,none": 0.75, "ppl,strict": 2.5}}}
    lines = results_table(results, base).splitlines()
    assert [line.split() for line in lines[1:]] == [["t", "acc", "4", "0.5000", "0.1000", "0.7500", "-0.2500"],
                                                    ["t", "ppl", "(strict)", "4", "3.0000", "2.5000", "+0.5000"]]
