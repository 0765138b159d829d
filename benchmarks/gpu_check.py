"""The GPU check: the device run of one call (under 8 minutes on an H100), or `--toy`: every section at toy sizes on
the CPU under the Triton interpreter (a check of this script, run in CI; no figure of it means anything).

    python benchmarks/gpu_check.py [--toy] [--json PATH] [--jsonl PATH] [--sections a,b,...] [--budget SECONDS]

Each section prints one JSON line as it finishes, {"section": name, "seconds": s, ...} (with "error" and
"traceback" when it failed: the others still run), and appends it to --jsonl PATH, by default $OUT/results.jsonl
when $OUT is set. --json PATH gets every section in one object at the end. No section, and no row of the long ones,
starts once --budget seconds (420) have passed; what was skipped says so. The long sections (published, decode) also
print each row to stderr as it finishes, {"progress": section, ...}, so a run cut off by its time limit keeps them.

Sections, in order (see each function):
- environment: GPU name, SMs, L2, memory, copy bandwidth; versions.
- correctness: the Triton backend against the torch backend (and compiled against eager) on random layers.
- autotune: the per-GPU config table (qwen_quant/kernels/tuned_configs.json), written, and included in the line.
- kernels: Qwen-7B and 14B linears, M = 1, 16, 64, 2048, Int4 / Int8, g128, act-order: device time per call in a
  CUDA graph over weight copies exceeding twice the L2, fp16 cuBLAS timed the same way, host cost per call apart.
- gptq: quantize() of one random Qwen-7B-shaped block on 128 x 2048 tokens.
- published: Qwen's protocol (1-token context, cache for 2048 new tokens) for 1.8B / 7B / 14B: peak memory and
  tokens/s beside Qwen's published A100 figures, those scaled by measured bandwidth / the A100's.
- decode: a random Qwen-7B-shaped model (32 blocks, real vocabulary), batch 1, 256 new tokens, Int4 / bf16 / Int8,
  eager and generate(compile=True): tokens/s and peak memory.

The machines that run this have no install of this package: it is imported from this checkout (see
_import_from_checkout).
"""
import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from importlib.abc import MetaPathFinder
from importlib.util import spec_from_file_location
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The order puts the bounded sections first and the decode section, whose compiled rows each compile a 32-block
# step (a minute or more), last: what the budget cuts is the end of it.
SECTIONS = ("environment", "correctness", "autotune", "kernels", "gptq", "published", "decode")
BUDGET_SECONDS = 420  # no section or row starts past this, so the whole check stays within 8 minutes on an H100
AUTOTUNE_SECONDS = 100  # autotune's share: shape classes not reached keep the heuristic
A100_GB_PER_S = 2039  # the A100-80G's memory bandwidth (NVIDIA's datasheet), where Qwen measured its figures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="toy sizes on the CPU under the Triton interpreter")
    parser.add_argument("--json", metavar="PATH", help="also write every section as one JSON object to this file")
    parser.add_argument("--jsonl", metavar="PATH", help="append each section's line here (default: "
                        "$OUT/results.jsonl when $OUT is set)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of " + ", ".join(SECTIONS))
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS,
                        help="seconds after which no section or row starts (default %(default)s)")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and (ARGS.toy or os.environ.get("CUDA_VISIBLE_DEVICES") == ""):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (after TRITON_INTERPRET is settled)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit


class _CheckoutSubpackages(MetaPathFinder):
    """setup.py's package_dir: the top-level kernels/ and calibration/ folders import as qwen_quant.kernels and
    qwen_quant.calibration."""
    FOLDERS = {"qwen_quant.kernels": "kernels", "qwen_quant.calibration": "calibration"}

    def find_spec(self, name, path=None, target=None):
        folder = self.FOLDERS.get(name)
        if folder is None:
            return None
        return spec_from_file_location(name, REPO / folder / "__init__.py",
                                       submodule_search_locations=[str(REPO / folder)])


