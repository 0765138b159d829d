"""Configuration of a Qwen (v1) checkpoint, read from its config.json."""
import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .json_files import read_json

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REAL_VOCAB = 151851  # ids past this are embedding padding: never valid predictions with the Qwen tokenizer
# Sizes, lengths and group sizes must fit the int64 torch holds shapes and indices in: a JSON integer such as 10**30
# would overflow there ("int too big to convert"), far from its config field. Smaller wrong sizes fail the shape
# checks against the weights, which name the tensor.
MAX_INT = 2**63 - 1


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1, and 4.0 is not 4


def is_number(value) -> bool:
    """An int or float that is finite as a float: JSON true is not 1, and NaN, 1e999 or 10**400 are no size or rate."""
    if not (is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int past the float range
        return False


def shown(value) -> str:
    """A value for an error message, cut short: a file's field may be a megabyte string or a deeply nested list."""
    return reprlib.repr(value)


def field_problems(obj, positive_ints=(), positive_numbers=(), flags=()) -> list[str]:
    """What is wrong with obj's fields, one line per field: the one type and range check of every config."""
    problems = []
    for name in positive_ints:
        value = getattr(obj, name)
        if not is_int(value) or not 0 < value <= MAX_INT:
            problems.append(f"{name}={shown(value)} must be a positive integer (at most {MAX_INT})")
    for name in positive_numbers:
        value = getattr(obj, name)
        if not is_number(value) or value <= 0:
            problems.append(f"{name}={shown(value)} must be a finite number > 0")
    for name in flags:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            problems.append(f"{name}={shown(value)} must be true or false (a JSON boolean)")
    return problems


def require_object(d, source: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{source} must be a JSON object of fields, not a {type(d).__name__}")


@dataclass
class QuantConfig:
    """The `quantization_config` of a GPTQ checkpoint (also written as quantize_config.json)."""

    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    true_sequential: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1, zero stored minus one; Qwen's files) or "gptq_v2"

    def __post_init__(self):
        # packing knows the formats, widths and group sizes
        from .packing import FORMATS, SUPPORTED_BITS, valid_bits, valid_group_size

        problems = field_problems(self, flags=("desc_act", "static_groups", "sym", "true_sequential"))
        if not valid_bits(self.bits):
            problems.append(f"bits={shown(self.bits)} must be one of the integers {SUPPORTED_BITS}")
        if not valid_group_size(self.group_size) or self.group_size > MAX_INT:
            problems.append(f"group_size={shown(self.group_size)} must be a positive integer (at most {MAX_INT}) "
                            "or -1 (per channel)")
        damp = self.damp_percent
        if not is_number(damp) or not 0 <= damp <= 1:
            problems.append(f"damp_percent={shown(damp)} must be a number in [0, 1]")
        if not isinstance(self.checkpoint_format, str) or self.checkpoint_format not in FORMATS:
            problems.append(f"checkpoint_format={shown(self.checkpoint_format)} must be one of {FORMATS}")
        if problems:
            raise ValueError("invalid quantization config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict, source: str = "quantization_config") -> "QuantConfig":
        require_object(d, source)
        method = d.get("quant_method", "gptq")
        if method != "gptq":
            raise ValueError(f"{source}: quant_method {shown(method)} is not supported (only 'gptq')")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """The published layout: the quantize_config.json keys, plus checkpoint_format only when it is not v1."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "checkpoint_format"}
        d.update(model_name_or_path=None, model_file_base_name="model")
        if self.checkpoint_format != "gptq":
            d["checkpoint_format"] = self.checkpoint_format
        return d


@dataclass
class QwenConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    intermediate_size: int  # Qwen convention: twice the MLP width
    kv_channels: Optional[int] = None
    seq_length: int = 8192
    max_position_embeddings: int = 32768
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    local_window_size: Optional[int] = None  # our option: attend to at most this many previous positions
    quantization_config: Optional[QuantConfig] = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back unchanged

    REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    # seq_length divides positions under dynamic NTK and logN; epsilon and base feed every norm and rotation.
    POSITIVE_INTS = REQUIRED + ("kv_channels", "seq_length", "max_position_embeddings")
    POSITIVE_NUMBERS = ("layer_norm_epsilon", "rotary_emb_base")
    FLAGS = ("use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings")

    def __post_init__(self):
        if self.kv_channels is None and not field_problems(self, ("hidden_size", "num_attention_heads")):
            self.kv_channels = self.hidden_size // self.num_attention_heads
        problems = field_problems(self, self.POSITIVE_INTS, self.POSITIVE_NUMBERS, self.FLAGS)
        if self.local_window_size is not None:
            problems += field_problems(self, ("local_window_size",))
        if not problems and self.kv_channels * self.num_attention_heads != self.hidden_size:
            problems.append(f"kv_channels {self.kv_channels} x num_attention_heads {self.num_attention_heads} "
                            f"!= hidden_size {self.hidden_size}")
        if not problems and self.intermediate_size % 2:
            problems.append(f"intermediate_size {self.intermediate_size} must be even (twice the MLP width)")
        if not is_number(self.rotary_pct) or self.rotary_pct != 1:  # JSON true == 1 in Python, but is no fraction
            problems.append(f"rotary_pct={shown(self.rotary_pct)} is not supported (Qwen v1 uses 1.0)")
        if not isinstance(self.torch_dtype, str) or self.torch_dtype not in DTYPES:
            problems.append(f"torch_dtype={shown(self.torch_dtype)} is not one of {sorted(DTYPES)}")
        if problems:
            raise ValueError("invalid Qwen config: " + "; ".join(problems))

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size // 2

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "QwenConfig":
        require_object(d, source)
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source} lacks required field(s) {missing}")
        model_type = d.get("model_type", "qwen")
        if model_type != "qwen":
            raise ValueError(f"{source}: model_type {shown(model_type)} is not Qwen v1 ('qwen')")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "quantization_config"}
        known = {k: v for k, v in d.items() if k in names}
        if "torch_dtype" not in d:  # old Qwen configs only carry the bf16/fp16/fp32 flags
            flags = [f"{k}={shown(d[k])}" for k in ("bf16", "fp16") if k in d and not isinstance(d[k], bool)]
            if flags:
                raise ValueError(f"{source}: {', '.join(flags)} must be true or false (a JSON boolean)")
            known["torch_dtype"] = "bfloat16" if d.get("bf16") else "float16" if d.get("fp16") else "float32"
        extra = {k: v for k, v in d.items() if k not in names and k != "quantization_config"}
        quant = d.get("quantization_config")
        if quant is not None:
            quant = QuantConfig.from_dict(quant, f"{source} quantization_config")
        try:
            return cls(**known, extra=extra, quantization_config=quant)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path) -> "QwenConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(read_json(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("extra", "quantization_config", "local_window_size")})
        if self.local_window_size is not None:
            d["local_window_size"] = self.local_window_size
        d.setdefault("model_type", "qwen")
        d.setdefault("architectures", ["QWenLMHeadModel"])
        if self.quantization_config is not None:
            d["quantization_config"] = {**self.quantization_config.to_dict(), "quant_method": "gptq"}
        return d

    def save(self, folder) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
