"""Calibration samples for GPTQ: always an int64 tensor [nsamples, seqlen] of token windows.

Sources (`source` of get_calibration_data):
- "wikitext2": the WikiText-2 raw train split from the Hugging Face Hub, rows joined with "\\n\\n" (as GPTQ does).
- "c4": the first C4 English train shard from the Hub; random documents longer than seqlen, one window each (as GPTQ).
- a `.txt` path: UTF-8 text (BOM stripped, CRLF -> LF), tokenized once as one stream.
- a `.jsonl` path of chats, one conversation a line, either {"messages": [{"role", "content"}, ...]} or ShareGPT
  {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}. Each is rendered as ChatML (the data Qwen
  calibrated its Int4/Int8 models with), with the default system prompt when it has none; the rendered conversations
  are concatenated into one stream, so a window may start or end inside a conversation.
- token ids (no tokenizer needed) in a `.npy` path, a numpy array, a torch tensor (any device) or a flat list of ints:
  1-D is a stream; 2-D is windows of shape [nsamples, seqlen], returned as they are (as an int64 tensor).
- a list of strings: texts joined with "\n\n" and tokenized as one stream, like a `.txt` file.
- a list of token-id sequences (flat lists of ints, 1-D arrays or 1-D tensors), each at least seqlen long: nsamples
  distinct sequences are chosen at random and one random window taken from each.
Token ids are checked by one rule, whatever holds them: an integer type (bool, float and complex are not ids, even
with whole values), none negative, not empty.
Windows of a stream start uniformly at random anywhere a whole window fits. The same seed gives the same samples; only
a local torch.Generator is used, never global random state.
"""
import codecs
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from qwen_quant.config import is_int
from qwen_quant.json_files import parse_json
from qwen_quant.tokenizer import CHAT_ROLES, DEFAULT_SYSTEM_PROMPT, Tokenizer, encode_chatml

HUB_DATASETS = ("wikitext2", "c4")
FILE_SUFFIXES = (".txt", ".jsonl", ".npy")
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# The torch dtypes of token ids: bool, float, complex and quantized tensors are refused by their type, before any
# value is read (.long() would floor 3.7 to 3 and make True the id 1).
TORCH_ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                   torch.uint64)
SEQUENCE_TYPES = (list, tuple, np.ndarray, torch.Tensor)  # what a token-id sequence in a list may be
INT64_MAX = np.iinfo(np.int64).max
SEED_RANGE = (0, 2**64)  # torch.Generator.manual_seed's seeds, as the CLI's --seed takes them (no negatives)
QUOTED_CHARS = 40  # an error quotes at most this much of a value from the user's file

Source = Union[str, Path, Sequence[str], Sequence[int], Sequence[Sequence[int]], torch.Tensor, np.ndarray]


def get_calibration_data(source: Source, tokenizer: Optional[Tokenizer] = None, nsamples: int = 128,
                         seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """Token windows int64 [nsamples, seqlen] from `source` (see the module docstring for the kinds of source)."""
    check_sampling(nsamples, seqlen, seed)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(source, (str, Path)):
        return windows_from_named_source(source, tokenizer, nsamples, seqlen, generator)
    if isinstance(source, (list, tuple)) and source and all(isinstance(text, str) for text in source):
        stream = encode_text(require_tokenizer(tokenizer, "list of strings"), source)
        return random_windows(stream, nsamples, seqlen, generator, f"the list of {len(source)} strings")
    if isinstance(source, (list, tuple)) and any(isinstance(item, SEQUENCE_TYPES) for item in source):
        return windows_from_sequences(source, nsamples, seqlen, generator)
    if isinstance(source, (list, tuple, np.ndarray, torch.Tensor)):
        what = f"the {array_kind(source)} of token ids"
        return windows_from_ids(token_ids(source, what, dims=(1, 2)), nsamples, seqlen, generator, what)
    raise TypeError(f"unsupported calibration source of type {type(source).__name__}: pass a dataset name "
                    f"{HUB_DATASETS}, a {'/'.join(FILE_SUFFIXES)} path, a list of strings or of token-id "
                    "sequences, or token ids in a list, a numpy array or a tensor (1-D or 2-D)")


def check_sampling(nsamples, seqlen, seed) -> None:
    """Types before values: True would pass as 1 and 2.0 as 2."""
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen), ("seed", seed)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")


