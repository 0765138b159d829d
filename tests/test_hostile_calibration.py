"""Hostile calibration data (issue 22, the second hostile pass): token ids are checked by one rule whatever holds
them (a torch tensor, a numpy array, a .npy file, a list or a list of sequences), a .jsonl line of any JSON is a
clear error naming the file and the line, and get_calibration_data's own arguments are checked by type first."""
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from qwen_quant.calibration import get_calibration_data
from qwen_quant.quantize import quantize
from qwen_quant.synthetic import save_random_checkpoint
from qwen_quant.tokenizer import QwenTokenizer
from cli_runner import run_cli
from tiny_model import tiny_config

GOOD_CHAT = '{"messages": [{"role": "user", "content": "hello"}]}'


@pytest.fixture(scope="module")
def tokenizer(tiktoken_file):
    return QwenTokenizer.from_pretrained(tiktoken_file)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("dense"), tiny_config())


def is_window_of(row: list, sequence: list) -> bool:
    return any(sequence[start:start + len(row)] == row for start in range(len(sequence) - len(row) + 1))


# --- finding 1: floats and bools are refused by type, whatever holds them ----------------------------------------

@pytest.mark.parametrize("source, name", [
    (torch.tensor([1.7, 2.2, 300.9] * 6), "the torch tensor of token ids"),
    (torch.arange(18, dtype=torch.float32), "the torch tensor of token ids"),  # whole floats are not ids either
    (torch.arange(16, dtype=torch.float32).reshape(2, 8), "the torch tensor of token ids"),
    (torch.ones(18, dtype=torch.bool), "the torch tensor of token ids"),
    (torch.arange(18, dtype=torch.bfloat16), "the torch tensor of token ids"),
    (torch.arange(18).to(torch.complex64), "the torch tensor of token ids"),
    ([[True, False] * 9, [False, True] * 9], "token-id sequence 0"),
    ([list(range(18)), [1.0] * 18], "token-id sequence 1"),
    ([True] * 18, "the list of token ids"),
    (list(range(17)) + [17.0], "the list of token ids"),
])
def test_floats_and_bools_are_refused_not_truncated(source, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        get_calibration_data(source, nsamples=2, seqlen=8)


def test_every_integer_dtype_gives_its_ids_exactly():
    ids = [[0, 1, 7, 100], [127, 3, 0, 5]]
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                  torch.uint64):
        samples = get_calibration_data(torch.tensor(ids, dtype=dtype), nsamples=2, seqlen=4)
        assert samples.dtype == torch.int64 and samples.tolist() == ids
    for dtype in (np.uint8, np.int8, np.uint16, np.int32, np.uint64, ">i4"):
        samples = get_calibration_data(np.array(ids, dtype=dtype), nsamples=2, seqlen=4)
        assert samples.dtype == torch.int64 and samples.tolist() == ids


def test_uint64_ids_beyond_int64_and_negative_tensor_ids_are_refused():
    with pytest.raises(ValueError, match="the numpy array of token ids holds token ids beyond int64"):
        get_calibration_data(np.array([2**63 + 1] * 4, dtype=np.uint64), nsamples=1, seqlen=4)
    with pytest.raises(ValueError, match="the list of token ids holds a token id beyond int64"):
        get_calibration_data([2**64] * 4, nsamples=1, seqlen=4)
    with pytest.raises(ValueError, match="the torch tensor of token ids holds negative token ids"):
        get_calibration_data(torch.tensor([[1, -2], [3, 4]]), nsamples=2, seqlen=2)


def test_tensors_without_plain_values_are_refused_by_layout():
    for tensor, kind in ((torch.arange(8).to_sparse(), "sparse_coo"), (torch.empty(8, dtype=torch.long,
                                                                                   device="meta"), "strided")):
        with pytest.raises(ValueError, match=f"the torch tensor of token ids must be a dense tensor of token ids, "
                                             f"got a {kind} tensor"):
            get_calibration_data(tensor, nsamples=1, seqlen=4)


