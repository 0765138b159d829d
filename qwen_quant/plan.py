"""Pre-flight plan of a quantization run: peak device memory, peak host memory (RSS), disk and time, term by term.

`plan_quantization` needs only a config and the run's settings; every memory term is the bytes of tensors that
`quantize.quantize` (and `gptq.gptq_quantize`) hold at once, at the widest moment of one of the run's three phases:
embedding the calibration windows, quantizing a block (the widest layer's GPTQ), and exporting (the fp16 embedding
and lm_head streamed to disk). The terms live in `quantization_terms` alone, so they follow quantize() when it changes.
The time is the run's arithmetic (forwards of every block over nsamples x seqlen tokens, the Hessians, GPTQ's
factorizations and updates) at this machine's measured matmul rate: a floor, as it leaves out Python overhead and
memory-bound work.

Before its first block, quantize() has valid settings (settings.QuantizeSettings), checks them against the model
(`check_settings`) and its plan against the machine (`check_plan`: disk, physical memory, the GPU's free memory);
`qwen-quantize plan` (`plan_report`) makes the same checks but the disk's, so it refuses what a run would refuse.
"""
import ctypes
import functools
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .config import QwenConfig
from .cpu import fast_bf16_matmul
from .layout import RESIDUAL_GROUP, layout_of
from .memory import MemoryEstimate, format_memory_report
from .packing import values_per_period
from .published import find_published
from .settings import QuantizeSettings, settings_of
from .tensor_parallel import attention_of, check_tp, padded_ffn

CHUNK_TOKENS = 2048  # token rows per forward step of a quantization run: bounds the temporary memory of a stage