def _import_from_checkout() -> None:
    """Make `import qwen_quant` work where the package is not installed (the device machines): from this checkout."""
    if importlib.util.find_spec("qwen_quant") is None:
        sys.path.insert(0, str(REPO))
        sys.meta_path.insert(0, _CheckoutSubpackages())


_import_from_checkout()

from qwen_quant import packing  # noqa: E402
from qwen_quant.config import QwenConfig  # noqa: E402
from qwen_quant.kernels import configs  # noqa: E402
from qwen_quant.kernels.autotune import (autotune_shape, copies_beyond_l2, host_us, random_weight,  # noqa: E402
                                         repeats, time_us)
from qwen_quant.memory import estimate_published  # noqa: E402
from qwen_quant.model import QwenForCausalLM  # noqa: E402
from qwen_quant.published import SIZES  # noqa: E402
from qwen_quant.qlinear import QuantLinear  # noqa: E402

QUANT_PATHS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
PRECISIONS = {"bf16": None, "int8": 8, "int4": 4}


def linear_shapes(size: str) -> dict:
    """{name: (K, N)} of one block's quantized linears of a published size (w1 and w2 share a shape)."""
    h, ff = SIZES[size].hidden, SIZES[size].ffn
    return {"c_attn": (h, 3 * h), "c_proj": (h, h), "w1/w2": (h, ff), "mlp.c_proj": (ff, h)}


def toy_config() -> QwenConfig:
    return QwenConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=256,
                      intermediate_size=2 * 256, seq_length=256, max_position_embeddings=1024, torch_dtype="bfloat16")


class Sizes:
    """Everything that differs between the GPU run and the toy run."""

    def __init__(self, toy: bool):
        self.toy = toy
        self.device = torch.device("cpu" if toy else "cuda", None if toy else torch.cuda.current_device())
        self.copy_bandwidth = None  # copy_bandwidth's, once measured
        if toy:
            # Interpreted kernels run each program as numpy calls: few, small programs keep this at seconds.
            self.correct_shapes = ((256, 64), (288, 200))  # (K, N): the main layouts, then the ragged one
            self.correct_m = (1, 4, 17, 96)
            self.compile_mode = None
            self.tune_shapes = {"toy": {"c_attn": (128, 192)}}
            self.tune_m = {1: 1, 16: 16, 64: 64, None: 96}
            self.tune_candidates = 2
            self.speed_shapes = {"toy": {"c_attn": (128, 192), "mlp.c_proj": (256, 64)}}
            self.speed_m = (1, 16, 64, 96)
            self.decode_model, self.decode_tokens = toy_config(), 3
            self.decode_compiled = ("int4",)  # one compile of a toy step on the CPU already takes seconds
            self.published = {name: toy_config() for name in ("1.8B", "7B", "14B")}
            self.published_timed, self.published_warmup = 2, 1
            self.gptq_model, self.gptq_nsamples, self.gptq_seqlen, self.gptq_vocab = toy_config(), 4, 64, 256
        else:
            self.correct_shapes = ((4096, 4096), (4160, 1000))
            self.correct_m = (1, 4, 16, 17, 64, 2048)
            self.compile_mode = "reduce-overhead"
            self.tune_shapes = {size: linear_shapes(size) for size in ("7B", "14B")}
            self.tune_m = configs.BUCKET_SAMPLE_M
            self.tune_candidates = None
            self.speed_shapes = self.tune_shapes
            self.speed_m = (1, 16, 64, 2048)
            self.decode_model, self.decode_tokens = SIZES["7B"].config(), 256
            self.decode_compiled = tuple(PRECISIONS)
            self.published = {name: SIZES[name].config() for name in ("1.8B", "7B", "14B")}
            # The cache is allocated for the protocol's 2048 tokens at the start and attention runs over all of it
            # at every step: the peak and the per-token time of the first tokens are those of the whole run.
            self.published_timed, self.published_warmup = 64, 8
            self.gptq_model, self.gptq_nsamples, self.gptq_seqlen, self.gptq_vocab = SIZES["7B"].config(), 128, 2048, \
                32768


