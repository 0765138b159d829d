"""One-shot GPU check (under 8 minutes on one GPU): prints one JSON with every section, a failing one included.

Sections:
- correctness: the Triton kernels against the torch backend (dequantize, then matmul) on the same random GPTQ
  layer: Int4 / Int8, group 128 / 32 / -1, act-order on and off, M = 1, 4, 16, 64, 2048.
- kernels: time of the Triton kernel against the fp16 cuBLAS linear on Qwen-7B's linear shapes at M = 1, 16, 64,
  2048 (CUDA events, warm-up, median), the bytes it moves per second and their share of the device-to-device copy
  bandwidth measured here.
- decode: tokens/s of a random 7B-shaped model (fp16, Int8, Int4; batch 1, a 1-token context, 256 new tokens).
- gptq: quantize() of one random 7B-shaped block on 128 x 2048 tokens: seconds per block, peak CUDA memory and
  time against the plan (qwen_quant.plan).
- memory: max_memory_allocated of Qwen's published protocol (1-token context, 2048 new tokens) against
  memory.estimate_memory, per precision (last: the longest).

--toy (automatic without CUDA) runs the same code at toy sizes on the CPU under TRITON_INTERPRET=1 (set here before
Triton is imported): a check of the script, not of any GPU figure. A section that fails is reported with its error
and the others still run; on the GPU a section is not started once BUDGET_SECONDS have passed.

    python benchmarks/gpu_check.py [--toy] [--json PATH] [--sections correctness,kernels,...]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

SECTIONS = ("correctness", "kernels", "decode", "gptq", "memory")  # the longest (2048 tokens x 3 models) last
BUDGET_SECONDS = 450  # on the GPU a section is not started past this, so the whole check stays within 8 minutes


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="toy sizes on the CPU under the Triton interpreter")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON to this file")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of " + ", ".join(SECTIONS))
    return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and (ARGS.toy or os.environ.get("CUDA_VISIBLE_DEVICES") == ""):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (after TRITON_INTERPRET is settled)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit

from qwen_quant import packing  # noqa: E402
from qwen_quant.config import QwenConfig  # noqa: E402
from qwen_quant.memory import estimate_memory, measure_peak_bytes  # noqa: E402
from qwen_quant.published import SIZES  # noqa: E402
from qwen_quant.qlinear import QuantLinear  # noqa: E402
from qwen_quant.synthetic import random_gptq  # noqa: E402

QUANT_PATHS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


class Sizes:
    """Everything that differs between the GPU run and the toy run."""

    def __init__(self, toy: bool):
        self.toy = toy
        self.device = "cpu" if toy else "cuda"
        if toy:
            # Interpreted kernels run each program as numpy calls: few, small programs keep this at seconds.
            self.correct_kn = (256, 64)
            self.correct_m = (1, 4, 16, 64, 96)
            self.speed_m = (1, 16, 64, 96)
            self.speed_shapes = {"c_attn": (128, 192), "mlp.c_proj": (256, 64)}
            self.model = QwenConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=256,
                                    intermediate_size=2 * 256, seq_length=256, max_position_embeddings=1024,
                                    torch_dtype="bfloat16")
            self.decode_tokens, self.memory_tokens, self.decode_warmup = 3, 3, 1
            self.gptq_nsamples, self.gptq_seqlen, self.gptq_vocab = 4, 64, 256
            self.warmup, self.reps = 1, 1
        else:
            self.correct_kn = (4096, 4096)
            self.correct_m = (1, 4, 16, 64, 2048)
            self.speed_m = (1, 16, 64, 2048)
            h, ff = 4096, 11008
            self.speed_shapes = {"c_attn": (h, 3 * h), "c_proj": (h, h), "w1/w2": (h, ff), "mlp.c_proj": (ff, h)}
            self.model = SIZES["7B"].config()
            self.decode_tokens, self.memory_tokens, self.decode_warmup = 256, 2048, 4
            self.gptq_nsamples, self.gptq_seqlen, self.gptq_vocab = 128, 2048, 32768
            self.warmup, self.reps = 5, 30


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of fn(): CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def random_layer(K: int, N: int, bits: int, group_size: int, act_order: bool, device: str, seed: int) -> dict:
    """Packed tensors of a random symmetric GPTQ layer with fp16 scales at a real layer's scale."""
    g = torch.Generator().manual_seed(seed)
    codes, zeros, scale_draws, g_idx = random_gptq(K, N, bits, group_size, act_order=act_order, generator=g)
    return {"qweight": packing.pack_qweight(codes, bits).to(device),
            "qzeros": packing.pack_qzeros(zeros, bits, "gptq").to(device),
            "scales": (scale_draws * 2 * K**-0.5 / 2**bits + 1e-4).half().to(device),
            "g_idx": g_idx.to(device), "bias": (torch.randn(N, generator=g) * 0.1).half().to(device)}


