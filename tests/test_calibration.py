import json
import re

import numpy as np
import pytest
import torch

from qwen_quant import calibration
from qwen_quant.calibration import get_calibration_data
from qwen_quant.tokenizer import QwenTokenizer, encode_chatml


@pytest.fixture(scope="module")
def tokenizer(tiktoken_file):
    return QwenTokenizer.from_pretrained(tiktoken_file)


@pytest.fixture(scope="module")
def calib_ids(stories_dir):
    return np.load(stories_dir / "calib_ids.npy").astype(np.int64)


@pytest.fixture(scope="module")
def chinese_txt(data_dir, tmp_path_factory):
    """Plain Chinese text from the `# text = ` lines of a UD treebank (the .conllu itself is not plain text)."""
    conllu = (data_dir / "calib_zh/ud_chinese_gsdsimp/zh_gsdsimp-ud-test.conllu").read_text(encoding="utf-8")
    sentences = re.findall(r"^# text = (.*)$", conllu, flags=re.MULTILINE)
    path = tmp_path_factory.mktemp("calib") / "zh.txt"
    path.write_text("\n".join(sentences), encoding="utf-8")
    return path


def window_starts(samples: torch.Tensor, stream) -> list:
    """Where each row of samples starts as a contiguous slice of stream (None for a row that is not one)."""
    stream = np.asarray(stream, dtype=np.int64)
    if len(stream) < samples.shape[1]:
        return [None] * len(samples)
    windows = np.lib.stride_tricks.sliding_window_view(stream, samples.shape[1])
    starts = []
    for row in samples.numpy():
        candidates = np.flatnonzero(windows[:, 0] == row[0])
        matches = candidates[(windows[candidates] == row).all(axis=1)]
        starts.append(int(matches[0]) if len(matches) else None)
    return starts


def test_npy_windows(stories_dir, calib_ids):
    samples = get_calibration_data(stories_dir / "calib_ids.npy", nsamples=128, seqlen=128, seed=0)
    assert samples.shape == (128, 128) and samples.dtype == torch.int64
    starts = window_starts(samples, calib_ids)
    assert None not in starts
    assert len(set(starts)) > 100  # random starts spread over the file, not one window repeated


def test_same_seed_same_samples_other_seed_other_samples(stories_dir):
    path = stories_dir / "calib_ids.npy"
    first = get_calibration_data(path, nsamples=16, seqlen=128, seed=0)
    assert torch.equal(first, get_calibration_data(path, nsamples=16, seqlen=128, seed=0))
    assert not torch.equal(first, get_calibration_data(path, nsamples=16, seqlen=128, seed=1))