def test_quantize_refuses_a_float_calibration_tensor_before_writing_the_output(dense_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=re.escape("the torch tensor of token ids must hold a 1-D or 2-D array of "
                                                   "integer token ids, got torch.float32 of shape (2, 16)")):
        quantize(dense_checkpoint, tmp_path / "out", bits=4, group_size=32, calibration=torch.arange(32.0).view(2, 16) * 7.5,
                 nsamples=2, seqlen=16, progress=False)
    assert not (tmp_path / "out").exists()


# --- finding 2: a sequence must be a flat list of ints --------------------------------------------------------------

def test_three_level_nested_list_names_the_sequence():
    with pytest.raises(ValueError, match=re.escape("token-id sequence 0 must be a flat list of int token ids, but its "
                                                   "element 0 is list")):
        get_calibration_data([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], nsamples=2, seqlen=2)
    with pytest.raises(ValueError, match="token-id sequence 1 must be a list of ints, a numpy array or a tensor"):
        get_calibration_data([[1, 2, 3], "456"], nsamples=1, seqlen=2)


def test_flat_list_of_ints_is_a_stream():
    stream = list(range(100, 140))
    samples = get_calibration_data(stream, nsamples=5, seqlen=8, seed=3)
    assert samples.shape == (5, 8) and all(is_window_of(row, stream) for row in samples.tolist())


# --- finding 3: a 2-D .npy is windows, in the Python API and the CLI alike -----------------------------------------

def test_two_d_npy_is_windows_used_as_is(tmp_path):
    windows = np.random.default_rng(0).integers(0, 512, (3, 16)).astype(np.int32)
    np.save(tmp_path / "windows.npy", windows)
    samples = get_calibration_data(tmp_path / "windows.npy", nsamples=3, seqlen=16)
    assert samples.dtype == torch.int64 and samples.tolist() == windows.tolist()
    assert torch.equal(samples, get_calibration_data(windows, nsamples=3, seqlen=16))
    with pytest.raises(ValueError, match=re.escape(f"file {tmp_path / 'windows.npy'} is 2-D, windows used as they "
                                                   "are, so its shape must be [nsamples=2, seqlen=16], got (3, 16)")):
        get_calibration_data(tmp_path / "windows.npy", nsamples=2, seqlen=16)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="cube.npy must hold a 1-D or 2-D array of integer token ids"):
        get_calibration_data(tmp_path / "cube.npy", nsamples=2, seqlen=4)


def test_two_d_npy_header_is_checked_against_the_file_size(tmp_path):
    path = tmp_path / "forged.npy"
    with open(path, "wb") as f:  # 2**40 windows of 1024 int64 ids claimed, 80 bytes present
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (2**40, 1024)})
        f.write(np.arange(10, dtype=np.int64).tobytes())
    with pytest.raises(ValueError, match=rf"forged.npy: its header claims {2**50} ids of int64 \({2**53} bytes\), "
                                         r"but the file holds only 80 bytes"):
        get_calibration_data(path, nsamples=2**40, seqlen=1024)


