"""qwen_quant: GPTQ quantization and fast inference for the Qwen (v1) language models."""
from .config import QuantConfig, QwenConfig
from .model import QwenForCausalLM
from .quantize import quantize, summary_table
from .settings import QuantizeSettings
from .tokenizer import JsonTokenizer, QwenTokenizer, load_tokenizer

__all__ = ["QwenConfig", "QuantConfig", "QwenForCausalLM", "QwenTokenizer", "JsonTokenizer", "load_tokenizer",
           "quantize", "QuantizeSettings", "summary_table"]
