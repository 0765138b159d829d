"""Calibration samples for GPTQ: always an int64 tensor [nsamples, seqlen] of token windows.

Sources (`source` of get_calibration_data):
- "wikitext2": the WikiText-2 raw train split from the Hugging Face Hub, rows joined with "\\n\\n" (as GPTQ does).
- "c4": the first C4 English train shard from the Hub; random documents longer than seqlen, one window each (as GPTQ).
- a `.txt` path: UTF-8 text (BOM stripped, CRLF -> LF), tokenized once as one stream.
- a `.jsonl` path of chats, one conversation a line, either {"messages": [{"role", "content"}, ...]} or ShareGPT
  {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}. Each is rendered as ChatML (the data Qwen
  calibrated its Int4/Int8 models with), with the default system prompt when it has none; the rendered conversations
  are concatenated into one stream, so a window may start or end inside a conversation.
- a `.npy` path, a 1-D numpy array or a 1-D tensor: a stream of integer token ids (no tokenizer needed).
- a list of strings: texts joined with "\n\n" and tokenized as one stream, like a `.txt` file.
- a list of token-id sequences (lists or 1-D tensors), each at least seqlen long: nsamples distinct sequences are
  chosen at random and one random window taken from each.
- a 2-D integer tensor or numpy array of shape [nsamples, seqlen]: returned as is (as an int64 tensor).
Windows of a stream start uniformly at random anywhere a whole window fits. The same seed gives the same samples; only
a local torch.Generator is used, never global random state.
"""
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from qwen_quant.tokenizer import DEFAULT_SYSTEM_PROMPT, Tokenizer, encode_chatml

HUB_DATASETS = ("wikitext2", "c4")
FILE_SUFFIXES = (".txt", ".jsonl", ".npy")
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

Source = Union[str, Path, Sequence[str], Sequence[Sequence[int]], torch.Tensor, np.ndarray]