def test_cli_quantizes_with_a_two_d_npy_and_names_it_when_its_shape_is_wrong(dense_checkpoint, tmp_path, capsys):
    npy = tmp_path / "windows.npy"
    np.save(npy, np.random.default_rng(1).integers(0, 512, (2, 16)))
    argv = ["--bits", "4", str(dense_checkpoint), "--dataset", str(npy), "--group-size", "32", "--seqlen", "16",
            "--device", "cpu", "--no-mse", "--refine-passes", "0", "--asym-calibration", "0"]  # the fastest GPTQ
    code, err, _ = run_cli(argv + ["--nsamples", "3", "--output", str(tmp_path / "wrong")], capsys)
    assert code == 2
    assert f"qwen-quantize: error: file {npy} is 2-D, windows used as they are, so its shape must be [nsamples=3, " \
           "seqlen=16], got (2, 16)" in err
    assert not (tmp_path / "wrong").exists()
    code, err, _ = run_cli(argv + ["--nsamples", "2", "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").is_file()


# --- finding 4: every fault of a .jsonl line names the file and the line -------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("[" * 100_000, "the line nests its JSON arrays or objects too deeply"),
    ('{"messages": [' * 50_000, "the line nests its JSON arrays or objects too deeply"),
    (b"\xff\xfe{}", "the line is not UTF-8 text"),
    ("{'messages': []}", "the line is not valid JSON"),
    (GOOD_CHAT + " trailing", "the line is not valid JSON"),
    ("1" * 5000, ""),  # an int of too many digits for Python to convert
    ("5", "a conversation must be a JSON object, got a number"),
    ("null", "a conversation must be a JSON object, got null"),
    ("[1, 2]", "a conversation must be a JSON object, got an array"),
    ('"text"', "a conversation must be a JSON object, got a string"),
    ("{}", "needs a 'messages' or 'conversations' list, got keys []"),
    ('{"messages": 5}', "'messages' must be a list of messages, got a number"),
    ('{"messages": null}', "'messages' must be a list of messages, got null"),
    ('{"messages": "hi"}', "'messages' must be a list of messages, got a string"),
    ('{"messages": {"role": "user", "content": "x"}}', "'messages' must be a list of messages, got an object"),
    ('{"conversations": true}', "'conversations' must be a list of messages, got true/false"),
    ('{"messages": [7]}', "message 0 must be a JSON object, got a number"),
    ('{"messages": [[{"role": "user", "content": "x"}]]}', "message 0 must be a JSON object, got an array"),
    ('{"messages": [{"role": "user", "content": "x"}, null]}', "message 1 must be a JSON object, got null"),
    ('{"messages": [{"content": "x"}]}', "message 0 lacks the key 'role'"),
    ('{"messages": [{"role": "user"}]}', "message 0 lacks the key 'content'"),
    ('{"messages": [{"role": ["user"], "content": "x"}]}', "message 0: 'role' must be a string, got an array"),
    ('{"messages": [{"role": {"a": 1}, "content": "x"}]}', "message 0: 'role' must be a string, got an object"),
    ('{"messages": [{"role": "user", "content": 3.5}]}', "message 0: 'content' must be a string, got a number"),
    ('{"messages": [{"role": "user", "content": null}]}', "message 0: 'content' must be a string, got null"),
    ('{"messages": [{"role": "user", "content": ["a"]}]}', "message 0: 'content' must be a string, got an array"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "message 0: role 'bot' is not one of"),
    ('{"conversations": [{"from": ["human"], "value": "x"}]}', "message 0: 'from' must be a string, got an array"),
    ('{"conversations": [{"from": "human", "value": {}}]}', "message 0: 'value' must be a string, got an object"),
    ('{"conversations": ["hi"]}', "message 0 must be a JSON object, got a string"),
    ('{"conversations": [{"from": "robot", "value": "x"}]}', "unknown ShareGPT speaker 'robot'"),
])
def test_malformed_jsonl_lines_are_errors_naming_file_and_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(GOOD_CHAT.encode() + b"\n\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        get_calibration_data(path, tokenizer, nsamples=1, seqlen=4)


def test_quoted_values_from_a_jsonl_line_are_cut_short(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "x" * 100_000, "content": "y"}]}) + "\n")
    with pytest.raises(ValueError) as e:
        get_calibration_data(path, tokenizer, nsamples=1, seqlen=4)
    assert str(e.value).startswith(f"{path}:1: message 0: role 'xxx") and len(str(e.value)) < 300


# --- finding 5: an empty or all-whitespace text file is an error ---------------------------------------------------

@pytest.mark.parametrize("content", [b"", b" \n\t\r\n  ", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n\n  \n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_or_whitespace_files_are_errors(tokenizer, tmp_path, content, suffix):
    path = tmp_path / f"calib{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path} is empty")):
        get_calibration_data(path, tokenizer, nsamples=1, seqlen=4)


# --- get_calibration_data's own arguments: types before values -----------------------------------------------------

