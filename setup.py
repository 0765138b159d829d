from pathlib import Path

from setuptools import setup

setup(
    name="qwen_quant",
    version="0.1.0",
    description="Post-training GPTQ quantization and fast inference for the Qwen language models (v1 to Qwen3)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level kernels/ and calibration/ folders import as qwen_quant.kernels / qwen_quant.calibration.
    packages=["qwen_quant", "qwen_quant.kernels", "qwen_quant.calibration"],
    package_dir={"qwen_quant": "qwen_quant", "qwen_quant.kernels": "kernels", "qwen_quant.calibration": "calibration"},
    # The embedded demo model (qwen-quantize demo runs offline straight after install), the chat check's questions
    # and the sources of our CPU operators (built on first use, qwen_quant/cpu_native.py).
    package_data={"qwen_quant": ["stories260k_qwen/*", "chat_prompts.jsonl", "*.cpp"],
                  "qwen_quant.kernels": ["*.json"]},
    install_requires=[
        # This range resolves to the local 2.13.0 CPU build; a looser pin pulls a multi-GB CUDA build.
        "torch>=2.4,<2.14",
        "triton",
        "tiktoken>=0.5",
        "safetensors>=0.4",
        "numpy",
        "datasets",
        "huggingface_hub",
        "tqdm",
        "tokenizers",  # models whose tokenizer is a tokenizer.json (SmolLM2, Qwen1.5 and later)
    ],
    extras_require={
        # gguf builds the SmolLM2-135M test model; modelscope's cache layout is tested.
        # transformers: the independent reference the qwen2 / qwen3 runtime is tested against.
        "dev": ["pytest>=7", "matplotlib", "gguf", "modelscope", "lm_eval>=0.4", "transformers"],
        "modelscope": ["modelscope"],
        # qwen-quantize eval --tasks and qwen_quant.harness (lm-evaluation-harness 0.4 has no model entry points: its
        # registry learns the name "qwen_quant" when qwen_quant.harness is imported).
        "eval": ["lm_eval>=0.4"],
    },
    entry_points={"console_scripts": ["qwen-quantize=qwen_quant.cli:main"]},
)