class Budget:
    """The run's clock: past `seconds`, no section or row starts."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.spent() > self.seconds

    def skipped(self) -> dict:
        return {"skipped": f"{self.spent():.0f} s spent, past the budget of {self.seconds:.0f} s"}


def sync(s: Sizes) -> None:
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)


def free_memory(s: Sizes) -> None:
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()


def relative_error(y: torch.Tensor, r: torch.Tensor) -> float:
    y, r = y.double(), r.double()
    return ((y - r).norm() / r.norm()).item()


def random_packed(K: int, N: int, bits: int, group_size: int, act_order: bool, symmetric: bool, device,
                  seed: int) -> dict:
    """A random GPTQ checkpoint layer (v1 format), drawn on the device: random int32 words are random codes."""
    group = K if group_size == -1 else group_size
    G = -(-K // group)
    weight = random_weight(K, N, bits, group, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    if symmetric:
        qzeros = packing.pack_qzeros(torch.full((G, N), 2 ** (bits - 1), dtype=torch.int32), bits, "gptq")
    else:
        qzeros = torch.randint(-2**31, 2**31 - 1, (G, N * bits // 32), generator=g, device=device, dtype=torch.int32)
    g_idx = torch.arange(K, device=device, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g, device=device)]
    return {"qweight": weight["qweight"], "qzeros": qzeros.to(device), "scales": weight["scales"], "g_idx": g_idx,
            "bias": weight["bias"], "bits": bits, "group_size": group_size}


def quant_linear(layer: dict, backend: str, device, dtype=torch.float16) -> QuantLinear:
    return QuantLinear.from_packed(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], layer["bias"],
                                   bits=layer["bits"], group_size=layer["group_size"], backend=backend, dtype=dtype,
                                   device=device)


def environment(s: Sizes, budget: Budget) -> dict:
    """The machine, and the device-to-device copy bandwidth (bytes read + written per second) that bounds every
    memory-bound kernel here."""
    result = {"toy": s.toy, "torch": torch.__version__, "triton": __import__("triton").__version__,
              "cuda": torch.version.cuda, "load_average": os.getloadavg()[0]}
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        result.update(gpu=props.name, sms=props.multi_processor_count, l2_mib=props.L2_cache_size / 2**20,
                      memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    else:
        result["gpu"] = "cpu (Triton interpreter)"
    result["copy_GB_per_s"] = copy_bandwidth(s) / 1e9
    return result


def copy_bandwidth(s: Sizes) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write), measured once per run."""
    if s.copy_bandwidth is None:
        n = (2**30 if not s.toy else 2**22) // 2
        src = torch.randn(n, device=s.device).half()
        dst = torch.empty_like(src)
        us = time_us(lambda i: dst.copy_(src), 1, s.device, calls=8, replays=5)
        s.copy_bandwidth = 2 * src.numel() * 2 / (us / 1e6)
    return s.copy_bandwidth


def correctness(s: Sizes, budget: Budget) -> dict:
    """The Triton backend against the torch backend (dequantize, then matmul) built from the same random checkpoint
    layer: Int4 / Int8; g128 / g32 / per channel, act-order on and off, symmetric; a ragged shape (K a non-multiple
    of the group, N of the blocks) with asymmetric zeros; every M bucket (decode GEMV and split-K, tl.dot tiles, the
    dense route). Then one layer compiled (fullgraph; on the GPU mode reduce-overhead, a CUDA graph) against eager."""
    cases, worst = [], 0.0
    (K, N), (ragged_k, ragged_n) = s.correct_shapes
    layouts = [(K, N, group, act_order, True) for group in (128, 32, -1) for act_order in (False, True)
               if not (act_order and group == -1)] + [(ragged_k, ragged_n, 128, True, False)]
    for bits in (4, 8):
        for K, N, group, act_order, symmetric in layouts:
            layer = random_packed(K, N, bits, group, act_order, symmetric, s.device, seed=bits * 7 + group)
            triton_layer = quant_linear(layer, "triton", s.device)
            reference = quant_linear(layer, "torch", s.device)
            for M in s.correct_m:
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).half().to(s.device)
                error = relative_error(triton_layer(x), reference(x))
                worst = max(worst, error)
                cases.append({"bits": bits, "K": K, "N": N, "group_size": group, "act_order": act_order,
                              "symmetric": symmetric, "M": M, "route": triton_layer._launch_for(
                                  triton_layer._launches, M).config.route, "relative_error": error})
    tolerance = 2e-3  # fp16 outputs of two different summation orders
    return {"tolerance": tolerance, "worst_relative_error": worst, "passed": worst <= tolerance,
            "compiled": compiled_matches_eager(s), "cases": cases}