def quant_linear(layer: dict, bits: int, group_size: int, backend: str, device: str) -> QuantLinear:
    return QuantLinear.from_packed(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], layer["bias"],
                                   bits=bits, group_size=group_size, backend=backend, dtype=torch.float16,
                                   device=device)


def check_correctness(s: Sizes) -> dict:
    K, N = s.correct_kn
    cases, worst = [], 0.0
    for bits in (4, 8):
        for group_size in (128, 32, -1):
            for act_order in (False, True):
                if act_order and group_size == -1:
                    continue  # one group: act-order changes nothing
                layer = random_layer(K, N, bits, group_size, act_order, s.device, seed=bits * 7 + group_size)
                triton = quant_linear(layer, bits, group_size, "triton", s.device)
                reference = quant_linear(layer, bits, group_size, "torch", s.device)
                for M in s.correct_m:
                    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).half().to(s.device)
                    y, r = triton(x).double(), reference(x).double()
                    error = ((y - r).norm() / r.norm()).item()
                    worst = max(worst, error)
                    cases.append({"bits": bits, "group_size": group_size, "act_order": act_order, "M": M,
                                  "relative_error": error})
    tolerance = 2e-3  # fp16 outputs of two different summation orders
    return {"K": K, "N": N, "tolerance": tolerance, "worst_relative_error": worst, "passed": worst <= tolerance,
            "cases": cases}


def copy_bandwidth(s: Sizes) -> float:
    """Bytes per second of a device-to-device copy (read + write), the ceiling of a memory-bound kernel."""
    n = (2**30 if not s.toy else 2**24) // 2
    src = torch.empty(n, dtype=torch.float16, device=s.device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), s.device, s.warmup, s.reps)
    return 2 * src.numel() * 2 / (ms / 1e3)


def kernel_speed(s: Sizes) -> dict:
    copy = copy_bandwidth(s)
    rows = []
    for name, (K, N) in s.speed_shapes.items():
        dense = torch.randn(N, K, device=s.device).half()
        for bits in (4, 8):
            layer = random_layer(K, N, bits, 128, False, s.device, seed=1)
            kernel = quant_linear(layer, bits, 128, "triton", s.device)
            weight_bytes = sum(t.numel() * t.element_size() for t in (layer["qweight"], layer["scales"]))
            for M in s.speed_m:
                x = torch.randn(M, K, device=s.device).half()
                with torch.inference_mode():
                    ms = time_ms(lambda: kernel(x), s.device, s.warmup, s.reps)
                    fp16_ms = time_ms(lambda: torch.nn.functional.linear(x, dense), s.device, s.warmup, s.reps)
                moved = weight_bytes + 2 * M * (K + N)
                rows.append({"layer": name, "K": K, "N": N, "bits": bits, "M": M, "ms": ms, "fp16_ms": fp16_ms,
                             "speedup_vs_fp16": fp16_ms / ms, "GB_per_s": moved / (ms / 1e3) / 1e9,
                             "copy_fraction": moved / (ms / 1e3) / copy})
        del dense
    return {"copy_GB_per_s": copy / 1e9, "rows": rows}


def random_model(config: QwenConfig, bits, device: str):
    """A QwenForCausalLM with random fp16 weights (bits None) or random GPTQ linears, built on the device directly:
    no checkpoint to write and read back."""
    from qwen_quant.model import QwenForCausalLM

    with torch.device("meta"):
        model = QwenForCausalLM(config)
    g = torch.Generator(device=device).manual_seed(0)
    for i, block in enumerate(model.transformer.h if bits else []):
        for path in QUANT_PATHS:
            dense = block.get_submodule(path)
            layer = random_layer(dense.in_features, dense.out_features, bits, 128, False, device, seed=i)
            owner, _, leaf = path.rpartition(".")
            # Triton on the GPU is what "auto" picks; in the toy run it is the interpreted kernel, the same code.
            setattr(block.get_submodule(owner), leaf, quant_linear(layer, bits, 128, "triton", device))
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            std = 1.0 if param.dim() == 1 else param.shape[-1] ** -0.5
            value = torch.randn(param.shape, device=device, generator=g, dtype=torch.float16) * std
            if param.dim() == 1:
                value = 1 + 0.1 * value
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    return model.eval()


