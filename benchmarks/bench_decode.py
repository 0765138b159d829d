"""Greedy decoding speed and memory by Qwen's published protocol: batch 1, a context of 1 token, N new tokens.

Random checkpoints with the Qwen-1.8B shapes (GPU: 7B too) in bf16, Int8 and Int4 (group 128, symmetric, the
published layout). Each model is loaded and run in a fresh process, so its peak memory is its own.

    python benchmarks/bench_decode.py [--quick] [--tokens N] [--shape 1.8B] [--layers L] [--json PATH]
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import GIB, add_common_args, isolated, machine, machine_line, table, write_json
from qwen_quant import QuantConfig, QwenForCausalLM
from qwen_quant.memory import estimate_memory, measure_loaded_bytes
from qwen_quant.published import SIZES
from qwen_quant.synthetic import save_random_checkpoint, save_random_quantized_checkpoint

PRECISIONS = ("bf16", "int8", "int4")


def decode(folder: str, tokens: int, device: str, warmup: int) -> dict:
    model = QwenForCausalLM.from_pretrained(folder, device=device)
    prompt = torch.tensor([[151643]], device=device) if model.config.vocab_size > 151643 else torch.tensor([[1]])
    model.generate(prompt, max_new_tokens=warmup)  # kernels chosen, caches and allocator warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape[1] == tokens + 1
    return {"tokens_per_s": tokens / seconds, "loaded_bytes": measure_loaded_bytes(model)["total"],
            "backend": next((m.backend for m in model.modules() if hasattr(m, "backend")), "dense")}


def make_checkpoint(root: Path, precision: str, shape: str, layers: int) -> Path:
    config = SIZES[shape].config()
    config.num_hidden_layers = layers
    if precision == "bf16":
        return save_random_checkpoint(root / precision, config, dtype=torch.bfloat16)
    bits = 8 if precision == "int8" else 4
    return save_random_quantized_checkpoint(root / precision, config, QuantConfig(bits=bits, group_size=128))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--shape", default="1.8B", choices=sorted(SIZES))
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default: all; --quick: 4)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens (default 64 on CPU, 2048 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    size = SIZES[args.shape]
    layers = args.layers or (4 if args.quick else size.layers)
    tokens = args.tokens or (16 if args.quick else 64 if args.device == "cpu" else 2048)
    info = machine()
    print(machine_line(info))
    print(f"Qwen-{args.shape} shapes, {layers} of {size.layers} blocks, vocab {size.vocab_rows}; batch 1, "
          f"1-token context, {tokens} new tokens, {args.device}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            folder = make_checkpoint(Path(tmp), precision, args.shape, layers)
            run = isolated(decode, str(folder), tokens, args.device, warmup=4)
            config = size.config()
            config.num_hidden_layers = layers
            estimate = estimate_memory(config, bits=None if precision == "bf16" else int(precision[3:]),
                                       tokens=tokens + 4, device=args.device)
            rows.append({"precision": precision, "backend": run["result"]["backend"],
                         "tokens_per_s": run["result"]["tokens_per_s"],
                         "loaded_gib": run["result"]["loaded_bytes"] / GIB, "estimate_gib": estimate.total / GIB,
                         "peak_rss_gib": run["peak_rss_bytes"] / GIB, "peak_cuda_gib": run["peak_cuda_bytes"] / GIB})
            folder_bytes = sum(f.stat().st_size for f in folder.iterdir())
            rows[-1]["checkpoint_gib"] = folder_bytes / GIB
            for f in folder.iterdir():
                f.unlink()
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
    print(table(rows, [("precision", "precision", ""), ("backend", "backend", ""), ("tokens_per_s", "tok/s", ".2f"),
                       ("speedup", "vs bf16", ".2f"), ("checkpoint_gib", "file GiB", ".3f"),
                       ("loaded_gib", "tensors GiB", ".3f"), ("estimate_gib", "estimate GiB", ".3f"),
                       ("peak_rss_gib", "peak RSS GiB", ".2f"), ("peak_cuda_gib", "peak CUDA GiB", ".2f")]))
    write_json(args.json, {"machine": info, "shape": args.shape, "layers": layers, "tokens": tokens, "rows": rows})


if __name__ == "__main__":
    main()