def compiled_matches_eager(s: Sizes) -> list:
    """One Int4 layer through torch.compile(fullgraph=True) (the custom op in the graph; on the GPU a CUDA graph
    replayed) against the eager call, for the decode buckets."""
    layer = quant_linear(random_packed(512, 384, 4, 128, True, True, s.device, seed=5), "triton", s.device)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False, mode=s.compile_mode)
    rows = []
    for M in (1, 16):
        x = torch.randn(M, 512, generator=torch.Generator().manual_seed(M)).half().to(s.device)
        with torch.inference_mode():
            for _ in range(3):  # reduce-overhead: warm-up, record, replay
                y = compiled(x).clone()
            rows.append({"M": M, "equal": bool(torch.equal(y, layer(x)))})
    torch._dynamo.reset()
    return rows


def autotune(s: Sizes, budget: Budget) -> dict:
    """Every candidate config of each shape class (7B and 14B linears, Int4 / Int8, g128, each M bucket) checked
    against an fp32 reference and timed (kernels.autotune); the fastest correct one per class is written into the
    package's table for this GPU (on the GPU; the toy run writes a temporary file), and $OUT/tuned_configs.json."""
    gpu = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "toy"
    path = configs.TABLE_PATH if not s.toy else Path(tempfile.mkdtemp(prefix="gpu_check_")) / "tuned_configs.json"
    rows, entries = [], {}
    stop = min(budget.start + budget.seconds, time.perf_counter() + AUTOTUNE_SECONDS)
    for bucket in configs.M_BUCKETS:  # decode first: what matters most if the time runs out
        for bits in (4, 8):
            for size, shapes in s.tune_shapes.items():
                for name, (K, N) in shapes.items():
                    if time.perf_counter() > stop:
                        rows.append({"key": configs.shape_key(bits, 128, K, N, bucket),
                                     "skipped": f"autotune's {AUTOTUNE_SECONDS} s or the budget spent"})
                        continue
                    weight = random_weight(K, N, bits, 128, s.device, seed=K + N)
                    copies = copies_beyond_l2(sum(t.numel() * t.element_size() for t in weight.values()), s.device)
                    weights = [weight] + [{k: t.clone() for k, t in weight.items()} for _ in range(copies - 1)]
                    row = autotune_shape(K, N, bits, 128, bucket, s.device, weights, s.tune_candidates,
                                         s.tune_m[bucket], deadline=stop)
                    rows.append({"size": size, "layer": name, **row})
                    if "best" in row:
                        entries[row["key"]] = configs.MatmulConfig(**row["best"])
                    del weights
            free_memory(s)
    table = configs.write_table(gpu, entries, path)
    if os.environ.get("OUT") and not s.toy:
        Path(os.environ["OUT"], "tuned_configs.json").write_text(json.dumps(table, indent=1) + "\n")
    return {"gpu": gpu, "path": str(path), "entries": len(entries), "rows": rows, "table": table}