@pytest.mark.parametrize("argument, value, error, message", [
    ("nsamples", True, TypeError, "nsamples must be an int, got bool"),
    ("nsamples", 2.0, TypeError, "nsamples must be an int, got float"),
    ("seqlen", "8", TypeError, "seqlen must be an int, got str"),
    ("seqlen", np.int64(8), TypeError, "seqlen must be an int, got int64"),
    ("seed", None, TypeError, "seed must be an int, got NoneType"),
    ("seed", 1.5, TypeError, "seed must be an int, got float"),
    ("nsamples", 0, ValueError, "nsamples must be positive, got 0"),
    ("seqlen", -3, ValueError, "seqlen must be positive, got -3"),
    ("seed", -1, ValueError, "seed must be in [0, 2**64), got -1"),
    ("seed", 2**64, ValueError, f"seed must be in [0, 2**64), got {2**64}"),
])
def test_sampling_arguments_are_checked_by_type_then_value(argument, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        get_calibration_data(list(range(32)), **{"nsamples": 2, "seqlen": 8, argument: value})


def test_largest_seed_is_taken():
    assert get_calibration_data(list(range(32)), nsamples=2, seqlen=8, seed=2**64 - 1).shape == (2, 8)


# --- the rule as a property: random inputs give the exact ids or a clear error naming the source -------------------

TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.complex64]
NUMPY_DTYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int32, np.int64, np.uint64, np.float16, np.float32,
                np.float64, object, ">i4"]
BAD_LIST_ELEMENTS = [True, False, 2.0, 3.5, None, "7", [1], math.nan]


