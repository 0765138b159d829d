"""First-token latency (prefill) of a 64- and a 512-token prompt: bf16 vs Int8 vs Int4, side by side in one process.

Random checkpoints with the Qwen-1.8B shapes (a few blocks, the full-vocabulary lm_head), written as bench_decode
writes them: bf16, and Int8 / Int4 in the published layout (group 128, symmetric). The three models are loaded
together and take turns: each round runs every prompt length on every model once, so that load from other processes
slows them alike and the ratios stay fair on a busy machine. First token = model.generate(prompt,
max_new_tokens=1): KV cache set-up, the whole prompt through every block, the lm_head on the last position, argmax.

    python benchmarks/bench_prefill.py [--quick] [--layers L] [--prompts 64 512] [--rounds R] [--json PATH]
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_decode import PRECISIONS, make_checkpoint
from common import add_common_args, machine, machine_line, table, write_json
from qwen_quant import QwenForCausalLM
from qwen_quant.published import SIZES
from qwen_quant.qlinear import QuantLinear, cpu_prefill_rows, cpu_prompt_product

SHAPE = "1.8B"
PROMPTS = (64, 512)


def first_token_seconds(model: QwenForCausalLM, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=1)
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + 1
    return seconds


def prefill_route(model: QwenForCausalLM, tokens: int) -> str:
    """How a prompt of `tokens` tokens runs the model's linears: dense, a backend's kernels, or the cpu backend's
    prompt route, the native GEMM or the eager tiles (and from how many rows this process measured that it wins)."""
    linear = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    if linear is None:
        return "dense"
    if linear.backend != "cpu":
        return linear.backend
    return f"{cpu_prompt_product(linear, tokens)} (prompt route from {cpu_prefill_rows(linear):.0f} rows)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default 4; --quick: 1)")
    parser.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS), help="prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick: 2)")
    args = parser.parse_args()
    size = SIZES[SHAPE]
    layers = args.layers or (1 if args.quick else 4)
    rounds = args.rounds or (2 if args.quick else 5)
    info = machine()
    print(machine_line(info))
    print(f"Qwen-{SHAPE} shapes, {layers} of {size.layers} blocks, vocab {size.vocab_rows}; batch 1, prompts of "
          f"{args.prompts} tokens, first token; {rounds} rounds, the models taking turns")
    gen = torch.Generator().manual_seed(0)
    prompts = {T: torch.randint(0, 151643, (1, T), generator=gen) for T in args.prompts}
    with tempfile.TemporaryDirectory() as tmp:
        models = {p: QwenForCausalLM.from_pretrained(str(make_checkpoint(Path(tmp), p, SHAPE, layers)))
                  for p in PRECISIONS}
    for model in models.values():
        model.generate(prompts[min(prompts)], max_new_tokens=1)  # warm: kernels chosen, caches allocated
    times = {(T, p): [] for T in prompts for p in models}
    for _ in range(rounds):
        for T, prompt in prompts.items():
            for precision, model in models.items():
                times[T, precision].append(first_token_seconds(model, prompt))
    rows = []
    for T in prompts:
        base = statistics.median(times[T, "bf16"])
        for precision, model in models.items():
            median = statistics.median(times[T, precision])
            rows.append({"prompt_tokens": T, "precision": precision,
                         "backend": next((m.backend for m in model.modules() if hasattr(m, "backend")), "dense"),
                         "route": prefill_route(model, T),
                         "median_s": median, "min_s": min(times[T, precision]),
                         "prefill_tokens_per_s": T / median, "speed_vs_bf16": base / median})
    print(table(rows, [("prompt_tokens", "prompt", "d"), ("precision", "precision", ""), ("backend", "backend", ""),
                       ("route", "route", ""),
                       ("median_s", "first token s", ".3f"), ("min_s", "min s", ".3f"),
                       ("prefill_tokens_per_s", "prompt tok/s", ".1f"), ("speed_vs_bf16", "vs bf16", ".2f")]))
    info["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(f"load average at the end: {info['load_avg_1min_end']}")
    write_json(args.json, {"machine": info, "shape": SHAPE, "layers": layers, "rounds": rounds, "rows": rows})


if __name__ == "__main__":
    main()
