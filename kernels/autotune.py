"""Timing the GPTQ matmul as a decode step sees it, and autotuning its per-GPU config table (configs.TABLE_PATH).

Timing (time_us): a CUDA graph of many calls cycling through enough copies of the weights to exceed twice the L2
cache, replayed and timed with CUDA events: the figure is device time per call, with no host or launch cost and no
weight left in L2 from the call before, as in a captured decode step. The host cost of an eager call (Python, the
launch) is measured apart (host_us). On the CPU (the Triton interpreter) both are the wall time of one direct call:
a check of the code, not a figure of speed.

Autotune (autotune_shape): for one shape class, every candidate config of a small space (block sizes, split-K, warps,
stages, and for prompts the dense route) is checked against an fp32 reference, then timed; the fastest correct one
goes into the table. Run on the device by benchmarks/gpu_check.py.
"""
import math
import statistics
import time
from typing import Callable, Optional

import torch

from .configs import (BUCKET_SAMPLE_M, DOT_MIN, SPLIT_K_MAX_M, MatmulConfig, config_problems, decode_split_k,
                      heuristic_config, per_word, shape_key)
from .gptq_matmul import device_config_source, gptq_matmul

TOLERANCE = 2e-3  # relative error of fp16 outputs against an fp32 reference (two summation orders)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copies_beyond_l2(bytes_per_copy: int, device: torch.device) -> int:
    """How many copies of an input of this size a timing cycles through so that none is still in L2 when it is
    read again (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, math.ceil(2 * l2 / max(bytes_per_copy, 1)) + 1)


def time_us(call: Callable[[int], object], copies: int, device: torch.device, calls: int = 64,
            replays: int = 7) -> float:
    """Median microseconds per call of call(0), call(1), ... (call(i) uses copy i % copies), timed as described in
    the module docstring. On the GPU, call must be capturable (no host reads, no allocation of persistent state)."""
    for i in range(copies):  # compiles kernels, makes workspaces, outside the capture
        call(i)
    sync(device)
    if device.type != "cuda":  # the interpreter: one more call, timed (a check of the code)
        t0 = time.perf_counter()
        call(0)
        return 1e6 * (time.perf_counter() - t0)
    calls = max(calls, copies)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # as torch.cuda.graphs.make_graphed_callables does: warm on a side stream
        call(0)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % copies)
    graph.replay()
    sync(device)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def repeats(M: int, copies: int) -> tuple:
    """(calls per graph, replays) for timing calls of M rows: prompts are compute bound and take milliseconds, so
    fewer of both suffice there."""
    return (64, 7) if M <= 64 else (max(copies, 4), 3)


def host_us(call: Callable[[int], object], copies: int, device: torch.device, calls: int = 200) -> float:
    """Microseconds of host time per eager call: the loop that issues `calls` calls, timed without waiting for the
    device (its queue is far deeper than this), so the figure is Python, argument binding and launch. On the CPU
    (the interpreter) one call."""
    calls = calls if device.type == "cuda" else 1
    call(0)
    sync(device)
    t0 = time.perf_counter()
    for i in range(calls):
        call(i % copies)
    seconds = time.perf_counter() - t0
    sync(device)
    return 1e6 * seconds / calls


def random_weight(K: int, N: int, bits: int, group: int, device: torch.device, seed: int) -> dict:
    """A random symmetric GPTQ weight as the kernel takes it (qweight, fp16 scales at a real layer's scale, a bias),
    drawn on the device: random int32 words are random codes."""
    g = torch.Generator(device=device).manual_seed(seed)
    G = -(-K // group)
    info = torch.iinfo(torch.int32)
    return {"qweight": torch.randint(info.min, info.max, (K * bits // 32, N), generator=g, device=device,
                                     dtype=torch.int32),
            "scales": (torch.rand(G, N, generator=g, device=device) * 2 * K**-0.5 / 2**bits + 1e-4).half(),
            "bias": (torch.randn(N, generator=g, device=device) * 0.1).half()}


def reference(x: torch.Tensor, weight: dict, bits: int, group: int) -> torch.Tensor:
    """fp32 x @ W^T + bias from the packed tensors (torch ops only)."""
    from qwen_quant.packing import unpack_qweight

    K = weight["qweight"].shape[0] * 32 // bits
    rows = torch.arange(K, device=x.device) // group
    w = (unpack_qweight(weight["qweight"], bits).float() - 2 ** (bits - 1)) * weight["scales"].float()[rows]
    return x.float() @ w + weight["bias"].float()


def candidates(bucket: Optional[int], K: int, N: int, group: int, bits: int, sm_count: int) -> list:
    """The configs autotune tries for a bucket, the heuristic's first; each runs every M of its bucket."""
    heuristic = heuristic_config(bucket, N, K, group, bits, sm_count)
    words = per_word(bits)

    def aligned(block_k):  # a K tile inside one group (or one group per channel)
        return block_k >= max(words, DOT_MIN) and (group >= K or group % block_k == 0)

    found = [heuristic]
    if bucket is not None and bucket <= SPLIT_K_MAX_M:
        block_m = 1 if bucket == 1 else DOT_MIN
        shapes = ([(64, 16), (128, 8), (128, 16), (128, 32), (256, 8), (256, 16)] if bucket == 1
                  else [(32, 16), (64, 8), (64, 16), (128, 8)])
        for block_n, depth in shapes:  # depth: packed words per column per K tile
            block_k = depth * words
            if not aligned(block_k):
                continue
            for programs_per_sm in (2, 4, 8):
                split_k = decode_split_k(N, K, block_n, block_k, sm_count, programs_per_sm)
                for warps in ((4,) if block_n * depth <= 2048 else (4, 8)):
                    found.append(MatmulConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                                              num_warps=warps, num_stages=2))
    else:
        for block_m, block_n, block_k, warps, stages in ((64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 32, 4, 4),
                                                         (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)):
            if aligned(block_k) and (bucket is None or block_m >= 64):
                found.append(MatmulConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=warps,
                                          num_stages=stages))
        for block_n, block_k in ((64, 128), (128, 64), (128, 128)):
            if aligned(block_k):
                found.append(MatmulConfig(route="dense", block_n=block_n, block_k=block_k, num_warps=4))
    unique = list(dict.fromkeys(found))
    return [c for c in unique if not config_problems(c, bits)]