def decode_speed(s: Sizes) -> dict:
    rows = []
    for label, bits in (("fp16", None), ("int8", 8), ("int4", 4)):
        model = random_model(s.model, bits, s.device)
        prompt = torch.tensor([[1]], device=s.device)
        model.generate(prompt, max_new_tokens=s.decode_warmup)  # kernels compiled, caches allocated
        sync(s.device)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=s.decode_tokens)
        sync(s.device)
        seconds = time.perf_counter() - t0
        assert out.shape[1] == s.decode_tokens + 1
        rows.append({"precision": label, "tokens": s.decode_tokens, "tokens_per_s": s.decode_tokens / seconds})
        del model
        if s.device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["speedup_vs_fp16"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {"layers": s.model.num_hidden_layers, "hidden": s.model.hidden_size, "rows": rows}


def peak_memory(s: Sizes) -> dict:
    rows = []
    for label, bits in (("fp16", None), ("int8", 8), ("int4", 4)):
        model = random_model(s.model, bits, s.device)
        measured = measure_peak_bytes(model, s.memory_tokens)
        estimate = estimate_memory(s.model, bits=bits, group_size=128, tokens=s.memory_tokens, dtype=torch.float16,
                                   device=s.device, backend="triton" if bits else "auto")
        # On the CPU only the tensors are measured (memory.measure_peak_bytes): compare those terms alone.
        expected = estimate.total if s.device == "cuda" else estimate.tensor_bytes()
        rows.append({"precision": label, "measured_gib": measured / 2**30, "estimate_gib": expected / 2**30,
                     "estimate_over_measured": expected / measured})
        del model
        if s.device == "cuda":
            torch.cuda.empty_cache()
    return {"tokens": s.memory_tokens, "rows": rows}


def gptq_block(s: Sizes) -> dict:
    import numpy as np

    from qwen_quant.plan import plan_quantization
    from qwen_quant.quantize import quantize
    from qwen_quant.synthetic import save_random_checkpoint

    config = QwenConfig.from_dict(s.model.to_dict())
    config.num_hidden_layers, config.vocab_size = 1, s.gptq_vocab
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        folder = save_random_checkpoint(Path(tmp) / "model", config, torch.bfloat16)
        ids = Path(tmp) / "ids.npy"
        np.save(ids, np.random.default_rng(0).integers(0, config.vocab_size, size=s.gptq_nsamples * s.gptq_seqlen * 2))
        settings = dict(bits=4, group_size=128, nsamples=s.gptq_nsamples, seqlen=s.gptq_seqlen)
        plan = plan_quantization(config, device=s.device, tokenizer=False, **settings)
        if s.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        report = quantize(folder, Path(tmp) / "out", calibration=str(ids), device=s.device, progress=False,
                          **settings)
        seconds = time.perf_counter() - t0
    return {"nsamples": s.gptq_nsamples, "seqlen": s.gptq_seqlen, "hidden": config.hidden_size,
            "seconds_per_block": seconds, "planned_seconds": plan.seconds,
            "peak_cuda_gib": report.peak_cuda_bytes / 2**30, "planned_device_gib": plan.device_memory.total / 2**30,
            "mean_gptq_rtn_ratio": statistics.mean(r.loss / r.rtn_loss for r in report.layers if r.rtn_loss)}


CHECKS = {"correctness": check_correctness, "kernels": kernel_speed, "decode": decode_speed, "memory": peak_memory,
          "gptq": gptq_block}


def run(sections, toy: bool) -> dict:
    s = Sizes(toy)
    result = {"toy": toy, "device": torch.cuda.get_device_name() if not toy else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "load_average": os.getloadavg()[0]}
    start = time.perf_counter()
    for name in sections:
        t0 = time.perf_counter()
        if not toy and t0 - start > BUDGET_SECONDS:  # the toy run's time is the CPU's load, not the check's
            result[name] = {"error": f"skipped: {t0 - start:.0f} s spent, past the budget of {BUDGET_SECONDS} s"}
            continue
        try:
            result[name] = CHECKS[name](s)
        except Exception as e:  # one failing section must not lose the others' figures
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        result[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {result[name]['seconds']:.1f} s" + (" (FAILED)" if "error" in result[name] else ""),
              file=sys.stderr, flush=True)
    return result


def main() -> None:
    sections = [name.strip() for name in ARGS.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in CHECKS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    toy = ARGS.toy or not torch.cuda.is_available()
    result = run(sections, toy)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if ARGS.json:
        Path(ARGS.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
