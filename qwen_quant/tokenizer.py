"""Tokenizers and the ChatML template.

- QwenTokenizer: Qwen (v1)'s tiktoken BPE over `qwen.tiktoken` with its special tokens. They are not in the file; Qwen
  adds them in code at fixed ids from 151643, so the file must hold exactly the 151,643 ordinary ranks 0..151642.
- JsonTokenizer: a `tokenizer.json` (the `tokenizers` library's format, shipped by SmolLM2, Qwen1.5/2/2.5 ...) with the
  same interface.
- load_tokenizer(folder) picks the one a model folder carries whose ids all have a row in the model's embedding.
"""
import base64
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import AbstractSet, Iterable, Optional, Sequence, Union

import tiktoken

from .config import field_problems, is_int, require_object, shown
from .json_files import read_json

log = logging.getLogger("qwen_quant")

TIKTOKEN_FILE = "qwen.tiktoken"
TOKENIZER_JSON = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
# Qwen's pre-tokenizer (tokenization_qwen.py): `\p{N}` alone makes every digit its own token.
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
           r"""|\s+(?!\S)|\s+""")
NUM_MERGEABLE_RANKS = 151643
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = {
    name: NUM_MERGEABLE_RANKS + i
    for i, name in enumerate((ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{j}|>" for j in range(205))))
}
VOCAB_SIZE = NUM_MERGEABLE_RANKS + len(SPECIAL_TOKENS)  # 151851; embeddings have more (padding) rows

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_ROLES = ("system", "user", "assistant")

AllowedSpecial = Union[str, AbstractSet[str], Sequence[str]]  # "all", one name, or several names


def read_mergeable_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64(token) SPACE rank` lines, checking what tiktoken's own loader does not: strict base64, ranks
    0, 1, 2, ... in order, no repeated token."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.decode("ascii", errors="replace").split()
            if len(fields) != 2:
                raise ValueError(f"{path}: line {line_no} is not 'base64(token) rank': {line[:80]!r}")
            try:
                token = base64.b64decode(fields[0], validate=True)
            except ValueError as err:  # binascii.Error, or non-ASCII text
                raise ValueError(f"{path}: line {line_no}: bad base64 token {fields[0][:40]!r} ({err})") from None
            expected = line_no - 1
            if fields[1] != str(expected):
                raise ValueError(f"{path}: line {line_no}: rank {fields[1][:20]!r}, expected {expected} "
                                 "(ranks must be 0, 1, 2, ... in order)")
            if token in ranks:
                raise ValueError(f"{path}: line {line_no}: token {token!r} already has rank {ranks[token]}")
            ranks[token] = expected
    if len(ranks) != NUM_MERGEABLE_RANKS:
        raise ValueError(f"{path}: {len(ranks)} ranks, expected {NUM_MERGEABLE_RANKS}: Qwen's special tokens are fixed "
                         f"at ids {NUM_MERGEABLE_RANKS}.., so only the complete Qwen vocabulary fits")
    return ranks



def tokenizer_file(path: Union[str, Path], name: str) -> Path:
    """The tokenizer file `name` in the folder `path`, or `path` itself when it is a file."""
    path = Path(path)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {file} (pass a folder holding {name} or the file itself)")
    return file


def copy_into(file: Path, folder: Union[str, Path]) -> Path:
    """Copy a tokenizer file into `folder` (created if needed), as an exported checkpoint needs; returns the copy."""
    target = Path(folder) / file.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not (target.exists() and target.samefile(file)):
        shutil.copyfile(file, target)
    return target

class QwenTokenizer:
    """Qwen's tiktoken BPE with its 208 special tokens; `encoding` is the underlying tiktoken.Encoding."""

    def __init__(self, tiktoken_file: Union[str, Path]):
        self.tiktoken_file = Path(tiktoken_file)
        self.encoding = tiktoken.Encoding(
            name="qwen",
            pat_str=PATTERN,
            mergeable_ranks=read_mergeable_ranks(self.tiktoken_file),
            special_tokens=SPECIAL_TOKENS,
        )

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "QwenTokenizer":
        """`path` is a folder holding `qwen.tiktoken` (a checkpoint folder) or the file itself."""
        return cls(tokenizer_file(path, TIKTOKEN_FILE))

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Copy `qwen.tiktoken` into `folder` (created if needed), as an exported checkpoint needs; returns the copy."""
        return copy_into(self.tiktoken_file, folder)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """By default special-token text such as "<|im_end|>" is encoded as plain text, never as a special id (so user
        text cannot inject control tokens). `allowed_special="all"`, one name or a set of names turns those into special
        ids."""
        if allowed_special != "all":
            # A lone name is one token, not a set of characters.
            allowed_special = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
            unknown = allowed_special - SPECIAL_TOKENS.keys()
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens {sorted(unknown)}; "
                                 f"known ones look like {ENDOFTEXT}, {IM_START}, {IM_END}, <|extra_0|>")
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        """Ids must be real tokens (0 <= id < 151851). Ids from the embedding's padding rows (151851..) raise instead of
        being dropped: producing one means a caller did not mask the invalid logits, a bug to surface."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise ValueError(f"cannot decode ids {bad[:10]}: Qwen token ids are 0..{VOCAB_SIZE - 1} "
                             f"(ids >= {VOCAB_SIZE} are embedding padding rows, never tokens)")
        return self.encoding.decode(ids)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(SPECIAL_TOKENS)

    @property
    def eod_id(self) -> int:
        return SPECIAL_TOKENS[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return SPECIAL_TOKENS[IM_START]

    @property
    def im_end_id(self) -> int:
        return SPECIAL_TOKENS[IM_END]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a chat reply: `<|im_end|>` and `<|endoftext|>`, as Qwen-Chat's generation config lists."""
        return (self.im_end_id, self.eod_id)


def read_tokenizer_json(path: Path):
    """The `tokenizers` library's Tokenizer of a tokenizer.json; a file it cannot read is a ValueError naming it."""
    from tokenizers import Tokenizer  # imported here: only tokenizer.json models need the library

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception on malformed JSON
        raise ValueError(f"{path}: not a tokenizers-library tokenizer.json ({err})") from None


def tokenizer_id_count(folder: Union[str, Path]) -> Optional[int]:
    """How many ids the folder's tokenizer gives: qwen.tiktoken's are fixed (VOCAB_SIZE, 151851), and it is taken
    before a tokenizer.json beside it (a converted copy, or a side file); a tokenizer.json's are its highest id over
    the vocabulary and the added tokens, + 1 (Qwen2.5's 151665, Qwen3's 151669, below their embeddings' 151936 rows);
    None without either. Only the count: no ChatML markers are required, as JsonTokenizer requires them."""
    if (Path(folder) / TIKTOKEN_FILE).is_file():
        return VOCAB_SIZE
    path = Path(folder) / TOKENIZER_JSON
    if not path.is_file():
        return None
    ids = read_tokenizer_json(path).get_vocab(with_added_tokens=True).values()
    return max(ids) + 1 if ids else None


class JsonTokenizer:
    """A `tokenizer.json` loaded by the `tokenizers` library, with QwenTokenizer's interface. The ChatML markers are
    its `<|im_start|>` / `<|im_end|>` / `<|endoftext|>` tokens; stop ids come from generation_config.json beside it."""

    def __init__(self, tokenizer_file: Union[str, Path], generation_config: Optional[Union[str, Path]] = None):
        self.tokenizer_file = Path(tokenizer_file)
        self.backend = read_tokenizer_json(self.tokenizer_file)
        # `tokenizers` would turn special-token text inside ordinary text into the special ids; off, such text is
        # encoded like any other (encode() splits on the names a caller allows explicitly).
        self.backend.encode_special_tokens = True
        self._special = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        for name in (ENDOFTEXT, IM_START, IM_END):
            if name not in self._special:
                raise ValueError(f"{self.tokenizer_file} has no special token {name}: ChatML needs "
                                 f"{ENDOFTEXT}, {IM_START} and {IM_END}")
        self.generation_config = Path(generation_config) if generation_config else None
        self._stop_ids = self._read_stop_ids()

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "JsonTokenizer":
        """`path` is a folder holding `tokenizer.json` (and generation_config.json) or the file itself."""
        file = tokenizer_file(path, TOKENIZER_JSON)
        generation_config = file.with_name(GENERATION_CONFIG)
        return cls(file, generation_config if generation_config.is_file() else None)

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Copy `tokenizer.json` into `folder` (created if needed); returns the copy."""
        return copy_into(self.tokenizer_file, folder)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """As QwenTokenizer.encode: special-token text is plain text unless its name is in `allowed_special` ("all",
        one name or a set of names). No BOS or other template token is added."""
        names = set(self._special) if allowed_special == "all" else (
            {allowed_special} if isinstance(allowed_special, str) else set(allowed_special))
        unknown = names - self._special.keys()
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens {sorted(unknown)}; "
                             f"{self.tokenizer_file.name} has {sorted(self._special)[:8]}")
        pieces = re.split("(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")", text) \
            if names else [text]
        ids: list[int] = []
        for index, piece in enumerate(pieces):
            if index % 2:  # the captured separators: allowed special names
                ids.append(self._special[piece])
            elif piece:
                ids += self.backend.encode(piece, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Special tokens are decoded to their text, as QwenTokenizer does; an id outside the vocabulary raises."""
        ids, size = [int(i) for i in ids], self.vocab_size  # vocab_size asks the backend: once, not per id
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"cannot decode ids {bad[:10]}: {self.tokenizer_file.name} has ids "
                             f"0..{self.vocab_size - 1}")
        return self.backend.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eod_id(self) -> int:
        return self._special[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self._special[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special[IM_END]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    def _read_stop_ids(self) -> tuple[int, ...]:
        """The stop ids generation_config.json names; when it names none (or there is no such file), `<|im_end|>` and
        `<|endoftext|>`."""
        if self.generation_config is None:
            return (self.im_end_id, self.eod_id)
        config = read_json(self.generation_config)
        require_object(config, str(self.generation_config))
        return generation_stop_ids(config, str(self.generation_config), self.vocab_size) or (self.im_end_id,
                                                                                            self.eod_id)


def is_id_list(value) -> bool:
    """A non-empty JSON list of integers (JSON true is no id)."""
    return isinstance(value, list) and len(value) > 0 and all(is_int(i) for i in value)


def generation_stop_ids(config: dict, source: str, vocab_size: int) -> tuple[int, ...]:
    """eos_token_id (an id or a non-empty list of ids) and the one-token stop_words_ids (a list of id lists) of a
    generation config, each field type-checked and every id one of the vocabulary's; a field that is null or absent
    names none."""
    eos, words = config.get("eos_token_id"), config.get("stop_words_ids")
    problems = []
    if not (eos is None or is_int(eos) or is_id_list(eos)):
        problems.append(f"eos_token_id={shown(eos)} must be a token id or a non-empty list of token ids")
    if not (words is None or isinstance(words, list) and all(is_id_list(w) for w in words)):
        problems.append(f"stop_words_ids={shown(words)} must be a list of non-empty lists of token ids")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    eos_ids = [] if eos is None else [eos] if is_int(eos) else eos
    bad = [i for i in [*eos_ids, *(i for w in words or () for i in w)] if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{source}: eos_token_id / stop_words_ids name ids {shown(bad)} outside the vocabulary's "
                         f"0..{vocab_size - 1}")
    return tuple(dict.fromkeys([*eos_ids, *(w[0] for w in words or () if len(w) == 1)]))


Tokenizer = Union[QwenTokenizer, JsonTokenizer]


TOKENIZER_CLASSES = {TIKTOKEN_FILE: QwenTokenizer, TOKENIZER_JSON: JsonTokenizer}
# Two tokenizers of one folder that both fit the model agree when they give the same ids for this text (English,
# Chinese, digits, code, white space and a special token's text): then they are one tokenizer in two formats.
AGREEMENT_PROBE = ("The capital of France is Paris. 通义千问是阿里云研发的大语言模型。 12345 + 0.5 = "
                   "def f(x):\n\treturn x ** 2  # <|im_end|>\n\n")


def model_vocab_size(folder: Path) -> Optional[int]:
    """The vocab_size of the folder's config.json (the embedding rows, so every id a tokenizer gives needs one), None
    when there is no config.json or it names none. Only this field is read: choosing a tokenizer must not depend on
    the rest of the model's config."""
    path = folder / MODEL_CONFIG
    if not path.is_file():
        return None
    config = read_json(path)
    require_object(config, str(path))
    vocab = config.get("vocab_size")
    problems = [] if vocab is None else field_problems(SimpleNamespace(vocab_size=vocab), positive_ints=("vocab_size",))
    if problems:
        raise ValueError(f"{path}: {problems[0]}")
    return vocab


def load_tokenizer(folder: Union[str, Path]) -> Optional[Tokenizer]:
    """The tokenizer a model folder carries: QwenTokenizer for `qwen.tiktoken`, JsonTokenizer for `tokenizer.json`,
    None when it has neither (token ids then need no tokenizer). It must fit the model (all its ids below config.json's
    vocab_size); of a folder holding both files, the one that fits. A tokenizer that does not fit, or two that both
    (or neither) fit, is an error before any text is encoded with the wrong one."""
    folder = Path(folder)
    found = {folder / name: cls.from_pretrained(folder) for name, cls in TOKENIZER_CLASSES.items()
             if (folder / name).is_file()}
    if not found:
        return None
    vocab = model_vocab_size(folder)
    fitting = [file for file, tokenizer in found.items() if vocab is None or tokenizer.vocab_size <= vocab]
    if len(fitting) == 1:
        if len(found) > 1:
            log.info("%s: using %s, the tokenizer that fits the model's vocab_size %d", folder, fitting[0].name, vocab)
        return found[fitting[0]]
    if len(fitting) == 2 and len({tuple(t.encode(AGREEMENT_PROBE)) for t in found.values()}) == 1:
        return found[folder / TIKTOKEN_FILE]  # the same tokenizer in two formats (a converted qwen.tiktoken)
    sizes = " and ".join(f"{file} ({tokenizer.vocab_size} ids)" for file, tokenizer in found.items())
    if len(found) == 1:
        raise ValueError(f"{sizes} does not fit the model: its {MODEL_CONFIG} has vocab_size {vocab}, so ids past "
                         f"{vocab - 1} have no embedding row. Is it this model's tokenizer?")
    why = (f"{'both fit' if fitting else 'neither fits'} the model's vocab_size {vocab} ({MODEL_CONFIG})"
           + (" but they encode text differently" if fitting else "")
           if vocab is not None else f"no {MODEL_CONFIG} vocab_size tells which is the model's")
    raise ValueError(f"{folder} holds two tokenizers, {sizes}, and {why}: remove the one that is not the model's")


def encode_chatml(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
    """Render [{"role", "content"}, ...] as ChatML ids: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
    `<|im_start|>assistant\\n` when `add_generation_prompt`. As Qwen's make_context does, role, newline and content are
    encoded separately with no special tokens allowed: only the template's own markers are special ids."""
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"message {index}: role {role!r} is not one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
        ids += [tokenizer.im_start_id, *tokenizer.encode(role), *newline, *tokenizer.encode(content),
                tokenizer.im_end_id, *newline]
    if add_generation_prompt:
        ids += [tokenizer.im_start_id, *tokenizer.encode("assistant"), *newline]
    return ids


def build_chat_input(tokenizer: Tokenizer, query: str, history: Sequence[tuple[str, str]] = None,
                     system: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """The prompt ids Qwen-Chat expects: system turn (none when `system` is None), earlier (query, response) turns,
    the new query, then the assistant header to generate from."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    for past_query, past_response in history or ():
        messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_response}]
    messages.append({"role": "user", "content": query})
    return encode_chatml(tokenizer, messages, add_generation_prompt=True)