def test_seeded_sampling_leaves_global_random_state_alone(stories_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_calibration_data(stories_dir / "calib_ids.npy", nsamples=4, seqlen=64, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_txt_is_tokenized_once_as_one_stream(tokenizer, chinese_txt):
    samples = get_calibration_data(chinese_txt, tokenizer, nsamples=8, seqlen=256, seed=3)
    assert samples.shape == (8, 256) and samples.dtype == torch.int64
    assert None not in window_starts(samples, tokenizer.encode(chinese_txt.read_text(encoding="utf-8")))


def test_txt_strips_bom_and_normalises_crlf(tokenizer, tmp_path):
    text = "第一行\n第二行 with English\n" * 20
    plain, windows_crlf = tmp_path / "lf.txt", tmp_path / "bom_crlf.txt"
    plain.write_bytes(text.encode("utf-8"))
    windows_crlf.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    seqlen = len(tokenizer.encode(text))  # exactly one window: the whole text
    assert torch.equal(get_calibration_data(windows_crlf, tokenizer, nsamples=1, seqlen=seqlen),
                       get_calibration_data(plain, tokenizer, nsamples=1, seqlen=seqlen))


def test_jsonl_chats_in_both_formats_render_as_one_chatml_stream(tokenizer, tmp_path):
    openai_style = {"messages": [{"role": "system", "content": "你是一个助手。"},
                                 {"role": "user", "content": "1+1=?"},
                                 {"role": "assistant", "content": "2"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Say <|im_end|> please"},
                                  {"from": "gpt", "value": "<|im_end|>"}]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(openai_style, ensure_ascii=False) + "\n\n" + json.dumps(sharegpt) + "\n",
                    encoding="utf-8")
    expected = encode_chatml(tokenizer, openai_style["messages"]) + encode_chatml(tokenizer, [
        {"role": "system", "content": "You are a helpful assistant."},  # added: the conversation has none
        {"role": "user", "content": "Say <|im_end|> please"},
        {"role": "assistant", "content": "<|im_end|>"}])
    samples = get_calibration_data(path, tokenizer, nsamples=1, seqlen=len(expected))
    assert samples.tolist() == [expected]
    # Only the template's markers are special: the typed "<|im_end|>" stays text.
    assert expected.count(tokenizer.im_end_id) == 6


def test_jsonl_errors_name_file_and_line(tokenizer, tmp_path):
    cases = {
        '{"conversations": [{"from": "bot", "value": "x"}]}': "unknown ShareGPT speaker 'bot'",
        '{"messages": [{"role": "user"}]}': "lacks the key 'content'",
        '{"text": "hello"}': "needs a 'messages' or 'conversations' list",
        '{"messages": [': "Expecting",
    }
    for line, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n' + line + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
            get_calibration_data(path, tokenizer, nsamples=1, seqlen=4)


def test_list_of_sequences_gives_one_window_per_chosen_sequence(calib_ids):
    sequences = [calib_ids[i * 1000:i * 1000 + 200 + i].tolist() for i in range(10)]
    sequences[3] = torch.tensor(sequences[3])  # 1-D tensors are accepted too
    samples = get_calibration_data(sequences, nsamples=10, seqlen=150, seed=0)
    assert samples.shape == (10, 150) and samples.dtype == torch.int64
    # nsamples == number of sequences: each sequence gives exactly one window.
    owners = [[i for i, sequence in enumerate(sequences) if window_starts(samples[r:r + 1], sequence)[0] is not None]
              for r in range(10)]
    assert sorted(owners) == [[i] for i in range(10)]
    with pytest.raises(ValueError, match="fewer than nsamples=11"):
        get_calibration_data(sequences, nsamples=11, seqlen=150)
    with pytest.raises(ValueError, match="sequence 0 has 200 tokens, fewer than seqlen=201"):
        get_calibration_data(sequences, nsamples=2, seqlen=201)


def test_two_d_tensor_is_used_as_is():
    ids = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    samples = get_calibration_data(ids, nsamples=3, seqlen=4)
    assert samples.dtype == torch.int64 and torch.equal(samples, ids.long())
    with pytest.raises(ValueError, match=re.escape("the torch tensor of token ids is 2-D, windows used as they are, so "
                                                   "its shape must be [nsamples=2, seqlen=4], got (3, 4)")):
        get_calibration_data(ids, nsamples=2, seqlen=4)


def test_numpy_arrays_of_ids(stories_dir, calib_ids):
    from_file = get_calibration_data(stories_dir / "calib_ids.npy", nsamples=16, seqlen=128, seed=3)
    for stream in (np.load(stories_dir / "calib_ids.npy"), torch.from_numpy(calib_ids)):  # int32 array, 1-D tensor
        assert torch.equal(get_calibration_data(stream, nsamples=16, seqlen=128, seed=3), from_file)
    windows = calib_ids[:512].reshape(4, 128).astype(np.uint16)
    samples = get_calibration_data(windows, nsamples=4, seqlen=128)
    assert samples.dtype == torch.int64 and samples.tolist() == windows.tolist()
    for bad, message in ((np.zeros((2, 2, 2), dtype=np.int64), r"1-D or 2-D array .* shape \(2, 2, 2\)"),
                         (np.ones(300, dtype=np.float32), "integer token ids, got float32"),
                         (np.array([5, -1, 3] * 100), "negative token ids"),
                         (np.zeros(0, dtype=np.int64), "numpy array of token ids is empty")):
        with pytest.raises(ValueError, match=message):
            get_calibration_data(bad, nsamples=1, seqlen=16)


def test_list_of_strings_is_one_text_stream(tokenizer):
    texts = ["一二三四五六七八九十" * 5, "Hello world. " * 20, "def f(x):\n    return x\n" * 5]
    samples = get_calibration_data(texts, tokenizer, nsamples=6, seqlen=24)
    stream = tokenizer.encode("\n\n".join(texts))
    starts = window_starts(samples, stream)
    assert None not in starts and max(starts) > len(tokenizer.encode(texts[0]))  # windows beyond the first text
    with pytest.raises(ValueError, match="'list of strings' is text and needs a tokenizer"):
        get_calibration_data(texts, nsamples=1, seqlen=8)


def test_wikitext2_joins_rows_like_gptq(tokenizer, data_dir, monkeypatch):
    # Offline here: stand in for the Hub's train split with real WikiText rows, to check the join and the windows.
    rows = (data_dir / "wikitext2/raw_test_nonempty_lines/wiki.test.raw").read_bytes().decode("utf-8").split("\r\n")
    rows = rows[:200]
    monkeypatch.setattr(calibration, "load_hub_dataset", lambda name: {"text": rows})
    samples = get_calibration_data("wikitext2", tokenizer, nsamples=4, seqlen=512, seed=0)
    assert None not in window_starts(samples, tokenizer.encode("\n\n".join(rows)))


def test_c4_takes_one_window_from_documents_longer_than_seqlen(tokenizer, monkeypatch):
    documents = [{"text": "short"}, {"text": "一二三四五六七八九十" * 30}, {"text": "Hello world. " * 100}]
    monkeypatch.setattr(calibration, "load_hub_dataset", lambda name: documents)
    samples = get_calibration_data("c4", tokenizer, nsamples=2, seqlen=64, seed=0)
    owners = [[i for i, d in enumerate(documents) if window_starts(samples[r:r + 1], tokenizer.encode(d["text"]))[0]
               is not None] for r in range(2)]
    assert sorted(owners) == [[1], [2]]
    with pytest.raises(ValueError, match="only 2 of 3 documents are longer than seqlen=64"):
        get_calibration_data("c4", tokenizer, nsamples=3, seqlen=64)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hub_dataset_offline_asks_for_a_local_path(tokenizer, name, monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    # The libraries read these at import, so patch their copies too; an empty cache rules out a cached copy.
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match=f"'{name}'.*pass a local .txt, .jsonl or .npy path"):
        get_calibration_data(name, tokenizer, nsamples=1, seqlen=16)


def test_source_errors(tokenizer, tmp_path, stories_dir):
    with pytest.raises(ValueError, match=re.escape("unknown calibration source 'pile': use a dataset name "
                                                   "('wikitext2', 'c4')")):
        get_calibration_data("pile", tokenizer)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.txt"))):
        get_calibration_data(tmp_path / "missing.txt", tokenizer)
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match="unsupported suffix"):
        get_calibration_data(tmp_path / "data.csv", tokenizer)
    for empty in ("empty.txt", "empty.jsonl"):
        (tmp_path / empty).write_text("\n" if empty.endswith("jsonl") else "")
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / empty} is empty")):
            get_calibration_data(tmp_path / empty, tokenizer)
    np.save(tmp_path / "empty.npy", np.zeros(0, dtype=np.int32))
    with pytest.raises(ValueError, match="is empty"):
        get_calibration_data(tmp_path / "empty.npy")
    np.save(tmp_path / "floats.npy", np.zeros(300, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D or 2-D array of integer token ids, got float32"):
        get_calibration_data(tmp_path / "floats.npy")
    with pytest.raises(ValueError, match="has 96238 tokens, fewer than one window of seqlen=100000"):
        get_calibration_data(stories_dir / "calib_ids.npy", seqlen=100_000)
    (tmp_path / "text.txt").write_text("some text")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        get_calibration_data(tmp_path / "text.txt")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        get_calibration_data("wikitext2")
