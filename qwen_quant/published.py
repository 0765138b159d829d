"""The published Qwen (v1) models as data: architecture, Hub repo ids and Qwen's published figures.

Sources: the QwenLM/Qwen README and the models' config.json files (see shared/docs/REFERENCE.md sections 1 and 4).
"""
import re
from dataclasses import dataclass
from typing import Optional

from .config import QwenConfig


@dataclass(frozen=True)
class PublishedSize:
    name: str  # as Qwen writes it in prose: "1.8B"
    repo_size: str  # as the Hub repo ids write it: "1_8B"
    hidden: int
    layers: int
    heads: int
    ffn: int  # MLP width; config intermediate_size is twice this
    vocab_rows: int
    seq_length: int
    rotary_base: float
    ntk_logn: bool
    # Batch 1, context of 1 token, 2048 new tokens, A100-80G: (tokens/s, peak GiB) per precision.
    speed_memory: dict
    # Chat models' accuracy, precision -> (MMLU, C-Eval, GSM8K, HumanEval).
    accuracy: dict

    def config(self) -> QwenConfig:
        return QwenConfig(hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                          vocab_size=self.vocab_rows, intermediate_size=2 * self.ffn, kv_channels=128,
                          seq_length=self.seq_length, max_position_embeddings=32768,
                          rotary_emb_base=self.rotary_base, use_dynamic_ntk=self.ntk_logn,
                          use_logn_attn=self.ntk_logn, torch_dtype="bfloat16")


SIZES = {s.name: s for s in (
    PublishedSize("1.8B", "1_8B", 2048, 24, 16, 5504, 151936, 8192, 1e4, True,
                  {"bf16": (54.09, 4.23), "int8": (55.56, 3.48), "int4": (71.07, 2.91)},
                  {"bf16": (43.3, 55.6, 33.7, 26.2), "int8": (43.1, 55.8, 33.0, 27.4),
                   "int4": (42.9, 52.8, 31.2, 25.0)}),
    PublishedSize("7B", "7B", 4096, 32, 32, 11008, 151936, 8192, 1e4, True,
                  {"bf16": (40.93, 16.99), "int8": (37.47, 11.20), "int4": (50.09, 8.21)},
                  {"bf16": (55.8, 59.7, 50.3, 37.2), "int8": (55.4, 59.4, 48.3, 34.8),
                   "int4": (55.1, 59.2, 49.7, 29.9)}),
    PublishedSize("14B", "14B", 5120, 40, 40, 13696, 152064, 2048, 1e4, True,
                  {"bf16": (32.22, 30.15), "int8": (29.28, 18.81), "int4": (38.72, 13.01)},
                  {"bf16": (64.6, 69.8, 60.1, 43.9), "int8": (63.6, 68.6, 60.0, 48.2),
                   "int4": (63.3, 69.0, 59.8, 45.7)}),
    PublishedSize("72B", "72B", 8192, 80, 64, 24576, 152064, 8192, 1e6, False,
                  {"bf16": (8.48, 144.69), "int8": (9.05, 81.27), "int4": (11.32, 48.86)},
                  {"bf16": (74.4, 80.1, 76.4, 64.6), "int8": (73.5, 80.1, 73.5, 62.2),
                   "int4": (73.4, 80.1, 75.3, 61.6)}),
)}
VARIANTS = ("", "-Chat", "-Chat-Int4", "-Chat-Int8")
PRECISION_OF_VARIANT = {"": "bf16", "-Chat": "bf16", "-Chat-Int4": "int4", "-Chat-Int8": "int8"}


@dataclass(frozen=True)
class PublishedModel:
    size: PublishedSize
    variant: str

    @property
    def name(self) -> str:
        return f"Qwen-{self.size.name}{self.variant}"

    @property
    def repo_id(self) -> str:
        return f"Qwen/Qwen-{self.size.repo_size}{self.variant}"

    @property
    def precision(self) -> str:
        return PRECISION_OF_VARIANT[self.variant]


MODELS = {f"{s.name}{v}".lower(): PublishedModel(s, v) for s in SIZES.values() for v in VARIANTS}


def find_published(name: str) -> Optional[PublishedModel]:
    """`Qwen-14B-Chat`, `Qwen-1.8B-Chat`, `Qwen-1_8B-Chat`, `Qwen/Qwen-14B-Chat` (any case) -> the published model."""
    m = re.fullmatch(r"(?:qwen/)?qwen-(.+)", name.strip().lower())
    return MODELS.get(m.group(1).replace("1_8b", "1.8b")) if m else None


def published_names() -> list[str]:
    return [m.name for m in MODELS.values()]