def get_calibration_data(source: Source, tokenizer: Optional[Tokenizer] = None, nsamples: int = 128,
                         seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """Token windows int64 [nsamples, seqlen] from `source` (see the module docstring for the kinds of source)."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(checked_token_ids(source, "the numpy array of token ids"))
    if isinstance(source, torch.Tensor) and source.dim() == 2:
        return checked_sample_tensor(source, nsamples, seqlen)
    if isinstance(source, torch.Tensor) and source.dim() == 1:
        return random_windows(source, nsamples, seqlen, generator, "the 1-D tensor of token ids")
    if isinstance(source, (list, tuple)) and source and all(isinstance(text, str) for text in source):
        stream = encode_text(require_tokenizer(tokenizer, "list of strings"), source)
        return random_windows(stream, nsamples, seqlen, generator, f"the list of {len(source)} strings")
    if isinstance(source, (list, tuple)):
        return windows_from_sequences(source, nsamples, seqlen, generator)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"unsupported calibration source of type {type(source).__name__}: pass a dataset name "
                        f"{HUB_DATASETS}, a {'/'.join(FILE_SUFFIXES)} path, a list of strings or of token-id "
                        "sequences, a 1-D or 2-D numpy array or tensor of token ids")
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
        stream = read_token_ids(path)
    elif path.suffix == ".txt":
        stream = encode_text(require_tokenizer(tokenizer, path), read_text(path))
    else:
        stream = torch.tensor(encode_chat_jsonl(path, require_tokenizer(tokenizer, path)), dtype=torch.long)
    return random_windows(stream, nsamples, seqlen, generator, str(path))


def encode_text(tokenizer: Tokenizer, text: Union[str, Sequence[str]]) -> torch.Tensor:
    """Token ids int64 [T] of a text, or of documents joined by blank lines (GPTQ's protocol for wikitext2)."""
    return torch.tensor(tokenizer.encode(text if isinstance(text, str) else "\n\n".join(text)), dtype=torch.long)


def require_tokenizer(tokenizer: Optional[Tokenizer], source) -> Tokenizer:
    if tokenizer is None:
        raise ValueError(f"calibration source {str(source)!r} is text and needs a tokenizer: pass tokenizer="
                         "load_tokenizer(model_folder), or pass token ids (.npy, a numpy array, a list or a tensor)")
    return tokenizer


def random_windows(stream: torch.Tensor, nsamples: int, seqlen: int, generator: torch.Generator,
                   what: str) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random starts of a 1-D token stream (windows may overlap)."""
    if len(stream) < seqlen:
        raise ValueError(f"{what} has {len(stream)} tokens, fewer than one window of seqlen={seqlen}")
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples, 1), generator=generator)
    return stream.long()[starts + torch.arange(seqlen)]


def windows_from_sequences(sequences: Sequence, nsamples: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    if len(sequences) < nsamples:
        raise ValueError(f"{len(sequences)} token-id sequences given, fewer than nsamples={nsamples} "
                         "(each sample comes from a different sequence)")
    tensors = [torch.as_tensor(sequence) for sequence in sequences]
    for index, tensor in enumerate(tensors):
        if tensor.dim() != 1 or tensor.is_floating_point():
            raise ValueError(f"token-id sequence {index} must be 1-D integers, got {tensor.dtype} of shape "
                             f"{tuple(tensor.shape)}")
        if len(tensor) < seqlen:
            raise ValueError(f"token-id sequence {index} has {len(tensor)} tokens, fewer than seqlen={seqlen}")
    chosen = torch.randperm(len(tensors), generator=generator)[:nsamples].tolist()
    return torch.cat([random_windows(tensors[i], 1, seqlen, generator, f"sequence {i}") for i in chosen])


def checked_sample_tensor(samples: torch.Tensor, nsamples: int, seqlen: int) -> torch.Tensor:
    if samples.is_floating_point() or tuple(samples.shape) != (nsamples, seqlen):
        raise ValueError(f"a calibration tensor must be integer token ids of shape [nsamples={nsamples}, "
                         f"seqlen={seqlen}], got {samples.dtype} of shape {tuple(samples.shape)}")
    return samples.long()


def read_text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text:
        raise ValueError(f"file {path} is empty")
    return text


def read_token_ids(path: Path) -> torch.Tensor:
    """A .npy of 1-D integer token ids. Its header is checked against the file's size before any data is read, so a
    header claiming terabytes fails at once instead of allocating them."""
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
        if len(shape) != 1 or not np.issubdtype(dtype, np.integer):  # floats and bools are not ids
            raise ValueError(f"{path} must hold a 1-D array of integer token ids, got {dtype} of shape {shape}")
        needed, available = shape[0] * dtype.itemsize, path.stat().st_size - f.tell()
        if needed > available:
            raise ValueError(f"{path}: its header claims {shape[0]} ids of {dtype} ({needed} bytes), but the file "
                             f"holds only {available} bytes of data (truncated or corrupt?)")
    # The header is sound and the data all there: numpy maps it (checked_token_ids then copies it as int64).
    ids = np.load(path, mmap_mode="r")
    return torch.from_numpy(checked_token_ids(ids, f"file {path}"))


def checked_token_ids(ids: np.ndarray, what: str) -> np.ndarray:
    """A 1-D or 2-D array of non-negative integer ids as int64, or a ValueError naming `what`."""
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D or 2-D array of integer token ids, got {ids.dtype} of shape "
                         f"{ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{what} is empty")
    ids = ids.astype(np.int64)
    if ids.min() < 0:
        raise ValueError(f"{what} holds negative token ids (smallest {ids.min()})")
    return ids


def encode_chat_jsonl(path: Path, tokenizer: Tokenizer) -> list[int]:
    """All conversations of the file rendered as ChatML and concatenated in file order."""
    stream: list[int] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                stream += encode_chatml(tokenizer, conversation_messages(json.loads(line)))
            except KeyError as err:
                raise ValueError(f"{path}:{line_no}: a message lacks the key {err}") from None
            except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{line_no}: {err}") from None
    if not stream:
        raise ValueError(f"calibration file {path} is empty: no conversations")
    return stream


def conversation_messages(record: dict) -> list[dict]:
    """{"messages": [...]} or ShareGPT {"conversations": [...]} -> [{"role", "content"}], led by a system message."""
    if not isinstance(record, dict):
        raise ValueError(f"a conversation must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif "conversations" in record:
        messages = []
        for turn in record["conversations"]:
            if turn["from"] not in SHAREGPT_ROLES:
                raise ValueError(f"unknown ShareGPT speaker {turn['from']!r}: expected one of {sorted(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    else:
        raise ValueError(f"a conversation needs a 'messages' or 'conversations' list, got keys {sorted(record)}")
    # Qwen-Chat always sees a system turn first (its chat() and fine-tuning both add the default one).
    if not messages or messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    return messages


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