def is_integer_dtype(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.issubdtype(np.dtype(dtype), np.integer)


def is_signed(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype.is_signed
    return dtype is object or np.dtype(dtype).kind in "if"


def nested(ids: list, shape: tuple):
    """ids as nested lists of `shape` (row-major)."""
    if len(shape) == 1:
        return list(ids)
    step = math.prod(shape[1:])
    return [nested(ids[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


class Draw:
    """Random calibration sources from a seeded generator. A clean draw holds only valid ids (integer types, none
    negative, not empty); another may hold anything. Each draw returns (source, ids, valid): the ids it holds
    (row-major) and whether the rule takes them as ids, the window sizes aside."""

    def __init__(self, rng: random.Random):
        self.rng, self.clean = rng, False

    def ids(self, count: int, signed: bool) -> list:
        """count ids that fit any dtype drawn (0..100), one sometimes negative where the dtype can hold it."""
        ids = [self.rng.randint(0, 100) for _ in range(count)]
        if count and signed and not self.clean and self.rng.random() < 0.15:
            ids[self.rng.randrange(count)] = -self.rng.randint(1, 5)
        return ids

    def length(self, least: int) -> int:
        return self.rng.randint(least, least + 12) if self.clean else self.rng.choice([0, self.rng.randint(1, 16)])

    def shape(self, seqlen: int) -> tuple:
        if self.clean:
            return self.rng.choice([(self.length(seqlen),), (self.rng.randint(1, 4), seqlen)])
        return tuple(self.rng.choice([0] + [self.rng.randint(1, 12)] * 8) for _ in range(self.rng.choice([1, 2, 3])))

    def array(self, shape: tuple, kind: str) -> tuple:
        """A torch tensor or numpy array of a random dtype, sometimes not contiguous."""
        dtype = self.rng.choice([d for d in (TORCH_DTYPES if kind == "torch" else NUMPY_DTYPES)
                                 if is_integer_dtype(d) or not self.clean])
        ids = self.ids(math.prod(shape), is_signed(dtype))
        huge = dtype == np.uint64 and bool(ids) and not self.clean and self.rng.random() < 0.3
        if huge:
            ids[0] = 2**63 + 1  # fits uint64, not int64
        if kind == "torch":
            array = torch.tensor(nested(ids, shape), dtype=dtype).reshape(shape)
            if len(shape) == 2 and self.rng.random() < 0.5:
                array = array.T.contiguous().T  # the same values, not contiguous
        else:
            array = np.array(nested(ids, shape), dtype=dtype).reshape(shape)
            if len(shape) == 1 and self.rng.random() < 0.5:
                array = np.ascontiguousarray(array[::-1])[::-1]  # the same values, a negative stride
        valid = (is_integer_dtype(dtype) and len(shape) in (1, 2) and math.prod(shape) > 0 and min(ids) >= 0
                 and not huge)
        return array, ids, valid

    def flat_list(self, length: int) -> tuple:
        """A flat list of ints, sometimes with one element that is not an id."""
        ids = self.ids(length, signed=True)
        values = list(ids)
        bad = bool(length) and not self.clean and self.rng.random() < 0.2
        if bad:
            values[self.rng.randrange(length)] = self.rng.choice(BAD_LIST_ELEMENTS)
        return values, ids, length > 0 and not bad and min(ids) >= 0

    def case(self) -> dict:
        """A source, its window sizes, the name its error must give, and what valid samples must be (None: it must
        be refused): ("rows", the rows exactly) or ("windows of", sequences each row must be a window of)."""
        rng = self.rng
        self.clean = rng.random() < 0.4
        kind = rng.choice(["torch", "numpy", "list", "sequences", "nested"])
        nsamples, seqlen = rng.randint(1, 4), rng.randint(1, 8)
        if kind in ("torch", "numpy"):
            shape = self.shape(seqlen)
            if len(shape) == 2 and min(shape) > 0 and rng.random() < 0.7:
                nsamples, seqlen = shape
            source, ids, valid = self.array(shape, kind)
            name = f"the {'torch tensor' if kind == 'torch' else 'numpy array'} of token ids"
            if len(shape) == 2:
                valid, expected = valid and shape == (nsamples, seqlen), ("rows", nested(ids, shape))
            else:
                valid, expected = valid and len(ids) >= seqlen, ("windows of", [ids])
        elif kind == "list":
            source, ids, valid = self.flat_list(self.length(seqlen))
            valid = valid and len(ids) >= seqlen
            # A list holding a list is a list of sequences, and its ints the faulty sequences.
            name = "token-id sequence" if any(isinstance(item, list) for item in source) else "the list of token ids"
            expected = ("windows of", [ids])
        elif kind == "sequences":
            source, sequences, valid = [], [], True
            for _ in range(rng.randint(nsamples if self.clean else 1, 5)):
                if rng.random() < 0.3:
                    sequence, ids, fine = self.array((self.length(seqlen),), rng.choice(["torch", "numpy"]))
                else:
                    sequence, ids, fine = self.flat_list(self.length(seqlen))
                source.append(sequence)
                sequences.append(ids)
                valid = valid and fine and len(ids) >= seqlen
            name, valid = "token-id sequence", valid and len(source) >= nsamples
            expected = ("windows of", sequences)
        else:  # lists of lists of lists: a sequence must be flat
            source = [[[rng.randint(0, 100)] * 2 for _ in range(3)] for _ in range(rng.randint(1, 3))]
            name, valid, expected = "token-id sequence 0 must be a flat list", False, None
        return dict(source=source, nsamples=nsamples, seqlen=seqlen, name=name, expected=expected if valid else None)


def are_the_given_ids(rows: list, expected: tuple) -> bool:
    kind, ids = expected
    if kind == "rows":
        return rows == ids
    return all(any(is_window_of(row, sequence) for sequence in ids) for row in rows)


def test_random_calibration_inputs_give_their_ids_exactly_or_an_error_naming_the_source():
    draw = Draw(random.Random(0))
    outcomes = {"valid": 0, "refused": 0}
    for case_index in range(200):
        case = draw.case()
        context = f"case {case_index}: {case['source']!r} nsamples={case['nsamples']} seqlen={case['seqlen']}"
        try:
            samples = get_calibration_data(case["source"], nsamples=case["nsamples"], seqlen=case["seqlen"],
                                           seed=case_index)
        except (ValueError, TypeError) as e:
            assert case["expected"] is None, f"{context}: refused valid ids: {e}"
            assert case["name"] in str(e), f"{context}: the error does not name the source: {e}"
            outcomes["refused"] += 1
            continue
        assert case["expected"] is not None, f"{context}: took invalid ids, giving {samples.tolist()}"
        assert samples.dtype == torch.int64 and tuple(samples.shape) == (case["nsamples"], case["seqlen"]), context
        assert are_the_given_ids(samples.tolist(), case["expected"]), f"{context}: not the given ids: {samples}"
        outcomes["valid"] += 1
    assert min(outcomes.values()) >= 50, outcomes  # both outcomes are well exercised