def kernel_speed(s: Sizes, budget: Budget) -> dict:
    """Device time per call of the Triton layer (eager call of a TritonQuantLinear: act-order's gather of x included)
    against fp16 cuBLAS (F.linear), both in a CUDA graph cycling through weight copies that exceed twice the L2
    (kernels.autotune.time_us); host time per eager call apart; bytes moved per second and their share of the copy
    bandwidth."""
    bandwidth = copy_bandwidth(s)
    rows = []
    for size, shapes in s.speed_shapes.items():
        for name, (K, N) in shapes.items():
            if budget.over():
                rows.append({"size": size, "layer": name, **budget.skipped()})
                continue
            inputs = {M: torch.randn(M, K, device=s.device).half() for M in s.speed_m}
            fp16 = fp16_linear_times(K, N, inputs, s)
            for bits in (4, 8):
                for act_order in (False, True):
                    layer = quant_linear(random_packed(K, N, bits, 128, act_order, True, s.device, seed=K + bits),
                                         "triton", s.device)
                    layer_bytes = layer.memory_bytes()
                    copies = copies_beyond_l2(layer_bytes, s.device)
                    layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
                    for M, x in inputs.items():
                        with torch.inference_mode():
                            us = time_us(lambda i: layers[i](x), copies, s.device, *repeats(M, copies))
                            host = host_us(lambda i: layers[i](x), copies, s.device)
                        moved = layer_bytes + 2 * M * (K + N)
                        rows.append({"size": size, "layer": name, "K": K, "N": N, "bits": bits,
                                     "act_order": act_order, "M": M,
                                     "config": layer._launch_for(layer._launches, M).config.as_json(), "us": us,
                                     "fp16_us": fp16[M]["us"], "speedup_vs_fp16": fp16[M]["us"] / us,
                                     "GB_per_s": moved / (us / 1e6) / 1e9,
                                     "copy_fraction": moved / (us / 1e6) / bandwidth,
                                     "host_us": host, "fp16_host_us": fp16[M]["host_us"]})
            free_memory(s)
    return {"copy_GB_per_s": bandwidth / 1e9, "rows": rows}


def fp16_linear_times(K: int, N: int, inputs: dict, s: Sizes) -> dict:
    """{M: {"us", "host_us"}} of F.linear with an fp16 [N, K] weight (cuBLAS), timed as the Triton layers are."""
    dense = torch.randn(N, K, device=s.device).half()
    copies = copies_beyond_l2(dense.numel() * 2, s.device)
    weights = [dense] + [dense.clone() for _ in range(copies - 1)]
    times = {}
    for M, x in inputs.items():
        with torch.inference_mode():
            times[M] = {"us": time_us(lambda i: torch.nn.functional.linear(x, weights[i]), copies, s.device,
                                      *repeats(M, copies)),
                        "host_us": host_us(lambda i: torch.nn.functional.linear(x, weights[i]), copies, s.device)}
    return times


def random_model(config: QwenConfig, precision: str, device) -> QwenForCausalLM:
    """A QwenForCausalLM with random weights, built on the device directly: bf16, or Int4 / Int8 g128 symmetric
    linears (fp16 activations, as Qwen ran its GPTQ models) through the triton backend."""
    bits = PRECISIONS[precision]
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    dtype = torch.bfloat16 if bits is None else torch.float16
    for i, block in enumerate(model.blocks if bits else []):
        for path in QUANT_PATHS:
            dense = block.get_submodule(path)
            layer = random_packed(dense.in_features, dense.out_features, bits, 128, False, True, device, seed=i)
            owner, _, leaf = path.rpartition(".")
            setattr(block.get_submodule(owner), leaf, quant_linear(layer, "triton", device))
    g = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            std = 1.0 if param.dim() == 1 else param.shape[-1] ** -0.5
            value = torch.randn(param.shape, device=device, generator=g, dtype=dtype) * std
            if param.dim() == 1:
                value = 1 + 0.1 * value
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    return model.eval()


def progress(section: str, row: dict) -> dict:
    """Print a long section's row to stderr as it finishes (a run cut off by its time limit keeps them), and
    return it."""
    print(json.dumps(finite_json({"progress": section, **row}), default=str), file=sys.stderr, flush=True)
    return row


class _Enough(Exception):
    """Raised by a streamer to end a generation once its timed tokens are done."""


