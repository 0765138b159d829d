"""The tests' small model config: every dimension real Qwen code paths need, small enough for milliseconds."""
from qwen_quant.config import QwenConfig


def tiny_config(**overrides) -> QwenConfig:
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                  intermediate_size=256, seq_length=64, max_position_embeddings=512, torch_dtype="float32")
    fields.update(overrides)
    return QwenConfig(**fields)