def windows_from_named_source(source: Union[str, Path], tokenizer: Optional[Tokenizer], nsamples: int, seqlen: int,
                              generator: torch.Generator) -> torch.Tensor:
    """Windows from a Hub dataset name or a .txt / .jsonl / .npy path."""
    if isinstance(source, str) and source in HUB_DATASETS:
        tokenizer = require_tokenizer(tokenizer, source)
        dataset = load_hub_dataset(source)
        if source == "c4":
            return c4_windows(dataset, tokenizer, nsamples, seqlen, generator)
        return random_windows(encode_text(tokenizer, dataset["text"]), nsamples, seqlen, generator, "wikitext2")
    path = Path(source)
    if path.suffix not in FILE_SUFFIXES:
        if path.exists():
            raise ValueError(f"calibration file {path} has an unsupported suffix: use one of {FILE_SUFFIXES}")
        raise ValueError(f"unknown calibration source {str(source)!r}: use a dataset name {HUB_DATASETS} "
                         f"or a path to a {'/'.join(FILE_SUFFIXES)} file")
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    if path.suffix == ".npy":
        return windows_from_ids(read_token_ids(path, dims=(1, 2)), nsamples, seqlen, generator, f"file {path}")
    if path.suffix == ".txt":
        stream = encode_text(require_tokenizer(tokenizer, path), read_text(path))
    else:
        stream = torch.tensor(encode_chat_jsonl(path, require_tokenizer(tokenizer, path)), dtype=torch.long)
    return random_windows(stream, nsamples, seqlen, generator, f"file {path}")


def encode_text(tokenizer: Tokenizer, text: Union[str, Sequence[str]]) -> torch.Tensor:
    """Token ids int64 [T] of a text, or of documents joined by blank lines (GPTQ's protocol for wikitext2)."""
    return torch.tensor(tokenizer.encode(text if isinstance(text, str) else "\n\n".join(text)), dtype=torch.long)


def require_tokenizer(tokenizer: Optional[Tokenizer], source) -> Tokenizer:
    if tokenizer is None:
        raise ValueError(f"calibration source {str(source)!r} is text and needs a tokenizer: pass tokenizer="
                         "load_tokenizer(model_folder), or pass token ids (.npy, a numpy array, a list or a tensor)")
    return tokenizer


def windows_from_ids(ids: torch.Tensor, nsamples: int, seqlen: int, generator: torch.Generator,
                     what: str) -> torch.Tensor:
    """Checked token ids (token_ids): 2-D ones are the windows themselves, 1-D ones a stream to take windows from."""
    if ids.dim() == 1:
        return random_windows(ids, nsamples, seqlen, generator, what)
    if tuple(ids.shape) != (nsamples, seqlen):
        raise ValueError(f"{what} is 2-D, windows used as they are, so its shape must be [nsamples={nsamples}, "
                         f"seqlen={seqlen}], got {tuple(ids.shape)} (or pass a 1-D stream of token ids)")
    return ids


def random_windows(stream: torch.Tensor, nsamples: int, seqlen: int, generator: torch.Generator,
                   what: str) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random starts of a 1-D token stream (windows may overlap)."""
    if len(stream) < seqlen:
        raise ValueError(f"{what} has {len(stream)} tokens, fewer than one window of seqlen={seqlen}")
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples, 1), generator=generator)
    return stream.long()[starts + torch.arange(seqlen)]


def windows_from_sequences(sequences: Sequence, nsamples: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """One random window from each of nsamples distinct sequences, chosen at random."""
    tensors = [token_ids(sequence, f"token-id sequence {index}", dims=(1,))
               for index, sequence in enumerate(sequences)]
    for index, tensor in enumerate(tensors):
        if len(tensor) < seqlen:
            raise ValueError(f"token-id sequence {index} has {len(tensor)} tokens, fewer than seqlen={seqlen}")
    if len(sequences) < nsamples:
        raise ValueError(f"{len(sequences)} token-id sequences given, fewer than nsamples={nsamples} "
                         "(each sample comes from a different sequence)")
    chosen = torch.randperm(len(tensors), generator=generator)[:nsamples].tolist()
    return torch.cat([random_windows(tensors[i], 1, seqlen, generator, f"sequence {i}") for i in chosen])


def array_kind(ids) -> str:
    """What holds token ids, for errors: "torch tensor", "numpy array" or "list"."""
    if isinstance(ids, torch.Tensor):
        return "torch tensor"
    return "numpy array" if isinstance(ids, np.ndarray) else "list"


def token_ids(ids, what: str, dims: tuple) -> torch.Tensor:
    """The one check of token ids given in Python, whatever holds them (a tensor, a numpy array, a flat list or tuple
    of ints): the checked_token_ids of their values, as an int64 tensor; else a ValueError naming `what`."""
    if isinstance(ids, torch.Tensor):
        values = tensor_values(ids, what, dims)
    elif isinstance(ids, (list, tuple)):
        values = list_values(ids, what)
    elif isinstance(ids, np.ndarray):
        values = ids
    else:
        raise ValueError(f"{what} must be a list of ints, a numpy array or a tensor of token ids, got "
                         f"{type(ids).__name__}")
    return torch.from_numpy(checked_token_ids(values, what, dims))


def tensor_values(tensor: torch.Tensor, what: str, dims: tuple) -> np.ndarray:
    """A tensor's values on the CPU as numpy, its layout and dtype checked before any value is read."""
    if tensor.layout != torch.strided or tensor.is_nested or tensor.device.type == "meta":
        kind = "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        raise ValueError(f"{what} must be a dense tensor of token ids, got a {kind} tensor on {tensor.device}")
    if tensor.dtype not in TORCH_ID_DTYPES:
        raise not_token_ids(what, dims, tensor.dtype, tuple(tensor.shape))
    return tensor.detach().cpu().numpy()


