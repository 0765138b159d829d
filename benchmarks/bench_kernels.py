"""Quantized matmul speed on the Qwen-7B linear shapes.

CPU: QuantLinear's cpu backend (Int4 and Int8, group 128, symmetric) against dense bf16 F.linear at M = 1, 4, 16
(decode and short prompts) and 64, 256, 2048 (prefill); --quick: M = 1, 16, 64. The three run in turns, one call
each per round, so that other processes slow them alike; large products get fewer rounds (a time budget per M).
CUDA (when present): the Triton kernels against fp16 / bf16 matmul at M = 1, 16, 64, 2048, with effective GB/s
(bytes of packed weights + scales + zeros + activations read, per second) and its percent of the device's copy
bandwidth measured here.

    python benchmarks/bench_kernels.py [--quick] [--m M ...] [--shapes KxN ...] [--json PATH] [--threads N]
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import add_common_args, machine, machine_line, write_json

from qwen_quant import packing
from qwen_quant.qlinear import QuantLinear

# (K, N) of attn.c_attn, attn.c_proj, mlp.w1 / w2, mlp.c_proj
QWEN_7B_SHAPES = [(4096, 12288), (4096, 4096), (4096, 11008), (11008, 4096)]
CPU_M = (1, 4, 16, 64, 256, 2048)
CPU_M_QUICK = (1, 16, 64)
CPU_BUDGET_S = 20  # per (shape, M), warm-up included: no new round starts after this many seconds (1 round at least)
CUDA_M = (1, 16, 64, 2048)
GROUP_SIZE = 128


def symmetric_layer(K: int, N: int, bits: int, backend: str, device, dtype) -> QuantLinear:
    """A random symmetric GPTQ layer, stored as a checkpoint stores it, then prepared for `backend`."""
    groups = K // GROUP_SIZE
    codes = torch.randint(0, 2 ** bits, (K, N), dtype=torch.int32)
    zeros = torch.full((groups, N), 2 ** (bits - 1), dtype=torch.int32)
    scales = (torch.rand(groups, N) * 0.01 + 0.001).half()
    return QuantLinear.from_packed(packing.pack_qweight(codes, bits), packing.pack_qzeros(zeros, bits), scales,
                                   None, None, bits=bits, group_size=GROUP_SIZE, backend=backend, dtype=dtype,
                                   device=device)


def time_ms_interleaved(fns: dict, rounds: int) -> dict:
    """impl -> (median, min, rounds) of wall ms. Each round calls every impl once, in turn, so a burst of load from
    other processes hits all of them; no round starts once CPU_BUDGET_S is spent. The min shows what a quiet machine
    would give when others are busy."""
    start = time.perf_counter()
    for fn in fns.values():
        fn()  # warm: kernels chosen, buffers allocated
    times = {impl: [] for impl in fns}
    for round_ in range(rounds):
        if round_ and time.perf_counter() - start > CPU_BUDGET_S:
            break
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - t0)
    return {impl: (statistics.median(t) * 1e3, min(t) * 1e3, len(t)) for impl, t in times.items()}


def bench_cpu(ms: tuple, rounds: int, shapes: list) -> list:
    rows = []
    print(f"\nCPU: cpu backend (bf16 activations, g{GROUP_SIZE} sym) vs dense bf16 F.linear, median ms, speed-up, "
          f"and min ms")
    print(f"{'K x N':>13} {'M':>4} {'bf16':>9} {'int4':>9} {'int8':>9} {'int4 x':>7} {'int8 x':>7}   "
          f"{'min bf16':>9} {'int4':>9} {'int8':>9} {'rounds':>6}")
    for K, N in shapes:
        dense = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
        int4 = symmetric_layer(K, N, 4, "cpu", "cpu", torch.bfloat16)
        int8 = symmetric_layer(K, N, 8, "cpu", "cpu", torch.bfloat16)
        for M in ms:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            times = time_ms_interleaved({"bf16_dense": lambda: F.linear(x, dense), "cpu_int4": lambda: int4(x),
                                         "cpu_int8": lambda: int8(x)}, rounds)
            t_dense, t4, t8 = (times[impl][0] for impl in ("bf16_dense", "cpu_int4", "cpu_int8"))
            fastest = " ".join(f"{times[impl][1]:9.3f}" for impl in times)
            print(f"{K:>6}x{N:<6} {M:>4} {t_dense:9.3f} {t4:9.3f} {t8:9.3f} {t_dense / t4:6.2f}x {t_dense / t8:6.2f}x"
                  f"   {fastest} {times['bf16_dense'][2]:>6}", flush=True)
            rows += [dict(device="cpu", K=K, N=N, M=M, impl=impl, median_ms=median, min_ms=fastest, rounds=n,
                          speedup_vs_bf16=t_dense / median) for impl, (median, fastest, n) in times.items()]
        del dense, int4, int8
    return rows


def copy_bandwidth_gbs() -> float:
    """Device memory bandwidth as a large copy achieves it (bytes read + written per second)."""
    import triton.testing
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_cuda(quick: bool) -> list:
    import triton.testing
    peak = copy_bandwidth_gbs()
    print(f"\nCUDA: {torch.cuda.get_device_name()}, copy bandwidth {peak:.0f} GB/s; median ms, effective GB/s, "
          f"% of copy bandwidth")
    print(f"{'K x N':>13} {'M':>5} {'impl':>10} {'ms':>8} {'GB/s':>7} {'%bw':>5} {'vs fp16':>8}")
    rows = []
    rep = 20 if quick else 100
    for K, N in QWEN_7B_SHAPES:
        layers = {f"triton_int{bits}": symmetric_layer(K, N, bits, "triton", "cuda", torch.float16)
                  for bits in (4, 8)}
        dense = {dtype: torch.randn(N, K, dtype=dtype, device="cuda") * 0.02
                 for dtype in (torch.float16, torch.bfloat16)}
        for M in CUDA_M:
            x = torch.randn(M, K, dtype=torch.float16, device="cuda")
            x_bf16 = x.bfloat16()
            runs = {"fp16": (lambda: F.linear(x, dense[torch.float16]), dense[torch.float16].nbytes),
                    "bf16": (lambda: F.linear(x_bf16, dense[torch.bfloat16]), dense[torch.bfloat16].nbytes)}
            for impl, layer in layers.items():
                runs[impl] = (lambda layer=layer: layer(x), layer.memory_bytes())
            times = {impl: triton.testing.do_bench(fn, rep=rep, return_mode="median") for impl, (fn, _) in runs.items()}
            for impl, (_, weight_bytes) in runs.items():
                gbs = (weight_bytes + x.nbytes) / (times[impl] * 1e-3) / 1e9
                rows.append(dict(device="cuda", K=K, N=N, M=M, impl=impl, median_ms=times[impl], gbs=gbs,
                                 pct_copy_bw=100 * gbs / peak, vs_fp16=times["fp16"] / times[impl]))
                print(f"{K:>6}x{N:<6} {M:>5} {impl:>10} {times[impl]:8.4f} {gbs:7.0f} {100 * gbs / peak:5.1f} "
                      f"{times['fp16'] / times[impl]:7.2f}x", flush=True)
        del layers, dense
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--m", type=int, nargs="+", help=f"CPU batch rows to time (default {CPU_M}; --quick "
                        f"{CPU_M_QUICK})")
    parser.add_argument("--shapes", nargs="+", metavar="KxN", help="CPU shapes to time (default: all of "
                        f"{' '.join(f'{K}x{N}' for K, N in QWEN_7B_SHAPES)})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(machine_line(info))
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes] if args.shapes else QWEN_7B_SHAPES
    rows = bench_cpu(args.m or (CPU_M_QUICK if args.quick else CPU_M), rounds=10 if args.quick else 50, shapes=shapes)
    if torch.cuda.is_available():
        rows += bench_cuda(args.quick)
    info["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(f"load average at the end: {info['load_avg_1min_end']}")
    write_json(args.json, {"machine": info, "results": rows})


if __name__ == "__main__":
    main()