def block_compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a block's weights and arithmetic while it is quantized; activations are kept in `dtype`.

    A CPU without bf16 matmuls (cpu.fast_bf16_matmul) multiplies bf16 matrices several times slower than fp32, so
    there the block computes in fp32.
    """
    if device.type == "cpu" and dtype == torch.bfloat16 and not fast_bf16_matmul():
        return torch.float32
    return dtype


# Measured on this project's machines: the Qwen tokenizer (tiktoken's 151643 ranks as Python bytes plus its Rust
# core's copy) and tokenizing a WikiText-sized text add about 64 MiB of RSS.
TOKENIZER_BYTES = 64 * 2**20
# CUDA's host-side runtime (driver, kernels' images) in the process's RSS, once a CUDA tensor exists.
CUDA_RUNTIME_HOST_BYTES = 512 * 2**20
# cuBLAS and cuSOLVER workspaces come from PyTorch's caching allocator (see memory.CUBLAS_WORKSPACE_BYTES).
CUDA_WORKSPACE_BYTES = 64 * 2**20
# Square matrices [K, K] fp32 alive at once at GPTQ's widest moment: the Hessian (the accumulator's own storage),
# and two of gptq_quantize's working copies (each step of the inverse's Cholesky factor frees its input); with
# asymmetric calibration also the cross term C, except at the group's last layer (it takes C over and frees it
# before the Cholesky).
GPTQ_SQUARES = 3
# Weight-sized fp32 matrices [N, K] alive then: the layer's clone in fp32, its permuted working copy and, with
# asymmetric calibration, the shift W C (the uint8 codes come after).
GPTQ_WEIGHT_COPIES = 3
# At refine's widest moment (gptq.refine, after GPTQ's working copies are freed): the Hessian alone (refine reads
# it); the goal, the code offsets, goal @ H and their product for the scales' right-hand side, and the uint8 codes.
REFINE_SQUARES = 1
REFINE_WEIGHT_COPIES = 4.25
RATE_SECONDS = 0.2  # how long the matmul rate is measured, per dtype and device
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 2**20


@dataclass
class QuantPlan:
    description: str
    device: str
    device_memory: MemoryEstimate  # compute-device tensors at their widest phase (on CPU: the host's tensors)
    host_memory: MemoryEstimate  # the process's RSS at its widest phase
    disk: MemoryEstimate  # the output disk at its fullest
    time: dict  # term -> seconds
    rates: dict  # "bf16 matmul" -> FLOP/s measured here
    phases: dict = field(default_factory=dict)  # "host: export" -> bytes, for every phase

    @property
    def seconds(self) -> float:
        return sum(self.time.values())


def free_disk_bytes(path) -> int:
    """Free bytes on the filesystem that holds `path` (or would hold it: its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def process_rss_bytes() -> int:
    """This process's RSS now: the interpreter, torch and the libraries a run starts from."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's RSS so far: VmHWM, which starts afresh in a spawned child (ru_maxrss would
    carry over the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_freed_tensors_to_os() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping, given back to the OS when freed, so that the
    RSS follows the tensors alive, which is what the plan counts. By default glibc raises this threshold (up to
    32 MiB) each time a large block is freed, then keeps freed tensors below it in its heap: measured at hidden
    1024, the export's peak held 300 MiB of the block phase's freed Hessians on top of its own tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator is not ours to tune
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@functools.lru_cache(maxsize=None)
def matmul_rate(dtype: torch.dtype, device: str) -> float:
    """FLOP/s of a linear layer's product (x @ W^T, as the forwards run it) in `dtype` on `device`, measured for
    RATE_SECONDS once per process."""
    n = 4096 if device == "cuda" else 1024
    x = torch.randn(n, n, device=device, dtype=dtype)
    w = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    torch.nn.functional.linear(x, w)  # warm-up: thread pools, kernel selection
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < RATE_SECONDS:
        torch.nn.functional.linear(x, w)
        sync()
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start)


def quantized_block_bytes(config: QwenConfig, bits: int, group_size: int) -> int:
    """Bytes one block adds to the output: per linear qweight, qzeros, fp16 scales, int32 g_idx and an fp16 bias where
    the export writes one (quantize.export_linear: on every v1 linear); and the fp16 norms (qwen3's q/k norms too)."""
    layout = layout_of(config)
    total = 2 * config.hidden_size * 2 + len(layout.qk_norms) * config.head_dim * 2
    for K, N, bias in layout.linear_shapes(config).values():
        groups = -(-K // (K if group_size == -1 else group_size))
        total += K * N * bits // 8 + groups * (N * bits // 32) * 4 + groups * N * 2 + K * 4
        total += N * 2 if bias or layout.bias_on_every_linear else 0
    return total


def quantization_terms(config: QwenConfig, bits: int, group_size: int, nsamples: int, seqlen: int, device: str,
                       dtype: torch.dtype, method: str = "gptq", tokenizer: bool = True,
                       max_shard_bytes: int = 4 * 10**9, baseline_bytes: int = 0, asym: bool = False,
                       refine: bool = False) -> tuple:
    """(device phases, host phases, disk terms, notes): each phase a dict term -> bytes, its peak their sum.
    asym: asymmetric calibration, which carries the full-precision model's activations and block beside the
    quantized ones until the last group's inputs are taken. refine: gptq.refine runs after each GPTQ."""
    h, ff, V, L = config.hidden_size, config.ffn_size, config.vocab_size, config.num_hidden_layers
    act, ckpt = dtype.itemsize, config.dtype.itemsize
    # A block's weights and arithmetic may be wider than the activations it reads (fp32 on CPUs without bf16).
    compute_dtype = block_compute_dtype(torch.device(device), dtype)
    compute = compute_dtype.itemsize
    gptq = method == "gptq"
    T = nsamples * seqlen if gptq else 0
    rows = min(T, max(1, CHUNK_TOKENS // seqlen) * seqlen) if gptq else 0  # token rows of one forward chunk
    layout = layout_of(config)
    shapes = layout.linear_shapes(config)
    linears = shapes.values()
    attention_width = config.num_attention_heads * config.head_dim  # the attention's output (h, but Qwen3-0.6B's)
    block_params = (sum(K * N + (N if bias else 0) for K, N, bias in linears) + 2 * h
                    + len(layout.qk_norms) * config.head_dim)
    largest_linear = max(K * N for K, N, _ in linears)
    cuda = device == "cuda"
    notes = {}

    def term(name, nbytes, note):
        notes[name] = note
        return name, nbytes

    streams = 2 if asym and gptq else 1
    groups = [[shapes[path] for path in group] for group in layout.groups]

    # (name, bytes, note) of the activation buffers a block holds at the GPTQ of group `stage`: one per stream
    # (the full-precision stream keeps its output), and the quantized stream's scratch for the attention's output
    # until c_proj is quantized.
    def activations(stage: int) -> tuple:
        scratch = stage == RESIDUAL_GROUP - 1
        return ("calibration activations", (streams * h + scratch * attention_width) * T * act,
                f"{streams} x [{nsamples}, {seqlen}, {h}] {_name(dtype)}: "
                + ("the quantized" if streams == 2 else "the") + " model's stream"
                + (", the full-precision model's" if streams == 2 else "")
                + (f"; [{nsamples}, {seqlen}, {attention_width}]: the attention's output" if scratch else ""))

    # The block's weights; with the full-precision stream, the originals of the `done` parameters quantized so far
    # that its block keeps (the two blocks share the others; its attention goes once added, the rest before the last
    # group's GPTQ).
    def weights(done: int) -> tuple:
        kept = done if streams == 2 else 0
        return ("one block's weights", (block_params + kept) * compute,
                f"{block_params / 1e6:.1f}M parameters in {_name(compute_dtype)}"
                + (f", and {kept / 1e6:.1f}M originals for the full-precision stream" if kept else ""))

    if gptq:
        # The block phase's widest moment: a layer's Cholesky (or refine after it), or a chunk of the MLP or the
        # attention stage.
        copies = f"{GPTQ_WEIGHT_COPIES} fp32 weight copies" + (f" (refine: {REFINE_WEIGHT_COPIES})" if refine else "")
        moments, done = [], 0
        for stage, group in enumerate(groups):
            done = 0 if stage == RESIDUAL_GROUP else done  # the attention's originals are freed once it is added
            for i, (K, N, _) in enumerate(group):
                cross = streams == 2 and i < len(group) - 1  # C stays with the accumulator for the next layer
                squares = GPTQ_SQUARES + cross
                solver = 4 * max(squares * K * K + GPTQ_WEIGHT_COPIES * K * N,
                                 int((REFINE_SQUARES + cross) * K * K + REFINE_WEIGHT_COPIES * K * N) if refine else 0)
                moments.append([activations(stage), weights(done if stage < len(groups) - 1 else 0), (
                    "GPTQ working copies", solver,
                    f"at the [{K} -> {N}] layer: {squares} fp32 [{K}, {K}] (the Hessian"
                    f"{', the cross term' if cross else ''}, two working copies), {copies}")])
                done += K * N
        # The MLP stage's chunk (one stream's input kept while the other computes its gate and up outputs, or both
        # streams' inputs, their fp32 copies and the difference for the Hessians), beside the [ff, ff] accumulators.
        fp32_copy = 0 if compute == 4 else 4
        per_row = (max(2 * compute, compute + fp32_copy) if streams == 1
                   else max(3 * compute, 2 * (compute + fp32_copy) + 4))
        # (The full-precision block keeps the originals of w1 and w2 then; its attention is spent and freed.)
        mlp_originals = sum(K * N for g in groups[RESIDUAL_GROUP:-1] for K, N, _ in g)
        moments.append([activations(len(groups) - 1), weights(mlp_originals), (
            "chunk temporaries", rows * (per_row * ff + 4 * h) + streams * 4 * ff * ff,
            f"{rows} token rows of the MLP stage and the [{ff}, {ff}] fp32 Hessian accumulator"
            + (" (and the cross term's)" if streams == 2 else ""))])
        # The attention stage's chunk: the first norm's output and the input's copy, the q/k/v outputs, the rotated
        # queries and keys (as wide, counted as q/k/v again), the attention's scores and output (compute dtype),
        # beside the attention's output waiting in scratch.
        qkv_width = sum(N for _, N, _ in groups[0])
        moments.append([activations(RESIDUAL_GROUP - 1), weights(sum(K * N for K, N, _ in groups[0])),
                        ("chunk temporaries", rows * compute * (2 * h + 2 * qkv_width + attention_width
                                                                + config.num_attention_heads * seqlen),
                         f"{rows} token rows of the attention stage: q/k/v outputs, queries, keys, scores")])
        block_device = dict(term(*t) for t in max(moments, key=lambda terms: sum(t[1] for t in terms)))
    else:
        block_device = dict([term(*weights(0)), term("RTN working copies", 4 * 4 * largest_linear,
                                                     "the widest linear's weight in fp32, its codes and dequantized "
                                                     "copies")])
    embed_device = dict([term("embeddings in the compute dtype", T * h * act,
                              f"[{nsamples}, {seqlen}, {h}] {_name(dtype)}")])
    if cuda:
        workspace = term("cuBLAS / cuSOLVER workspace", CUDA_WORKSPACE_BYTES, "from the caching allocator")
        block_device.update([workspace])
    device_phases = {"calibration embedding": embed_device if gptq else {}, "a block": block_device}

    baseline = term("interpreter, torch, libraries", baseline_bytes, "this process's RSS before the run")
    wte = term("embedding read", V * h * ckpt, f"[{V}, {h}] {_name(config.dtype)} read from the checkpoint")
    host_base = dict([baseline])
    if cuda:
        host_base.update([term("CUDA runtime", CUDA_RUNTIME_HOST_BYTES, "driver and kernel images in RSS")])
    tok = [term("tokenizer", TOKENIZER_BYTES, "the Qwen tokenizer and the tokenized text")] if gptq and tokenizer \
        else []
    embed_host = {**host_base, **dict(tok), **dict([wte, term("calibration tokens", T * 8, "int64 ids")]),
                  **dict([term("embeddings", T * h * ckpt, f"[{nsamples}, {seqlen}, {h}] {_name(config.dtype)}")
                          ] if gptq else [])}
    if not cuda and gptq and act != ckpt:  # the compute-dtype copy sits beside the checkpoint-dtype lookup
        embed_host.update(dict(embed_device))
    block_host = dict(host_base)
    if cuda:
        block_host.update([term("tensor being moved to the GPU", largest_linear * ckpt, "the largest linear, read")])
    else:
        block_host.update(block_device)
    # A 16-bit tensor is converted to fp16 within its own memory; an fp32 one into a copy of half its size.
    fp16_copy = term("fp16 copy", 0 if ckpt == 2 else V * h * 2, "the embedding / lm_head converted for the output")
    export_host = {**host_base, **dict([term("embedding / lm_head read", V * h * ckpt, f"[{V}, {h}] "
                                             f"{_name(config.dtype)}, one at a time"), fp16_copy])}
    host_phases = {"calibration embedding": embed_host if gptq else host_base, "a block": block_host,
                   "export": export_host}

    blocks = L * quantized_block_bytes(config, bits, group_size)
    heads = 1 if config.tie_word_embeddings else 2  # a tied head is the embedding: written once
    output = blocks + heads * V * h * 2 + h * 2
    disk = dict([term("finished blocks", blocks, f"{L} blocks in OUTPUT.partial/blocks until the end"),
                 term("output checkpoint", output, "fp16 embedding" + (" (the tied head)" if heads == 1 else
                                                                        " and lm_head") + ", packed blocks"),
                 term("shard being written", min(output, max_shard_bytes),
                      "a shard's temporary file beside its final copy")])
    return device_phases, host_phases, disk, notes


def run_flops(config: QwenConfig, nsamples: int, seqlen: int, method: str = "gptq", asym: bool = False,
              refine_passes: int = 0) -> dict:
    """(FLOPs in the compute dtype, FLOPs in fp32) of the run: forwards, Hessians, GPTQ and its RTN comparison."""
    L, layout = config.num_hidden_layers, layout_of(config)
    shapes = layout.linear_shapes(config)
    linears = shapes.values()
    rtn_loss = sum(2 * N * K * K for K, N, _ in linears)  # (W - Q) @ H for the loss of each method
    if method != "gptq":
        return {"calibration forwards": 0, "Hessians": 0, "GPTQ": 0, "loss": 0}
    T = nsamples * seqlen

    def products(groups) -> int:  # multiply-adds per token of the linears of these groups
        return sum(shapes[path][0] * shapes[path][1] for group in groups for path in group)

    # Every linear once in its stage, gate / up again for the block's output; causal attention over the heads' width.
    block, gate_up = products(layout.groups), products(layout.groups[RESIDUAL_GROUP:RESIDUAL_GROUP + 1])
    attention = 2 * T * seqlen * config.num_attention_heads * config.head_dim
    forwards = 2 * T * (block + gate_up) + attention
    # The full-precision block's stages: its output comes with its MLP's hidden activations, no gate / up again.
    fp_forwards = 2 * T * block + attention
    # One Hessian per group (its linears share the input), the upper triangle of x^T x in HESSIAN_BANDS row bands:
    # (1 + 3/4 + 1/2 + 1/4) / 4 of K^2 per token.
    squares = sum(shapes[group[0]][0] ** 2 for group in layout.groups)
    hessians = 2 * T * 0.625 * squares
    # Cholesky, inverse and the inverse's factor (about 4/3 K^3), and the lazy updates (N K^2).
    solve = sum(4 * K**3 // 3 + N * K * K for K, N, _ in linears)
    if refine_passes:  # per pass a fit of the scales (goal @ H and half of N K^2) and a sweep (N K^2); one more fit
        solve += sum(2 * N * K * K * (refine_passes + 1.5 * (refine_passes + 1)) for K, N, _ in linears)
    if asym:  # the full-precision block's forwards, the full [K, K] cross terms, the shift W C H^-1 and the loss
        forwards += fp_forwards
        hessians += 2 * T * squares
        solve += sum(4 * N * K * K for K, N, _ in linears)
    return {"calibration forwards": L * forwards, "Hessians": L * hessians, "GPTQ": L * solve, "loss": L * rtn_loss}


def plan_quantization(config: QwenConfig, settings: Optional[QuantizeSettings] = None, device: str = "cpu",
                      dtype: Optional[torch.dtype] = None, tokenizer: bool = True,
                      baseline_bytes: Optional[int] = None, **options) -> QuantPlan:
    """The plan of quantize() for `config` with these settings (or their options by name, as quantize() takes them).
    dtype: the compute dtype (default: quantize()'s choice). baseline_bytes: the RSS the run starts from (default:
    this process's now)."""
    settings = settings_of(settings, options)
    bits, group_size, nsamples, seqlen, method = (settings.bits, settings.group_size, settings.nsamples,
                                                  settings.seqlen, settings.method)
    asym_calibration, refine_passes = settings.asym_calibration, settings.refine_passes
    device = torch.device(device).type
    if dtype is None:
        dtype = torch.float32 if device == "cpu" and config.dtype == torch.float16 else config.dtype
    baseline = process_rss_bytes() if baseline_bytes is None else baseline_bytes
    device_phases, host_phases, disk, notes = quantization_terms(config, bits, group_size, nsamples, seqlen, device,
                                                                 dtype, method, tokenizer, settings.max_shard_bytes,
                                                                 baseline, asym=bool(asym_calibration),
                                                                 refine=bool(refine_passes))

    def widest(phases, what):
        name = max(phases, key=lambda p: sum(phases[p].values()))
        terms = phases[name]
        return MemoryEstimate(f"{what}, widest during {name}", terms, {t: notes[t] for t in terms})

    description = (f"{method.upper()} {bits}-bit g{group_size}, {nsamples} x {seqlen} calibration tokens, "
                   f"{_name(dtype)} on {device}")
    flops = run_flops(config, nsamples, seqlen, method, asym=bool(asym_calibration), refine_passes=refine_passes)
    rates = {}
    if device != "cuda" or torch.cuda.is_available():
        # The forwards run in the block's compute dtype (fp32 on CPUs without bf16 instructions), not the activations'.
        compute_dtype = block_compute_dtype(torch.device(device), dtype)
        compute, fp32 = matmul_rate(compute_dtype, device), matmul_rate(torch.float32, device)
        rates = {f"{_name(compute_dtype)} matmul": compute, "float32 matmul": fp32}
        seconds = {"calibration forwards": flops["calibration forwards"] / compute,
                   "Hessians": flops["Hessians"] / fp32, "GPTQ": flops["GPTQ"] / fp32,
                   "output-error report": flops["loss"] / fp32}
    else:
        seconds = {}
    phases = {f"{side}: {p}": sum(t.values()) for side, ph in (("device", device_phases), ("host", host_phases))
              for p, t in ph.items()}
    return QuantPlan(description, device, widest(device_phases, f"peak {device} memory"),
                     widest(host_phases, "peak host memory (RSS)"),
                     MemoryEstimate("output disk at its fullest", disk, {t: notes[t] for t in disk}),
                     seconds, rates, phases)


def format_plan(plan: QuantPlan, title: str = "") -> str:
    lines = [f"{title}: {plan.description}" if title else plan.description, ""]
    if plan.device == "cuda":
        lines += [format_memory_report(plan.device_memory, heading="Peak device memory"), ""]
    lines += [format_memory_report(plan.host_memory, heading="Peak host memory"), ""]
    lines += [format_memory_report(plan.disk, heading="Disk"), ""]
    if not plan.time:
        lines.append(f"Time: not estimated (no {plan.device} device here to measure its rate)")
    else:
        rates = ", ".join(f"{name} {rate / 1e12:.3g} TFLOP/s" for name, rate in plan.rates.items())
        lines.append(f"Time (the arithmetic at this machine's measured rates: {rates}; a floor):")
        width = max(map(len, plan.time)) + 2
        lines += [f"  {name:<{width}}{seconds:>10.1f} s" for name, seconds in plan.time.items()]
        lines.append(f"  {'total':<{width}}{plan.seconds:>10.1f} s ({plan.seconds / 3600:.2f} h)")
    return "\n".join(lines)


def plan_totals(plan: QuantPlan) -> str:
    """One line: what quantize() logs before its first block."""
    gib = 2**30
    device = f"{plan.device_memory.total / gib:.2f} GiB on the GPU, " if plan.device == "cuda" else ""
    return (f"plan: {plan.description}: {device}{plan.host_memory.total / gib:.2f} GiB peak RSS, "
            f"{plan.disk.total / 1e9:.2f} GB of disk, about {plan.seconds:.0f} s of arithmetic")


def check_settings(config: QwenConfig, source, bits: int, group_size: int, method: str, seqlen: int,
                   tp: Optional[int] = None) -> QwenConfig:
    """The run's settings (a QuantizeSettings, valid once made) against its model, as quantize() and `qwen-quantize
    plan` check them before anything else. Returns the output's config: the source's, with the MLP width grown for tp
    (tensor_parallel.padded_ffn)."""
    if config.quantization_config is not None:
        raise ValueError(f"{source} is already quantized ({config.quantization_config.bits}-bit)")
    if method == "gptq" and seqlen > config.max_position_embeddings:  # RTN reads no calibration
        raise ValueError(f"seqlen {seqlen} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}: lower --seqlen")
    out_config = QwenConfig.from_dict(config.to_dict())
    if tp is not None:
        check_tp(tp, config.hidden_size, config.num_attention_heads, bits, group_size, **attention_of(config))
        # config.json's intermediate_size per unit of MLP width, by QwenConfig.ffn_size's rule: v1 2, the later 1.
        per_width = config.intermediate_size // config.ffn_size
        out_config.intermediate_size = per_width * padded_ffn(config.ffn_size, group_size, tp)
    word = values_per_period(bits)[0]
    for name, (k, _, _) in layout_of(out_config).linear_shapes(out_config).items():
        if k % word:
            raise ValueError(f"{name} has {k} inputs: {bits}-bit packing needs a multiple of {word}")
    return out_config


def physical_memory_bytes() -> int:
    """This machine's memory: no run's resident memory can pass it."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# The terms that grow with --nsamples x --seqlen: the calibration windows' ids, embeddings and activations.
CALIBRATION_TERMS = ("calibration tokens", "embeddings", "embeddings in the compute dtype", "calibration activations")


def check_memory(plan: QuantPlan, device: torch.device) -> None:
    """Stop a run whose peak RSS passes this machine's memory, or whose GPU peak passes the GPU's free memory (for a
    cuda device), naming what to change."""
    gib, host = 2**30, plan.host_memory
    physical = physical_memory_bytes()
    if host.total > physical:
        calibration = sum(host.terms.get(t, 0) for t in CALIBRATION_TERMS)
        advice = (f"lower --nsamples or --seqlen (the calibration windows take {calibration / gib:.2f} GiB of it)"
                  if calibration else "quantize on a machine with more memory")
        raise ValueError(f"the run ({plan.description}) needs about {host.total / gib:.2f} GiB of host memory "
                         f"(peak RSS) and this machine has {physical / gib:.2f} GiB: {advice}")
    if device.type == "cuda":
        free_gpu, _ = torch.cuda.mem_get_info(device)
        if plan.device_memory.total > free_gpu:
            activations = plan.device_memory.terms.get("calibration activations", 0)
            raise ValueError(f"the run needs about {plan.device_memory.total / gib:.2f} GiB on {device} and "
                             f"{free_gpu / gib:.2f} GiB are free: lower --nsamples or --seqlen (the calibration "
                             f"activations take {activations / gib:.2f} GiB), or use --device cpu")


def check_plan(plan: QuantPlan, output: Path, device: torch.device, reusable_bytes: int = 0) -> None:
    """Stop a run that cannot fit its disk or memory, naming what to change. reusable_bytes: finished blocks already
    on the disk."""
    need = plan.disk.total - reusable_bytes
    free = free_disk_bytes(output)
    if need > free:
        raise ValueError(f"not enough disk for {output}: the run needs {need / 1e9:.2f} GB (finished blocks, the "
                         f"output checkpoint and a shard being written) and {free / 1e9:.2f} GB are free; free some "
                         f"space or choose another --output")
    check_memory(plan, device)


def plan_report(name_or_folder: Union[str, Path, QwenConfig], settings: Optional[QuantizeSettings] = None, *,
                device: str = "cpu", **options) -> str:
    """The `qwen-quantize plan` report for a published name (no download), a folder with config.json, or a config,
    with these settings (or their options by name); refused, as quantize() would refuse the run, when the settings
    do not fit the model or the plan this machine's memory (or, on a machine with a GPU, its free memory)."""
    settings = settings_of(settings, options)
    if isinstance(name_or_folder, QwenConfig):
        config, title = name_or_folder, "config"
    elif (published := find_published(str(name_or_folder))) is not None:
        config, title = published.size.config(), published.name
        if published.precision != "bf16":
            raise ValueError(f"{published.name} is already quantized: plan its full-precision model "
                             f"({published.chat_model.name})")
    else:
        folder = Path(name_or_folder).expanduser()
        config, title = QwenConfig.from_file(folder), str(folder)
    out_config = check_settings(config, title, settings.bits, settings.group_size, settings.method, settings.seqlen,
                                settings.tp)
    plan = plan_quantization(out_config, settings, device)
    # This machine's memory always; the GPU's free memory where there is a GPU to ask.
    check_memory(plan, torch.device(device if torch.cuda.is_available() else "cpu"))
    return format_plan(plan, title)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