def list_values(values: Sequence, what: str) -> np.ndarray:
    """A flat list or tuple of Python ints as int64 numpy: JSON-like True is not 1, 2.0 not 2, [1, 2] not an id."""
    for index, value in enumerate(values):
        if not is_int(value):
            raise ValueError(f"{what} must be a flat list of int token ids, but its element {index} is "
                             f"{type(value).__name__}")
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        raise ValueError(f"{what} holds a token id beyond int64") from None


def not_token_ids(what: str, dims: tuple, dtype, shape: tuple) -> ValueError:
    ranks = " or ".join(f"{rank}-D" for rank in dims)
    return ValueError(f"{what} must hold a {ranks} array of integer token ids, got {dtype} of shape {shape}")


def checked_token_ids(ids: np.ndarray, what: str, dims: tuple = (1, 2)) -> np.ndarray:
    """An integer array of `dims` dimensions, non-empty and non-negative, as int64; else a ValueError naming `what`."""
    if ids.ndim not in dims or not np.issubdtype(ids.dtype, np.integer):  # bool is not an integer dtype in numpy
        raise not_token_ids(what, dims, ids.dtype, ids.shape)
    if ids.size == 0:
        raise ValueError(f"{what} is empty")
    if ids.min() < 0:
        raise ValueError(f"{what} holds negative token ids (smallest {ids.min()})")
    if ids.max() > INT64_MAX:  # only uint64 can: its cast to int64 would wrap
        raise ValueError(f"{what} holds token ids beyond int64 (largest {ids.max()})")
    return ids.astype(np.int64)


def read_text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded)") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise ValueError(f"file {path} is empty{' but for whitespace' if text else ''}")
    return text


