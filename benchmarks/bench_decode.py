"""Greedy decoding speed, eager and compiled (--compile), of random Qwen-shaped checkpoints and of SmolLM2 beside
llama.cpp.

- Qwen's published protocol: batch 1, a context of 1 token, N new tokens; random checkpoints with the Qwen-1.8B
  shapes (GPU: 7B too) in bf16, Int8 and Int4 (group 128, symmetric, the published layout), with their memory.
- --smollm2: the real SmolLM2-135M-Instruct in bf16 and its Int8 / Int4 g128 exports (round-to-nearest: GPTQ's
  exports have the same layout and speed), and its Int4 in the qwen2 layout (the later generations': q/k/v apart
  over 3 kv heads), 64 new tokens after the ChatML France question; beside it llama.cpp
  (llama-cpp-python, optional: pip install llama-cpp-python) decoding the GGUF the model was built from, greedy, on
  as many threads as torch uses.
Speed = (new tokens - 1) / seconds from the first new token to the last: the decode steps alone, prompt excluded,
timed alike for every engine, the median of --repeats generations (default 3; --quick: 1). Each run is a fresh
process (its memory is its own); a compiled run is first compiled and warmed on the same cache shape, and its
compile time is reported apart.

    python benchmarks/bench_decode.py [--quick] [--compile] [--smollm2] [--tokens N] [--repeats R] [--shape 1.8B]
        [--layers L] [--json PATH]
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import GIB, add_common_args, isolated, machine, machine_line, shared_data_dir, smollm2_dir, table, \
    write_json
from qwen_quant import QuantConfig, QwenForCausalLM
from qwen_quant.memory import estimate_memory, measure_loaded_bytes
from qwen_quant.model import cache_length
from qwen_quant.published import SIZES
from qwen_quant.synthetic import save_random_checkpoint, save_random_quantized_checkpoint

PRECISIONS = ("bf16", "int8", "int4")
QUESTION = "What is the capital of France?"


def decode_rate(step_times: list) -> float:
    """New tokens per second between the first new token and the last."""
    return (len(step_times) - 1) / (step_times[-1] - step_times[0])


def decode(folder: str, prompt: list, tokens: int, device: str, compiled: bool, repeats: int, dtype=None) -> dict:
    model = QwenForCausalLM.from_pretrained(folder, device=device, dtype=dtype)
    prompt = torch.tensor([prompt], device=device)
    # The cache the timed run needs, made first, so that warming up compiles the step the timed run uses.
    model.setup_cache(1, cache_length(prompt.shape[1] + tokens, compiled), prompt.shape[1])
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=4, compile=compiled)  # kernels chosen, step compiled, allocator warm
    warmup_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(repeats):
        step_times = []

        def stamp(_token):
            if device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter())

        out = model.generate(prompt, max_new_tokens=tokens, compile=compiled, streamer=stamp)
        assert out.shape[1] == prompt.shape[1] + tokens
        rates.append(decode_rate(step_times))
    return {"tokens_per_s": statistics.median(rates), "warmup_s": warmup_s,
            "loaded_bytes": measure_loaded_bytes(model)["total"],
            "backend": next((m.backend for m in model.modules() if hasattr(m, "backend")), "dense")}


def llama_cpp_decode(gguf: str, prompt: list, tokens: int, threads: int, repeats: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=len(prompt) + tokens + 8, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    for _ in zip(range(4), llm.generate(prompt, top_k=1, temp=0.0)):  # warm up
        pass
    rates = []
    for _ in range(repeats):
        llm.reset()
        step_times = []
        for _ in zip(range(tokens), llm.generate(prompt, top_k=1, temp=0.0)):
            step_times.append(time.perf_counter())
        rates.append(decode_rate(step_times))
    return {"tokens_per_s": statistics.median(rates)}


def make_checkpoint(root: Path, precision: str, shape: str, layers: int) -> Path:
    config = SIZES[shape].config()
    config.num_hidden_layers = layers
    if precision == "bf16":
        return save_random_checkpoint(root / precision, config, dtype=torch.bfloat16)
    bits = 8 if precision == "int8" else 4
    return save_random_quantized_checkpoint(root / precision, config, QuantConfig(bits=bits, group_size=128))


def modes(compile_too: bool) -> list:
    return [False, True] if compile_too else [False]


def run_row(model: str, precision: str, folder, prompt: list, tokens: int, device: str, compiled: bool,
            repeats: int) -> dict:
    # "bf16" is the dtype of a dense row whatever its checkpoint holds (SmolLM2's build is fp32).
    dtype = torch.bfloat16 if precision == "bf16" else None
    run = isolated(decode, str(folder), prompt, tokens, device, compiled, repeats, dtype)
    return {"model": model, "precision": precision, "mode": "compiled" if compiled else "eager",
            "backend": run["result"]["backend"], "tokens_per_s": run["result"]["tokens_per_s"],
            "warmup_s": run["result"]["warmup_s"], "loaded_gib": run["result"]["loaded_bytes"] / GIB,
            "peak_rss_gib": run["peak_rss_bytes"] / GIB, "peak_cuda_gib": run["peak_cuda_bytes"] / GIB}


def add_ratios(rows: list) -> None:
    """Each row's speed against its model's eager bf16 row, and a compiled row's against its eager one."""
    eager = {(r["model"], r["precision"]): r["tokens_per_s"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        base = eager.get((r["model"], "bf16"))
        r["vs_bf16_eager"] = r["tokens_per_s"] / base if base else None
        if r["mode"] == "compiled":
            r["compiled_vs_eager"] = r["tokens_per_s"] / eager[r["model"], r["precision"]]


def protocol_rows(args, layers: int, tokens: int) -> list:
    size = SIZES[args.shape]
    prompt = [151643] if size.vocab_rows > 151643 else [1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            folder = make_checkpoint(Path(tmp), precision, args.shape, layers)
            folder_bytes = sum(f.stat().st_size for f in folder.iterdir())
            config = size.config()
            config.num_hidden_layers = layers
            estimate = estimate_memory(config, bits=None if precision == "bf16" else int(precision[3:]),
                                       tokens=tokens + 4, device=args.device)
            for compiled in modes(args.compile):
                rows.append(run_row(f"Qwen-{args.shape} shapes", precision, folder, prompt, tokens, args.device,
                                    compiled, args.repeats))
                rows[-1].update(checkpoint_gib=folder_bytes / GIB, estimate_gib=estimate.total / GIB)
            for f in folder.iterdir():
                f.unlink()
    return rows


def smollm2_rows(args) -> list:
    from qwen_quant.quantize import quantize
    from qwen_quant.tokenizer import build_chat_input, load_tokenizer

    data = shared_data_dir()
    fp = smollm2_dir(data)
    prompt = build_chat_input(load_tokenizer(fp), QUESTION, system=None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # The v1 layout in every precision, and the later generations' layout (q/k/v apart, 3 kv heads) in Int4.
        folders, sources = {("SmolLM2-135M", "bf16"): fp}, {"qwen": fp, "qwen2": smollm2_dir(data, "qwen2")}
        for layout, bits in (("qwen", 8), ("qwen", 4), ("qwen2", 4)):
            model = "SmolLM2-135M" + ("" if layout == "qwen" else f" {layout} layout")
            folders[model, f"int{bits}"] = Path(tmp) / f"{layout}-int{bits}"
            quantize(sources[layout], folders[model, f"int{bits}"], bits=bits, group_size=128, method="rtn",
                     mse=False, progress=False)
        for (model, precision), folder in folders.items():
            for compiled in modes(args.compile):
                rows.append(run_row(model, precision, folder, prompt, 64, "cpu", compiled, args.repeats))
    gguf = data / "smollm2_135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        run = isolated(llama_cpp_decode, str(gguf), prompt, 64, torch.get_num_threads(), args.repeats)
        rows.append({"model": "SmolLM2-135M", "precision": "GGUF Q4_1", "mode": "llama.cpp", "backend": "llama.cpp",
                     "tokens_per_s": run["result"]["tokens_per_s"], "peak_rss_gib": run["peak_rss_bytes"] / GIB})
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python), its row is left out")
    return rows


COLUMNS = [("model", "model", ""), ("precision", "precision", ""), ("mode", "mode", ""), ("backend", "backend", ""),
           ("tokens_per_s", "tok/s", ".2f"), ("vs_bf16_eager", "vs bf16 eager", ".2f"),
           ("compiled_vs_eager", "compiled/eager", ".2f"), ("warmup_s", "warm-up s", ".1f"),
           ("checkpoint_gib", "file GiB", ".3f"), ("loaded_gib", "tensors GiB", ".3f"),
           ("estimate_gib", "estimate GiB", ".3f"), ("peak_rss_gib", "peak RSS GiB", ".2f"),
           ("peak_cuda_gib", "peak CUDA GiB", ".2f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--shape", default="1.8B", choices=sorted(SIZES))
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default: all; --quick: 4)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens (default 64 on CPU, 2048 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True) beside eager")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (real weights) and llama.cpp")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations a row, median (default 3; "
                        "--quick: 1)")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    size = SIZES[args.shape]
    layers = args.layers or (4 if args.quick else size.layers)
    tokens = args.tokens or (16 if args.quick else 64 if args.device == "cpu" else 2048)
    info = machine()
    print(machine_line(info))
    print(f"Qwen-{args.shape} shapes, {layers} of {size.layers} blocks, vocab {size.vocab_rows}; batch 1, "
          f"1-token context, {tokens} new tokens, {args.device}; {'eager and compiled' if args.compile else 'eager'}")
    rows = protocol_rows(args, layers, tokens)
    if args.smollm2:
        print("SmolLM2-135M-Instruct: ChatML France question, 64 new tokens, cpu")
        rows += smollm2_rows(args)
    add_ratios(rows)
    print(table(rows, [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]))
    info["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(f"load average at the end: {info['load_avg_1min_end']}")
    write_json(args.json, {"machine": info, "shape": args.shape, "layers": layers, "tokens": tokens, "rows": rows})


if __name__ == "__main__":
    main()
