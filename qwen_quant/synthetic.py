"""Random Qwen checkpoints with real layouts and shapes, for tests and benchmarks (no weights to download)."""
import dataclasses
import json
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import write_shards
from .config import QuantConfig, QwenConfig
from .gptq import num_groups
from .layout import EMBEDDING, FINAL_NORM, LM_HEAD, QUANTIZED_LINEARS, block_prefix, linear_shapes
from .packing import pack_qweight, pack_qzeros


# Each norm is written just before the first linear it feeds, as in Qwen's files.
NORM_BEFORE = {"attn.c_attn": "ln_1", "mlp.w1": "ln_2"}


def random_tensors(config: QwenConfig, dtype: torch.dtype, seed: int = 0) -> Iterator:
    """(name, tensor) in checkpoint order, one at a time, so a large checkpoint never sits in memory whole."""
    g = torch.Generator().manual_seed(seed)
    h, V = config.hidden_size, config.vocab_size

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    yield EMBEDDING, rand(V, h, std=1.0)
    for i in range(config.num_hidden_layers):
        p = block_prefix(i)
        for path, (k, n, bias) in linear_shapes(config).items():
            if path in NORM_BEFORE:
                yield p + NORM_BEFORE[path] + ".weight", (1 + rand(h, std=0.1).float()).to(dtype)
            yield p + path + ".weight", rand(n, k, std=k**-0.5)
            if bias:
                yield p + path + ".bias", rand(n, std=0.1)
    yield FINAL_NORM, torch.ones(h, dtype=dtype)
    yield LM_HEAD, rand(V, h, std=h**-0.5)


def save_random_checkpoint(folder, config: QwenConfig, dtype: torch.dtype = torch.float32, seed: int = 0,
                           max_shard_bytes: int = 4 * 10**9) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # The caller's config is left as it was: the saved copy records the dtype written.
    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    dataclasses.replace(config, torch_dtype=dtype_name).save(folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False}) + "\n")
    write_shards(random_tensors(config, dtype, seed), folder, max_shard_bytes)
    return folder


def random_gptq(K: int, N: int, bits: int, group_size: int, *, generator: torch.Generator, symmetric: bool = True,
                act_order: bool = False, lowest_zero: int = 1) -> tuple:
    """A random GPTQ layer as a quantizer makes one, drawn in this order from generator: codes q int32 [K, N]; true
    zero points int32 [G, N], 2^(bits-1) when symmetric, else drawn from lowest_zero up (v1 files cannot store 0);
    scale draws float32 [G, N], uniform in [0, 1), for the caller to put at its layer's scale; and g_idx int32 [K],
    k // group, shuffled for act_order. G = ceil(K / group): the last group is shorter when the size does not divide K."""
    group = K if group_size == -1 else group_size
    G = num_groups(K, group)
    codes = torch.randint(0, 2**bits, (K, N), generator=generator, dtype=torch.int32)
    zeros = (torch.full((G, N), 2 ** (bits - 1), dtype=torch.int32) if symmetric
             else torch.randint(lowest_zero, 2**bits, (G, N), generator=generator, dtype=torch.int32))
    scale_draws = torch.rand(G, N, generator=generator)
    g_idx = torch.arange(K, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=generator)]
    return codes, zeros, scale_draws, g_idx


def random_quantized_tensors(config: QwenConfig, quant: QuantConfig, seed: int = 0) -> Iterator:
    """A random checkpoint in the published GPTQ layout: random codes, fp16 scales at the scale of a real layer."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in random_tensors(config, torch.float16, seed):
        owner = name.rsplit(".", 1)[0]
        if not any(owner.endswith(p) for p in QUANTIZED_LINEARS) or name.endswith(".bias"):
            yield name, tensor
        else:
            n, k = tensor.shape
            codes, zeros, scale_draws, g_idx = random_gptq(k, n, quant.bits, quant.group_size, generator=g,
                                                           symmetric=quant.sym)
            yield owner + ".qweight", pack_qweight(codes, quant.bits)
            yield owner + ".qzeros", pack_qzeros(zeros, quant.bits, quant.checkpoint_format)
            yield owner + ".scales", (scale_draws * 2 * k**-0.5 / 2**quant.bits).half()
            yield owner + ".g_idx", g_idx
            if not owner.endswith("c_attn"):  # the published files carry a zero bias on the bias-free linears
                yield owner + ".bias", torch.zeros(n, dtype=torch.float16)


def save_random_quantized_checkpoint(folder, config: QwenConfig, quant: QuantConfig, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dataclasses.replace(config, torch_dtype="float16", quantization_config=quant).save(folder)
    write_shards(random_quantized_tensors(config, quant, seed), folder)
    return folder