def read_token_ids(path: Path, dims: tuple = (1,)) -> torch.Tensor:
    """A .npy of integer token ids with one of `dims` dimensions (1: a stream, 2: windows), as checked_token_ids.
    Its header is checked against the file's size before any data is read, so a header claiming terabytes fails at
    once instead of allocating them."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version} is not supported")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as err:
            raise ValueError(f"{path} is not a valid .npy file: {err}") from None
        if len(shape) not in dims or not np.issubdtype(dtype, np.integer):  # checked_token_ids's rule, unread
            raise not_token_ids(f"file {path}", dims, dtype, shape)
        count = math.prod(shape)
        needed, available = count * dtype.itemsize, path.stat().st_size - f.tell()
        if needed > available:
            raise ValueError(f"{path}: its header claims {count} ids of {dtype} ({needed} bytes), but the file "
                             f"holds only {available} bytes of data (truncated or corrupt?)")
    # The header is sound and the data all there: numpy maps it (checked_token_ids then copies it as int64).
    ids = np.load(path, mmap_mode="r")
    return torch.from_numpy(checked_token_ids(ids, f"file {path}", dims))


def encode_chat_jsonl(path: Path, tokenizer: Tokenizer) -> list[int]:
    """All conversations of the file rendered as ChatML and concatenated in file order. Every fault of a line (not
    UTF-8, not JSON, nested too deeply, not a conversation) is a ValueError naming the file and the line."""
    stream: list[int] = []
    lines = path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            stream += encode_chatml(tokenizer, conversation_messages(parse_json(line, "the line")))
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: {err}") from None
    if not stream:
        raise ValueError(f"calibration file {path} is empty: no conversations")
    return stream


def conversation_messages(record) -> list[dict]:
    """{"messages": [...]} or ShareGPT {"conversations": [...]} -> [{"role", "content"}], led by a system message;
    any other JSON is a ValueError saying what is wrong where."""
    if not isinstance(record, dict):
        raise ValueError(f"a conversation must be a JSON object, got {json_type(record)}")
    if "messages" in record:
        messages = []
        for index, message in enumerate(json_list(record, "messages")):
            role, content = string_fields(message, index, ("role", "content"))
            if role not in CHAT_ROLES:
                raise ValueError(f"message {index}: role {quoted(role)} is not one of {CHAT_ROLES}")
            messages.append({"role": role, "content": content})
    elif "conversations" in record:
        messages = []
        for index, turn in enumerate(json_list(record, "conversations")):
            speaker, value = string_fields(turn, index, ("from", "value"))
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(f"unknown ShareGPT speaker {quoted(speaker)}: expected one of "
                                 f"{sorted(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    else:
        keys = ", ".join(quoted(key) for key in list(record)[:5]) + (", ..." if len(record) > 5 else "")
        raise ValueError(f"a conversation needs a 'messages' or 'conversations' list, got keys [{keys}]")
    # Qwen-Chat always sees a system turn first (its chat() and fine-tuning both add the default one).
    if not messages or messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    return messages


def json_list(record: dict, key: str) -> list:
    if not isinstance(record[key], list):
        raise ValueError(f"{key!r} must be a list of messages, got {json_type(record[key])}")
    return record[key]


def string_fields(message, index: int, keys: tuple) -> tuple:
    """The string values of `keys` in message `index` of a conversation."""
    if not isinstance(message, dict):
        raise ValueError(f"message {index} must be a JSON object, got {json_type(message)}")
    for key in keys:
        if key not in message:
            raise ValueError(f"message {index} lacks the key {key!r}")
        if not isinstance(message[key], str):
            raise ValueError(f"message {index}: {key!r} must be a string, got {json_type(message[key])}")
    return tuple(message[key] for key in keys)


def json_type(value) -> str:
    """JSON's name for the type of a parsed JSON value."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def quoted(text: str) -> str:
    """repr of a string from the user's file, cut short: an error line must not carry megabytes of it."""
    return repr(text) if len(text) <= QUOTED_CHARS else repr(text[:QUOTED_CHARS]) + "..."


def load_hub_dataset(name: str, split: str = "train"):
    """A split of a Hub dataset (a datasets.Dataset with a "text" column); a clear error when the Hub cannot be
    reached."""
    # Imported here: `datasets` is slow to import and only the two Hub sources need it.
    import datasets

    try:
        if name == "wikitext2":
            return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return datasets.load_dataset("allenai/c4", data_files={"train": C4_SHARD}, split="train")
    except OSError as err:  # ConnectionError when offline, FileNotFoundError when absent from the cache
        raise RuntimeError(f"could not load dataset {name!r} ({split}) from the Hugging Face Hub ({err}); "
                           f"without access to the Hub pass a local .txt, .jsonl or .npy path instead") from err


def c4_windows(documents, tokenizer: Tokenizer, nsamples: int, seqlen: int,
               generator: torch.Generator) -> torch.Tensor:
    """One random window from each of nsamples random documents longer than seqlen (GPTQ's C4 recipe; documents are
    visited in a random order without repeats, so the search ends even when too few are long enough)."""
    samples = []
    for index in torch.randperm(len(documents), generator=generator).tolist():
        ids = tokenizer.encode(documents[index]["text"])
        if len(ids) > seqlen:
            document = torch.tensor(ids, dtype=torch.long)
            samples.append(random_windows(document, 1, seqlen, generator, f"c4 document {index}"))
            if len(samples) == nsamples:
                return torch.cat(samples)
    raise ValueError(f"c4: only {len(samples)} of {len(documents)} documents are longer than seqlen={seqlen} tokens, "
                     f"fewer than nsamples={nsamples}")