def timed_generation(model, s: Sizes, max_new_tokens: int, warmup: int, timed: int, compile: bool) -> dict:
    """Generate from a 1-token prompt with a cache for max_new_tokens; time tokens warmup+1 .. warmup+timed (the
    run stops there) and take the peak memory of the whole call (on the CPU: none, the tensors are not tracked)."""
    marks = []

    def streamer(token):
        if len(marks) == warmup or len(marks) == warmup + timed:
            sync(s)
            marks.append(time.perf_counter())
        else:
            marks.append(None)
        if len(marks) > warmup + timed:
            raise _Enough

    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    try:
        model.generate(torch.tensor([[1]], device=s.device), max_new_tokens=max_new_tokens, streamer=streamer,
                       compile=compile)
    except _Enough:
        pass
    seconds = marks[warmup + timed] - marks[warmup]
    peak = torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None
    return {"tokens_per_s": timed / seconds, "peak_gib": peak}


def decode(s: Sizes, budget: Budget) -> dict:
    """Tokens/s and peak memory of a random 7B-shaped model (all blocks, the real vocabulary), batch 1, a 1-token
    prompt, decode_tokens new tokens, eager and with generate(compile=True) (one compiled decode step; on CUDA mode
    reduce-overhead, a CUDA graph). Every precision's eager row comes first, then the compiled ones (each compiles a
    32-block step, a minute or more): what the budget cuts is compiled rows. A row that fails reports its error."""
    rows, eager_tokens = [], {}
    for compiled in (False, True):
        for precision in ("int4", "bf16", "int8"):
            if compiled and precision not in s.decode_compiled:
                continue
            row = {"precision": precision, "compiled": compiled, "new_tokens": s.decode_tokens}
            rows.append(progress("decode", {**row, **(budget.skipped() if budget.over() else
                                                      decode_row(s, precision, compiled, eager_tokens))}))
            torch._dynamo.reset()
            free_memory(s)
    speeds = {(r["precision"], r["compiled"]): r.get("tokens_per_s") for r in rows}
    for row in rows:
        base = speeds.get(("bf16", row["compiled"]))
        if row.get("tokens_per_s") and base:
            row["speedup_vs_bf16"] = row["tokens_per_s"] / base
    return {"layers": s.decode_model.num_hidden_layers, "hidden": s.decode_model.hidden_size,
            "vocab": s.decode_model.vocab_size, "rows": rows}


def decode_row(s: Sizes, precision: str, compiled: bool, eager_tokens: dict) -> dict:
    """One decode row: a warm-up (compiling) on a run cut short after a few tokens with the same cache length, so
    that the timed run reuses the compiled step; then the timed run. Eager rows leave their tokens in eager_tokens,
    compiled rows report how many leading tokens agree with them."""
    try:
        model = random_model(s.decode_model, precision, s.device)
        t0 = time.perf_counter()
        timed_generation(model, s, s.decode_tokens, 0, 1 if s.toy else 4, compiled)
        row = {"warmup_seconds": time.perf_counter() - t0}
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([[1]], device=s.device), max_new_tokens=s.decode_tokens, compile=compiled)
        sync(s)
        row.update(tokens_per_s=s.decode_tokens / (time.perf_counter() - t0),
                   peak_gib=torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None)
        if not compiled:
            eager_tokens[precision] = out[0, 1:]
        elif precision in eager_tokens:  # random weights: near ties may part ways; reported, not asserted
            row["leading_tokens_equal_to_eager"] = (out[0, 1:] == eager_tokens[precision]).int().cumprod(0).sum().item()
        return row
    except Exception as e:  # e.g. a TypeError from a generate without compile=: this row's result
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}


