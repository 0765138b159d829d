"""The published Qwen models as data: every dense size of every generation (v1, Qwen1.5, Qwen2, Qwen2.5, Qwen3) with
its architecture and Hub repo ids, and Qwen's published speed / memory / accuracy figures, which exist for v1 only.

Sources: the QwenLM/Qwen README and the models' config.json files (see shared/docs/REFERENCE.md sections 1 and 4).
"""
from dataclasses import dataclass, field
from typing import Optional

from .config import QwenConfig


@dataclass(frozen=True)
class Generation:
    """What the sizes of one generation share."""

    name: str  # the repo ids' prefix: "Qwen" (v1), "Qwen1.5", "Qwen2", "Qwen2.5", "Qwen3"
    model_type: str  # config.json's
    # The repo ids' suffixes: the base model, the chat model (the one to quantize), Qwen's Int4 and Int8 copies of
    # it. Not every size has every quantized copy on the Hub; a name that has none fails at its download.
    variants: tuple
    context: int  # max_position_embeddings (of most sizes: Qwen2-0.5B's base model says 131072)
    head_dim: Optional[int] = None  # None: hidden / heads


QWEN = Generation("Qwen", "qwen", ("", "-Chat", "-Chat-Int4", "-Chat-Int8"), 32768)
QWEN1_5 = Generation("Qwen1.5", "qwen2", ("", "-Chat", "-Chat-GPTQ-Int4", "-Chat-GPTQ-Int8"), 32768)
QWEN2 = Generation("Qwen2", "qwen2", ("", "-Instruct", "-Instruct-GPTQ-Int4", "-Instruct-GPTQ-Int8"), 32768)
QWEN2_5 = Generation("Qwen2.5", "qwen2", ("", "-Instruct", "-Instruct-GPTQ-Int4", "-Instruct-GPTQ-Int8"), 32768)
QWEN3 = Generation("Qwen3", "qwen3", ("-Base", "", "-GPTQ-Int4", "-GPTQ-Int8"), 40960, head_dim=128)


@dataclass(frozen=True)
class PublishedSize:
    generation: Generation
    name: str  # as Qwen writes it in prose: "1.8B"
    repo_size: str  # as the Hub repo ids write it: "1_8B" (v1), "1.5B"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int  # config.json's: v1's is twice the MLP width (QwenConfig.ffn_size)
    vocab_rows: int
    tied: bool  # tie_word_embeddings: the head is the embedding
    rotary_base: float
    seq_length: int = 8192  # v1's dynamic-NTK / logN base length
    ntk_logn: bool = False
    # Batch 1, context of 1 token, 2048 new tokens, A100-80G: (tokens/s, peak GiB) per precision; empty where Qwen
    # published none (every generation after v1).
    speed_memory: dict = field(default_factory=dict)
    # Chat models' accuracy, precision -> (MMLU, C-Eval, GSM8K, HumanEval); empty likewise.
    accuracy: dict = field(default_factory=dict)

    def config(self) -> QwenConfig:
        g = self.generation
        return QwenConfig(hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                          num_key_value_heads=self.kv_heads, vocab_size=self.vocab_rows,
                          intermediate_size=self.intermediate_size, kv_channels=g.head_dim,
                          seq_length=self.seq_length, max_position_embeddings=g.context,
                          rotary_emb_base=self.rotary_base, use_dynamic_ntk=self.ntk_logn,
                          use_logn_attn=self.ntk_logn, tie_word_embeddings=self.tied, torch_dtype="bfloat16",
                          model_type=g.model_type)

    @property
    def ffn(self) -> int:
        """The MLP width."""
        return self.config().ffn_size


