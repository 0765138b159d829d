"""Configuration of a Qwen checkpoint, read from its config.json: Qwen v1 (model_type qwen) or a later generation
written by transformers (qwen2: Qwen1.5 / 2 / 2.5; qwen3), whose keys are read into the same fields."""
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
FAMILIES = ("qwen", "qwen2", "qwen3")  # config.json's model_type of every generation we read
# The transformers families spell some of v1's fields differently: their config.json key -> our field.
HF_KEYS = {"rope_theta": "rotary_emb_base", "rms_norm_eps": "layer_norm_epsilon", "head_dim": "kv_channels",
           "dtype": "torch_dtype"}
# Fields of one side only: v1's context tricks (dynamic NTK, logN) and bias flag; the later generations' grouped
# kv heads and attention bias (qwen3). A key of the other side stays in `extra`, unread.
V1_ONLY = ("seq_length", "rotary_pct", "use_dynamic_ntk", "use_logn_attn", "no_bias")
HF_ONLY = ("num_key_value_heads", "attention_bias")


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
    intermediate_size: int  # v1: twice the MLP width; qwen2 / qwen3: the MLP width (see ffn_size)
    kv_channels: Optional[int] = None  # the head dim (qwen2 / qwen3: head_dim), default hidden / heads
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
    model_type: str = "qwen"
    num_key_value_heads: Optional[int] = None  # grouped-query attention's kv heads, default one per query head
    attention_bias: bool = False  # qwen3: q/k/v/o biases (qwen2's q/k/v always have one, v1's c_attn too)
    quantization_config: Optional[QuantConfig] = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back unchanged

    REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    # seq_length divides positions under dynamic NTK and logN; epsilon and base feed every norm and rotation.
    POSITIVE_INTS = REQUIRED + ("kv_channels", "seq_length", "max_position_embeddings")
    POSITIVE_NUMBERS = ("layer_norm_epsilon", "rotary_emb_base")
    FLAGS = ("use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings", "attention_bias")

    def __post_init__(self):
        if self.kv_channels is None and not field_problems(self, ("hidden_size", "num_attention_heads")):
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        problems = field_problems(self, self.POSITIVE_INTS + ("num_key_value_heads",), self.POSITIVE_NUMBERS,
                                  self.FLAGS)
        if not isinstance(self.model_type, str) or self.model_type not in FAMILIES:
            problems.append(f"model_type={shown(self.model_type)} is not one of {FAMILIES}")
        if self.local_window_size is not None:
            problems += field_problems(self, ("local_window_size",))
        v1 = self.model_type == "qwen"
        # Only v1 ties the head dim to the width (Qwen3-0.6B: head_dim 128, 16 heads, hidden 1024).
        if not problems and v1 and self.kv_channels * self.num_attention_heads != self.hidden_size:
            problems.append(f"kv_channels {self.kv_channels} x num_attention_heads {self.num_attention_heads} "
                            f"!= hidden_size {self.hidden_size}")
        if not problems and v1 and self.intermediate_size % 2:
            problems.append(f"intermediate_size {self.intermediate_size} must be even (twice the MLP width)")
        if not problems and v1 and self.num_key_value_heads != self.num_attention_heads:
            problems.append(f"num_key_value_heads {self.num_key_value_heads} != num_attention_heads "
                            f"{self.num_attention_heads} (Qwen v1 has no grouped-query attention)")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads}")
        if not problems and self.kv_channels % 2:
            problems.append(f"the head dim {self.kv_channels} must be even (RoPE rotates pairs of channels)")
        if not is_number(self.rotary_pct) or self.rotary_pct != 1:  # JSON true == 1 in Python, but is no fraction
            problems.append(f"rotary_pct={shown(self.rotary_pct)} is not supported (Qwen v1 uses 1.0)")
        if not isinstance(self.torch_dtype, str) or self.torch_dtype not in DTYPES:
            problems.append(f"torch_dtype={shown(self.torch_dtype)} is not one of {sorted(DTYPES)}")
        if problems:
            raise ValueError("invalid Qwen config: " + "; ".join(problems))

    @property
    def ffn_size(self) -> int:
        """The MLP width: v1's intermediate_size is twice it, the later generations' is it."""
        return self.intermediate_size // 2 if self.model_type == "qwen" else self.intermediate_size

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
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise ValueError(f"{source}: model_type {shown(model_type)} is not one of the Qwen generations {FAMILIES}")
        if model_type == "qwen":
            names = {f.name for f in dataclasses.fields(cls)} - {"extra", "quantization_config", *HF_ONLY}
            known = {k: v for k, v in d.items() if k in names}
        else:
            names = {f.name for f in dataclasses.fields(cls)} - {"extra", "quantization_config", *V1_ONLY,
                                                                 *HF_KEYS.values()}
            known = {k: v for k, v in d.items() if k in names}
            known.update(hf_fields(d, source))
            names |= {*HF_KEYS, "torch_dtype"}
        if "torch_dtype" not in known:  # old Qwen configs only carry the bf16/fp16/fp32 flags
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
        v1 = self.model_type == "qwen"
        left_out = ("extra", "quantization_config", "local_window_size", *(HF_ONLY if v1 else V1_ONLY))
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in left_out})
        if not v1:  # the family's own spelling
            d.update({key: d.pop(name) for key, name in HF_KEYS.items()})
            d["torch_dtype"] = d["dtype"]  # transformers before 4.56 (and Qwen's own folders) read torch_dtype
        if self.local_window_size is not None:
            d["local_window_size"] = self.local_window_size
        if v1:
            d.setdefault("architectures", ["QWenLMHeadModel"])
        if self.quantization_config is not None:
            d["quantization_config"] = quantization_config_dict(self.quantization_config, v1)
        return d

    def save(self, folder) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def quantization_config_dict(quant: QuantConfig, v1: bool) -> dict:
    """config.json's quantization_config: v1's is quantize_config.json's keys; the later families' is what Qwen's
    Qwen2.5-*-GPTQ-Int4 folders and GPTQModel write (every field, checkpoint_format included, no AutoGPTQ file
    keys), as transformers + optimum / GPTQModel read it."""
    fields = quant.to_dict() if v1 else dataclasses.asdict(quant)
    return {**fields, "quant_method": "gptq"}


def hf_fields(d: dict, source: str) -> dict:
    """The fields a qwen2 / qwen3 config.json spells its own way (HF_KEYS), with rope_theta also read from
    rope_parameters (as transformers 5 writes it); refuses what our runtime does not compute as transformers does:
    sliding-window attention, scaled RoPE, another activation than SiLU."""
    fields = {HF_KEYS[k]: v for k, v in d.items() if k in HF_KEYS}
    fields.update(use_dynamic_ntk=False, use_logn_attn=False)  # v1's context tricks: the later generations have none
    if "dtype" not in d and "torch_dtype" in d:  # transformers 4's spelling
        fields["torch_dtype"] = d["torch_dtype"]
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: {key}={shown(rope)} must be a JSON object of fields")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{source}: {key} rope_type {shown(kind)} is not supported (only 'default' RoPE)")
        if "rope_theta" in rope and "rope_theta" not in d:
            fields["rotary_emb_base"] = rope["rope_theta"]
    sliding = d.get("use_sliding_window", False)
    if not isinstance(sliding, bool):
        raise ValueError(f"{source}: use_sliding_window={shown(sliding)} must be true or false (a JSON boolean)")
    if sliding:
        raise ValueError(f"{source}: use_sliding_window true is not supported (sliding-window attention is not "
                         "implemented)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {shown(act)} is not supported (only 'silu')")
    return fields