def autotune_shape(K: int, N: int, bits: int, group: int, bucket: Optional[int], device: torch.device,
                   weights: list, max_candidates: Optional[int] = None, sample_m: Optional[int] = None,
                   deadline: float = math.inf) -> dict:
    """Try the candidates of one shape class on `weights` (copies of one random_weight layout, enough to exceed
    L2) and return the row for the GPU check: the best config, its time and the heuristic's, and what failed."""
    _, sm_count = device_config_source(device)
    M = sample_m or BUCKET_SAMPLE_M[bucket]
    x = torch.randn(M, K, device=device, generator=torch.Generator(device=device).manual_seed(M)).half()
    expected = reference(x, weights[0], bits, group)
    tried = candidates(bucket, K, N, group, bits, sm_count or 132)[:max_candidates]
    timings, failures = [], []
    for config in tried:
        if time.perf_counter() > deadline:
            break
        try:
            y = gptq_matmul(x, weights[0]["qweight"], weights[0]["scales"], None, weights[0]["bias"], bits=bits,
                            group_size=group, config=config)
            error = ((y.float() - expected).norm() / expected.norm()).item()
            if not error <= TOLERANCE:
                failures.append({"config": config.as_json(), "relative_error": error})
                continue

            def call(i, config=config):
                w = weights[i]
                return gptq_matmul(x, w["qweight"], w["scales"], None, w["bias"], bits=bits, group_size=group,
                                   config=config)
            timings.append((time_us(call, len(weights), device, *repeats(M, len(weights))), config))
        except Exception as e:  # a config this GPU cannot compile or run is a result, not the end of the tuning
            failures.append({"config": config.as_json(), "error": f"{type(e).__name__}: {str(e)[:300]}"})
    row = {"key": shape_key(bits, group, K, N, bucket), "M": M, "tried": len(timings) + len(failures),
           "failures": failures}
    if timings:
        best_us, best = min(timings, key=lambda t: t[0])
        heuristic_us = next((us for us, c in timings if c == tried[0]), None)
        row.update(best=best.as_json(), best_us=best_us, heuristic_us=heuristic_us,
                   speedup_vs_heuristic=heuristic_us / best_us if heuristic_us else None)
    return row