# v1's rows: (generation, name, repo size, hidden, layers, heads, kv heads, intermediate_size, vocab rows, tied,
# rope base, seq_length, NTK / logN, speed and memory, accuracy); the later ones stop at the rope base (1e6, no
# NTK / logN, no published figures). Architectures as the models' config.json files give them.
PUBLISHED = (
    PublishedSize(QWEN, "1.8B", "1_8B", 2048, 24, 16, 16, 11008, 151936, False, 1e4, 8192, True,
                  {"bf16": (54.09, 4.23), "int8": (55.56, 3.48), "int4": (71.07, 2.91)},
                  {"bf16": (43.3, 55.6, 33.7, 26.2), "int8": (43.1, 55.8, 33.0, 27.4),
                   "int4": (42.9, 52.8, 31.2, 25.0)}),
    PublishedSize(QWEN, "7B", "7B", 4096, 32, 32, 32, 22016, 151936, False, 1e4, 8192, True,
                  {"bf16": (40.93, 16.99), "int8": (37.47, 11.20), "int4": (50.09, 8.21)},
                  {"bf16": (55.8, 59.7, 50.3, 37.2), "int8": (55.4, 59.4, 48.3, 34.8),
                   "int4": (55.1, 59.2, 49.7, 29.9)}),
    PublishedSize(QWEN, "14B", "14B", 5120, 40, 40, 40, 27392, 152064, False, 1e4, 2048, True,
                  {"bf16": (32.22, 30.15), "int8": (29.28, 18.81), "int4": (38.72, 13.01)},
                  {"bf16": (64.6, 69.8, 60.1, 43.9), "int8": (63.6, 68.6, 60.0, 48.2),
                   "int4": (63.3, 69.0, 59.8, 45.7)}),
    PublishedSize(QWEN, "72B", "72B", 8192, 80, 64, 64, 49152, 152064, False, 1e6, 8192, False,
                  {"bf16": (8.48, 144.69), "int8": (9.05, 81.27), "int4": (11.32, 48.86)},
                  {"bf16": (74.4, 80.1, 76.4, 64.6), "int8": (73.5, 80.1, 73.5, 62.2),
                   "int4": (73.4, 80.1, 75.3, 61.6)}),
    PublishedSize(QWEN1_5, "0.5B", "0.5B", 1024, 24, 16, 16, 2816, 151936, True, 1e6),
    PublishedSize(QWEN1_5, "1.8B", "1.8B", 2048, 24, 16, 16, 5504, 151936, False, 1e6),
    PublishedSize(QWEN1_5, "4B", "4B", 2560, 40, 20, 20, 6912, 151936, False, 1e6),
    PublishedSize(QWEN1_5, "7B", "7B", 4096, 32, 32, 32, 11008, 151936, False, 1e6),
    PublishedSize(QWEN1_5, "14B", "14B", 5120, 40, 40, 40, 13696, 152064, False, 1e6),
    PublishedSize(QWEN1_5, "32B", "32B", 5120, 64, 40, 8, 27392, 152064, False, 1e6),
    PublishedSize(QWEN1_5, "72B", "72B", 8192, 80, 64, 64, 24576, 152064, False, 1e6),
    PublishedSize(QWEN1_5, "110B", "110B", 8192, 80, 64, 8, 49152, 152064, False, 1e6),
    PublishedSize(QWEN2, "0.5B", "0.5B", 896, 24, 14, 2, 4864, 151936, True, 1e6),
    PublishedSize(QWEN2, "1.5B", "1.5B", 1536, 28, 12, 2, 8960, 151936, True, 1e6),
    PublishedSize(QWEN2, "7B", "7B", 3584, 28, 28, 4, 18944, 152064, False, 1e6),
    PublishedSize(QWEN2, "72B", "72B", 8192, 80, 64, 8, 29568, 152064, False, 1e6),
    PublishedSize(QWEN2_5, "0.5B", "0.5B", 896, 24, 14, 2, 4864, 151936, True, 1e6),
    PublishedSize(QWEN2_5, "1.5B", "1.5B", 1536, 28, 12, 2, 8960, 151936, True, 1e6),
    PublishedSize(QWEN2_5, "3B", "3B", 2048, 36, 16, 2, 11008, 151936, True, 1e6),
    PublishedSize(QWEN2_5, "7B", "7B", 3584, 28, 28, 4, 18944, 152064, False, 1e6),
    PublishedSize(QWEN2_5, "14B", "14B", 5120, 48, 40, 8, 13824, 152064, False, 1e6),
    PublishedSize(QWEN2_5, "32B", "32B", 5120, 64, 40, 8, 27648, 152064, False, 1e6),
    PublishedSize(QWEN2_5, "72B", "72B", 8192, 80, 64, 8, 29568, 152064, False, 1e6),
    PublishedSize(QWEN3, "0.6B", "0.6B", 1024, 28, 16, 8, 3072, 151936, True, 1e6),
    PublishedSize(QWEN3, "1.7B", "1.7B", 2048, 28, 16, 8, 6144, 151936, True, 1e6),
    PublishedSize(QWEN3, "4B", "4B", 2560, 36, 32, 8, 9728, 151936, True, 1e6),
    PublishedSize(QWEN3, "8B", "8B", 4096, 36, 32, 8, 12288, 151936, False, 1e6),
    PublishedSize(QWEN3, "14B", "14B", 5120, 40, 40, 8, 17408, 151936, False, 1e6),
    PublishedSize(QWEN3, "32B", "32B", 5120, 64, 64, 8, 25600, 151936, False, 1e6),
)
SIZES = {s.name: s for s in PUBLISHED if s.speed_memory}  # the sizes with Qwen's published figures: v1's
PRECISION_OF_SUFFIX = {"Int4": "int4", "Int8": "int8"}  # a variant's last four letters; the others are bf16


@dataclass(frozen=True)
class PublishedModel:
    size: PublishedSize
    variant: str

    @property
    def name(self) -> str:
        return f"{self.size.generation.name}-{self.size.name}{self.variant}"

    @property
    def repo_id(self) -> str:
        return f"Qwen/{self.size.generation.name}-{self.size.repo_size}{self.variant}"

    @property
    def precision(self) -> str:
        return PRECISION_OF_SUFFIX.get(self.variant[-4:], "bf16")

    @property
    def chat_model(self) -> "PublishedModel":
        """The full-precision chat model of this size: what Qwen quantized, and what to quantize."""
        return PublishedModel(self.size, self.size.generation.variants[1])


# Each model under its name and its repo id's (v1 writes 1.8B as 1_8B there), in lower case.
MODELS = {key: model for model in (PublishedModel(s, v) for s in PUBLISHED for v in s.generation.variants)
          for key in (model.name.lower(), model.repo_id.lower().removeprefix("qwen/"))}


def find_published(name: str) -> Optional[PublishedModel]:
    """`Qwen-14B-Chat`, `Qwen-1_8B-Chat`, `Qwen/Qwen2.5-7B-Instruct`, `Qwen3-8B` (any case) -> the published model."""
    return MODELS.get(name.strip().lower().removeprefix("qwen/"))


def published_names() -> list[str]:
    """The published names, one pattern per generation: `Qwen2-{0.5B,7B}{,-Instruct}`."""
    generations = {s.generation: [] for s in PUBLISHED}
    for s in PUBLISHED:
        generations[s.generation].append(s.name)
    return [f"{g.name}-{{{','.join(names)}}}{{{','.join(g.variants)}}}" for g, names in generations.items()]