def published(s: Sizes, budget: Budget) -> dict:
    """Qwen's protocol (batch 1, a 1-token context, 2048 new tokens; A100-80G, eager) for 1.8B / 7B / 14B, bf16 /
    Int8 / Int4, on random models of the real shapes, eager: peak memory (max_memory_allocated, GiB: the unit the
    published figures most likely use; beside it our estimate, memory.estimate_published) and tokens/s, beside
    Qwen's figures (qwen_quant.published.SIZES: the QwenLM/Qwen README, quoted in shared/docs/REFERENCE.md section
    4; data in the package, which travels to the device where shared/ does not), their speed scaled by our measured
    copy bandwidth / the A100's 2039 GB/s. That is a datasheet figure which a measured A100 copy does not reach, so
    the scaled figure is a little low: a target slightly in our favour."""
    bandwidth = copy_bandwidth(s) / 1e9
    rows = []
    for size, config in s.published.items():
        for precision in PRECISIONS:
            row = {"size": size, "precision": precision}
            if budget.over():
                rows.append({**row, **budget.skipped()})
                continue
            try:
                result = timed_generation(random_model(config, precision, s.device), s, 2048, s.published_warmup,
                                          s.published_timed, compile=False)
                published_speed, published_gib = SIZES[size].speed_memory[precision]
                scaled = published_speed * bandwidth / A100_GB_PER_S
                row.update(result, timed_tokens=s.published_timed, published_tokens_per_s=published_speed,
                           published_gib=published_gib, estimate_gib=estimate_published(size, precision).total / 2**30,
                           published_scaled_tokens_per_s=scaled, speed_vs_scaled=result["tokens_per_s"] / scaled)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
            rows.append(progress("published", row))
            free_memory(s)
    return {"copy_GB_per_s": bandwidth, "a100_GB_per_s": A100_GB_PER_S, "rows": rows}


def gptq_block(s: Sizes, budget: Budget) -> dict:
    """quantize() of one random 7B-shaped block (4-bit g128) on nsamples x seqlen random tokens: seconds, peak
    CUDA memory and the plan's figures for both."""
    import numpy as np

    from qwen_quant.plan import plan_quantization
    from qwen_quant.quantize import quantize
    from qwen_quant.synthetic import save_random_checkpoint

    config = QwenConfig.from_dict(s.gptq_model.to_dict())
    config.num_hidden_layers, config.vocab_size = 1, s.gptq_vocab
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        folder = save_random_checkpoint(Path(tmp) / "model", config, torch.bfloat16)
        ids = Path(tmp) / "ids.npy"
        np.save(ids, np.random.default_rng(0).integers(0, config.vocab_size, size=s.gptq_nsamples * s.gptq_seqlen * 2))
        settings = dict(bits=4, group_size=128, nsamples=s.gptq_nsamples, seqlen=s.gptq_seqlen)
        device = s.device.type
        plan = plan_quantization(config, device=device, tokenizer=False, **settings)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        report = quantize(folder, Path(tmp) / "out", calibration=str(ids), device=device, progress=False, **settings)
        seconds = time.perf_counter() - t0
    return {"nsamples": s.gptq_nsamples, "seqlen": s.gptq_seqlen, "hidden": config.hidden_size,
            "seconds_per_block": seconds, "planned_seconds": plan.seconds,
            "peak_cuda_gib": report.peak_cuda_bytes / 2**30, "planned_device_gib": plan.device_memory.total / 2**30,
            "mean_gptq_rtn_ratio": statistics.mean(r.loss / r.rtn_loss for r in report.layers if r.rtn_loss)}


CHECKS = {"environment": environment, "correctness": correctness, "autotune": autotune, "kernels": kernel_speed,
          "gptq": gptq_block, "decode": decode, "published": published}


def finite_json(value):
    """value with NaN / inf replaced by None: the lines are strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def run(sections, toy: bool, budget_seconds: float, jsonl) -> dict:
    s = Sizes(toy)
    budget = Budget(budget_seconds)
    results = {}
    for name in sections:
        t0 = time.perf_counter()
        if budget.over():
            result = budget.skipped()
        else:
            try:
                result = CHECKS[name](s, budget)
            except Exception as e:  # one failing section must not lose the others' figures
                result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            free_memory(s)
        line = json.dumps(finite_json({"section": name, "seconds": time.perf_counter() - t0, **result}),
                          default=str)
        print(line, flush=True)
        if jsonl:
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        results[name] = json.loads(line)
    return results


def main() -> None:
    sections = [name.strip() for name in ARGS.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in CHECKS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    toy = ARGS.toy or not torch.cuda.is_available()
    jsonl = ARGS.jsonl or (str(Path(os.environ["OUT"], "results.jsonl")) if os.environ.get("OUT") else None)
    results = run(sections, toy, ARGS.budget, jsonl)
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
