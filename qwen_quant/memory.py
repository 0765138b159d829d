"""Peak memory of Qwen's published protocol (batch 1, a 1-token context, generating N tokens), term by term.

`estimate_memory` needs only a config and the quantization settings: every term is the bytes of the exact tensors
that `model.load_model` and `qlinear.QuantLinear` keep, the KV cache that `QwenForCausalLM.setup_cache`
preallocates, and the temporaries of one generation step. `measure_peak_bytes` runs the protocol on a loaded model
(GPU: torch.cuda.max_memory_allocated; CPU: the exact bytes of its tensors and KV cache, `measure_loaded_bytes`).

Unit: Qwen's published "GB" are GiB (2^30 bytes), i.e. torch.cuda.max_memory_allocated() / 2**30. Qwen-72B has
72.29e9 parameters: its bf16 weights alone are 144.58e9 bytes and its KV cache for 2049 positions another 5.37e9,
so a peak of "144.69 GB" is impossible in units of 1e9 bytes (149.95e9 > 144.69e9). In GiB the same tensors are
134.65 + 5.00 = 139.65 <= 144.69, as a peak must be.
"""
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import QwenConfig, is_int
from .kernels.configs import M_BUCKETS, split_k_workspace_sizes
from .layout import layout_of
from .loading import default_dtype
from .packing import valid_group_size
from .published import SIZES, find_published

GIB = 2**30

LINEAR_WEIGHTS = "linear weights"
LINEAR_EXTRAS = "scales, zeros, g_idx, biases"
EMBEDDING = "embedding"
LM_HEAD = "lm_head"
NORMS = "norms"
KV_CACHE = "KV cache"
ACTIVATIONS = "activations and logits"
WORKSPACE = "kernel workspace"
OVERHEAD = "runtime overhead"
# The terms that are bytes of tensors held for the whole run: what measure_loaded_bytes measures exactly.
TENSOR_TERMS = (LINEAR_WEIGHTS, LINEAR_EXTRAS, EMBEDDING, LM_HEAD, NORMS, KV_CACHE)

# QuantLinear buffers holding the integer codes (per backend: triton/torch, cpu Int4, cpu Int8); its other buffers
# are scales, zeros, bias and act-order permutations.
QUANT_CODE_BUFFERS = ("qweight", "weight_int4pack", "weight_int8")

# PyTorch's caching allocator rounds every block up to 512 bytes, and max_memory_allocated counts blocks.
CUDA_BLOCK_ROUND = 512
# cuBLAS gets its workspace from PyTorch's caching allocator, so it shows in max_memory_allocated. PyTorch's default
# is 32 MiB on Hopper and 8.125 MiB (":4096:2:16:8") before it; we count the larger. The lm_head (and every linear
# of a dense model) runs through cuBLAS; the Triton GPTQ kernels need no workspace beyond their output.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
PREFILL_ROWS = M_BUCKETS[-2]  # rows of x above which the Triton backend's prompts take the dense route

BITS_OF_PRECISION = {"bf16": None, "int8": 8, "int4": 4}  # the columns of Qwen's published table
PUBLISHED_TOKENS = 2048  # Qwen's protocol: batch 1, a 1-token context, generating 2048 tokens


@dataclass
class MemoryEstimate:
    description: str  # what was estimated: precision, activation dtype, device, protocol
    terms: dict  # term name -> bytes, in report order; the peak is their sum
    notes: dict  # term name -> what it holds
    not_kept: dict = field(default_factory=dict)  # checkpoint tensors the loader does not keep -> bytes
    published_gpus: int = 1  # devices Qwen's figure was measured on (72B BF16 / Int8: 2)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def tensor_bytes(self) -> int:
        return sum(self.terms[t] for t in TENSOR_TERMS)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unit_for(nbytes: int) -> tuple:
    """GiB, the unit of Qwen's figures, unless a small model would print only zeros."""
    return ("GiB", GIB) if nbytes >= GIB else ("MiB", 2**20)


def _block_bytes(shape, dtype: torch.dtype, device: str) -> int:
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= size
    if device == "cuda":
        return -(-nbytes // CUDA_BLOCK_ROUND) * CUDA_BLOCK_ROUND
    return nbytes


def triton_workspace_bytes(shapes: list, prompt_rows: int, dtype: torch.dtype) -> int:
    """What the Triton kernels allocate beside the weights (qwen_quant.kernels.gptq_matmul): one split-K workspace
    per device, and, for a prompt of more than PREFILL_ROWS rows, the scratch the widest layer is dequantized into
    (the heuristic's dense route; a tuned table may keep the fused kernel there and need none)."""
    partials, arrivals = split_k_workspace_sizes(max(N for _, N, _ in shapes))
    scratch = max(K * N for K, N, _ in shapes) * dtype.itemsize if prompt_rows > PREFILL_ROWS else 0
    return 4 * (partials + arrivals) + scratch


def quant_backend(K: int, N: int, bits: int, group: int, device: str, backend: str = "auto") -> str:
    """The backend QuantLinear.from_packed picks (or accepts) for this layer, asked of qlinear itself."""
    from .qlinear import SortedGptqWeight, choose_backend, unsupported_reason

    # Only the shapes matter to the choice, so a meta qweight stands in for the checkpoint's.
    shape_only = SortedGptqWeight(qweight=torch.empty(K * bits // 32, N, dtype=torch.int32, device="meta"),
                                  zeros=None, scales=None, row_group=None, bits=bits, group=group)
    if backend == "auto":
        return choose_backend(shape_only, torch.device(device))[0]
    reason = unsupported_reason(backend, shape_only, torch.device(device))
    if reason:
        raise ValueError(f"backend {backend!r} cannot run a [{K} -> {N}] {bits}-bit layer: {reason}")
    return backend


def quantized_linear_tensors(K: int, N: int, bits: int, group_size: int, dtype: torch.dtype, device: str,
                             sym: bool = True, desc_act: bool = False, backend: str = "auto",
                             bias: bool = True) -> list:
    """(term, shape, dtype) of every tensor one QuantLinear keeps: what its backend stores, not the checkpoint."""
    from .qlinear import backend_class

    group = K if group_size == -1 else group_size
    backend = quant_backend(K, N, bits, group, device, backend)
    kept = backend_class(backend, bits).declared_buffers(K, N, bits, group_size, dtype=dtype, symmetric=sym,
                                                         act_order=desc_act, bias=bias)
    return [(LINEAR_WEIGHTS if name in QUANT_CODE_BUFFERS else LINEAR_EXTRAS, shape, kept_dtype)
            for name, (shape, kept_dtype) in kept.items()]


def dense_linear_tensors(K: int, N: int, bias: bool, dtype: torch.dtype) -> list:
    return [(LINEAR_WEIGHTS, (N, K), dtype)] + ([(LINEAR_EXTRAS, (N,), dtype)] if bias else [])


def peak_transients(config: QwenConfig, batch: int, prompt_tokens: int, max_len: int, act_bytes: int) -> dict:
    """Bytes of the temporaries alive at once at the widest moment of each stage of a generation step (upper
    bounds). The prefill of T = prompt_tokens positions is the widest step; decoding is the T = 1 case."""
    h, ff, V, H = config.hidden_size, config.ffn_size, config.vocab_size, config.num_attention_heads
    rows = batch * prompt_tokens
    return {
        # The residual stream and a norm output, the MLP's three ff-wide tensors (w1 out, silu(w2 out), their
        # product), the norms' fp32 temporaries, a quantized kernel's fp32 split-K output, and fp32 attention scores
        # over the whole cache (the math path; flash kernels need less).
        "a block's temporaries": rows * (act_bytes * (2 * h + 3 * ff) + 4 * (3 * h + ff))
                                 + batch * H * prompt_tokens * max_len * 4,
        # The previous step's fp32 logits are still referenced while the new lm_head output (activation dtype) and
        # its fp32 copy exist; forward returns fp32 logits for every position it was given.
        "the logits of this and the previous step": batch * V * 4 + rows * V * (act_bytes + 4),
    }


def precision_label(bits: Optional[int], group_size: int, sym: bool, desc_act: bool, dtype: torch.dtype) -> str:
    if bits is None:
        return f"dense {_dtype_name(dtype)}"
    group = "per-channel" if group_size == -1 else f"g{group_size}"
    return f"Int{bits} {group} {'sym' if sym else 'asym'}{' desc_act' if desc_act else ''}"


def estimate_memory(config: QwenConfig, bits: Optional[int] = None, group_size: int = 128, tokens: int = 2048,
                    batch: int = 1, prompt_tokens: int = 1, dtype: Optional[torch.dtype] = None,
                    device: str = "cuda", sym: bool = True, desc_act: bool = False,
                    backend: str = "auto") -> MemoryEstimate:
    """Peak bytes of loading `config` (bits None: dense) and generating `tokens` after a `prompt_tokens` context.

    dtype: the activation dtype (default: the loader's choice, fp16 for quantized models on GPU, else bf16 for
    quantized and the config's dtype for dense ones). backend: as given to the loader."""
    for option, value in (("tokens", tokens), ("batch", batch), ("prompt_tokens", prompt_tokens)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{option} must be a positive integer, got {value!r}")
    if not valid_group_size(group_size):
        raise ValueError(f"group_size must be a positive integer or -1 (per channel), got {group_size!r}")
    device = torch.device(device).type
    dtype = dtype or default_dtype(config, bits is not None, device)
    h, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    layout = layout_of(config)
    shapes = list(layout.linear_shapes(config).values())
    terms = dict.fromkeys(TENSOR_TERMS + (ACTIVATIONS, WORKSPACE, OVERHEAD), 0)
    not_kept = {}
    for K, N, bias in shapes:
        if bits is None:
            tensors = dense_linear_tensors(K, N, bias, dtype)
        else:  # a quantized linear holds the bias our export writes for it (quantize.export_linear)
            tensors = quantized_linear_tensors(K, N, bits, group_size, dtype, device, sym, desc_act, backend,
                                               bias or layout.bias_on_every_linear)
            G = -(-K // (K if group_size == -1 else group_size))
            # The loader reads these from the checkpoint and drops them (zeros are unpacked, or the constant
            # 2^(bits-1) when symmetric; g_idx becomes a permutation, or nothing when it is k // group).
            not_kept["qzeros"] = not_kept.get("qzeros", 0) + L * G * (N * bits // 32) * 4
            not_kept["g_idx"] = not_kept.get("g_idx", 0) + L * K * 4
        for term, shape, tensor_dtype in tensors:
            terms[term] += L * _block_bytes(shape, tensor_dtype, device)
    terms[EMBEDDING] = _block_bytes((V, h), dtype, device)
    tied = config.tie_word_embeddings  # then the head is the embedding's matrix, held once
    terms[LM_HEAD] = 0 if tied else _block_bytes((V, h), dtype, device)
    qk_norms = L * len(layout.qk_norms)  # qwen3's per-head norms of q and k
    terms[NORMS] = (2 * L + 1) * _block_bytes((h,), dtype, device) + qk_norms * _block_bytes((config.head_dim,),
                                                                                               dtype, device)
    max_len = prompt_tokens + tokens  # what generate() asks setup_cache for
    # The cache holds the kv heads only (grouped-query attention: fewer than the query heads).
    terms[KV_CACHE] = 2 * L * _block_bytes((batch, config.num_key_value_heads, max_len, config.head_dim), dtype,
                                           device)
    transients = peak_transients(config, batch, prompt_tokens, max_len, dtype.itemsize)
    widest = max(transients, key=transients.get)
    terms[ACTIVATIONS] = transients[widest]
    terms[WORKSPACE] = CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0
    quantized = bits is not None
    backends = {quant_backend(K, N, bits, K if group_size == -1 else group_size, device, backend)
                for K, N, _ in shapes} if quantized else set()
    triton = "triton" in backends
    if triton:
        terms[WORKSPACE] += triton_workspace_bytes(shapes, batch * prompt_tokens, dtype)
    cpu_tiles = "cpu" in backends and batch * prompt_tokens > 1
    if cpu_tiles:  # the cpu backend's prompts may run tiles of the dequantized weight (qlinear); kept by the process
        from .qlinear import cpu_prefill_scratch_bytes

        terms[WORKSPACE] += max(cpu_prefill_scratch_bytes(K, bits, batch * prompt_tokens) for K, _, _ in shapes)
    # The fixed overhead is outside what is compared: the CUDA context and the allocator's cached-but-free blocks are
    # not in max_memory_allocated (nor in Qwen's figures), and on CPU the interpreter and libraries are not tensors.
    terms[OVERHEAD] = 0
    notes = {
        LINEAR_WEIGHTS: f"{len(shapes) * L} block linears, "
                        f"{'packed integer codes' if quantized else _dtype_name(dtype)}",
        LINEAR_EXTRAS: "what the quantized linears keep beside the codes" if quantized else "biases",
        EMBEDDING: f"{layout.embedding.removesuffix('.weight')} [{V}, {h}] {_dtype_name(dtype)}",
        LM_HEAD: "tied: the embedding's matrix" if tied else f"[{V}, {h}] {_dtype_name(dtype)} (untied)",
        NORMS: f"{2 * L + 1} RMSNorm weights" + (f" and {qk_norms} q/k norms" if qk_norms else ""),
        KV_CACHE: f"preallocated, {max_len} positions x {L} layers, {_dtype_name(dtype)}",
        ACTIVATIONS: f"at the widest moment: {widest}",
        WORKSPACE: (("the prompt's dequantized tiles (kept for later prompts)" if cpu_tiles else
                     "CPU kernels allocate only their outputs") if device != "cuda" else
                    "cuBLAS workspace (lm_head), the Triton kernels' split-K sums" +
                    (" and the prompt's dequantized-layer scratch" if batch * prompt_tokens > PREFILL_ROWS else "")
                    if triton else "cuBLAS workspace"),
        OVERHEAD: "CUDA context and allocator cache: outside max_memory_allocated" if device == "cuda" else
                  "interpreter and libraries: not tensors",
    }
    description = (f"{precision_label(bits, group_size, sym, desc_act, dtype)}, {_dtype_name(dtype)} activations, "
                   f"{device}, batch {batch}, {prompt_tokens}-token context + {tokens} new tokens")
    return MemoryEstimate(description, terms, notes, not_kept)


def _term_of(module_name: str, module: nn.Module, tensor_name: str, model: nn.Module) -> str:
    from .model import KVCache, RMSNorm
    from .qlinear import QuantLinear

    if isinstance(module, QuantLinear):
        return LINEAR_WEIGHTS if tensor_name in QUANT_CODE_BUFFERS else LINEAR_EXTRAS
    if isinstance(module, KVCache):
        return KV_CACHE
    if isinstance(module, RMSNorm):
        return NORMS
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if module is model.lm_head:
        return LM_HEAD
    if isinstance(module, nn.Linear) and module_name.startswith(model.layout.blocks + "."):
        return LINEAR_WEIGHTS if tensor_name == "weight" else LINEAR_EXTRAS
    return "other"


def measure_loaded_bytes(model: nn.Module) -> dict:
    """Exact bytes held by every parameter and buffer of a loaded model (KV cache included), by estimate term.

    Each storage is counted once, in full (a view keeps its whole storage alive), under the first tensor seen on
    it. Tensors that fit no term are reported as "other"."""
    measured = dict.fromkeys(TENSOR_TERMS, 0)
    seen = set()
    for module_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, tensor in tensors:
            storage = tensor.untyped_storage()
            key = (tensor.device, storage.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            term = _term_of(module_name, module, tensor_name, model)
            measured[term] = measured.get(term, 0) + storage.nbytes()
    measured["total"] = sum(measured.values())
    return measured


def measure_peak_bytes(model, tokens: int, batch: int = 1, prompt_tokens: int = 1) -> int:
    """Run the protocol on the model's device (a fresh KV cache, greedy generation of `tokens` tokens) and return
    the peak: max_memory_allocated on CUDA; on CPU the exact bytes of the tensors and KV cache (CPU transients are
    not tracked, so compare with the estimate's tensor terms)."""
    model.clear_cache()
    prompt = torch.zeros(batch, prompt_tokens, dtype=torch.long)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
        torch.cuda.reset_peak_memory_stats(model.device)
        model.generate(prompt, max_new_tokens=tokens)
        torch.cuda.synchronize(model.device)
        return torch.cuda.max_memory_allocated(model.device)
    model.generate(prompt, max_new_tokens=tokens)
    return measure_loaded_bytes(model)["total"]


@dataclass
class PublishedCell:
    size: str  # "7B"
    precision: str  # "bf16", "int8", "int4"
    ours_gib: float
    published_gib: float

    @property
    def difference_gib(self) -> float:
        return self.ours_gib - self.published_gib


def published_gpus(size_name: str, precision: str) -> int:
    # Qwen ran 72B BF16 and Int8 on 2 GPUs and reports the sum; ours is the total of one runtime's tensors.
    return 2 if size_name == "72B" and precision != "int4" else 1


def estimate_published(size_name: str, precision: str, tokens: int = PUBLISHED_TOKENS) -> MemoryEstimate:
    """Our estimate for one cell of Qwen's table: the full-size config and Qwen's settings (Int4 / Int8: g128 sym,
    desc_act off) on a GPU, as the figures were measured."""
    estimate = estimate_memory(SIZES[size_name].config(), bits=BITS_OF_PRECISION[precision], group_size=128,
                               tokens=tokens, device="cuda")
    estimate.published_gpus = published_gpus(size_name, precision)
    return estimate


def published_table(tokens: int = PUBLISHED_TOKENS) -> list:
    """Every cell of Qwen's published memory table (4 sizes x BF16 / Int8 / Int4) beside our estimate, in GiB.
    Qwen measured 2048 new tokens; another `tokens` changes only our column."""
    return [PublishedCell(name, precision, estimate_published(name, precision, tokens).total / GIB,
                          size.speed_memory[precision][1])
            for name, size in SIZES.items() for precision in BITS_OF_PRECISION]


def format_published_table(cells: list) -> str:
    lines = [f"{'model':<10}{'precision':<11}{'ours GiB':>10}{'published':>11}{'difference':>12}"]
    lines += [f"Qwen-{c.size:<5}{c.precision:<11}{c.ours_gib:>10.2f}{c.published_gib:>11.2f}"
              f"{c.difference_gib:>+12.2f}" for c in cells]
    return "\n".join(lines)


def where_the_saving_comes_from(estimate: MemoryEstimate, published_gib: float) -> list:
    """What our runtime does not allocate, each a known source of extra peak memory in a transformers (+ AutoGPTQ)
    run. The sizes are ours: how the published run spent its extra memory is not published."""
    lines = [f"Where the saving comes from: the published run held {published_gib - estimate.total / GIB:.2f} GiB "
             "more than the terms above. Our runtime never allocates:",
             "- KV cache growth: the cache is preallocated once, at its final length, in the activation dtype, and "
             "written in place; no per-step concatenation (which holds a layer's old and new cache at once).",
             "- second or fp32 copies of weights: tensors are loaded one at a time and converted on the CPU.",
             "- logits beyond the current step: only the new position's fp32 logits (and the previous step's, until "
             "replaced) exist."]
    if estimate.not_kept:
        dropped = ", ".join(f"{name} {nbytes / 2**20:.1f} MiB" for name, nbytes in estimate.not_kept.items())
        lines.append(f"- checkpoint tensors the kernels do not need ({dropped}): symmetric zeros are the constant "
                     "2^(bits-1) and without desc_act g_idx is k // group_size; and no dequantized-weight scratch "
                     f"for decoding and prompts up to {PREFILL_ROWS} rows: the Triton kernels dequantize tile by tile "
                     "in registers (longer prompts dequantize into one scratch shared by every layer, for cuBLAS).")
    return [textwrap.fill(line, 116, subsequent_indent="  ") for line in lines]


def format_memory_report(estimate: MemoryEstimate, published: Optional[float] = None,
                         heading: str = "Peak memory") -> str:
    """The terms one per line (GiB), the total beside Qwen's published figure (GiB, when given), and where the
    saving comes from."""
    width = max(map(len, estimate.terms)) + 2
    unit, scale = _unit_for(estimate.total)
    lines = [f"{heading}: {estimate.description}", ""]
    lines += [f"  {name:<{width}}{nbytes / scale:>8.3f} {unit}   {estimate.notes[name]}"
              for name, nbytes in estimate.terms.items()]
    lines.append(f"  {'total':<{width}}{estimate.total / scale:>8.3f} {unit}")
    total = estimate.total / GIB
    if published is not None:
        gpus = f", summed over {estimate.published_gpus} GPUs" if estimate.published_gpus > 1 else ""
        verdict = "less" if total <= published else "MORE"
        lines.append(f"  {'published':<{width}}{published:>8.2f} GiB   Qwen README, A100-80G{gpus}: ours is "
                     f"{abs(published - total):.2f} GiB ({abs(1 - total / published):.0%}) {verdict}")
        if total <= published:
            lines += [""] + where_the_saving_comes_from(estimate, published)
    return "\n".join(lines)


def measured_report(folder: Path, tokens: int) -> str:
    """Load a checkpoint folder with its own settings, run the protocol, and compare with the estimate for the
    device it ran on."""
    from .model import QwenForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = QwenForCausalLM.from_pretrained(folder, device=device)
    measured = measure_peak_bytes(model, tokens)
    quant = model.config.quantization_config
    settings = dict(bits=quant.bits, group_size=quant.group_size, sym=quant.sym, desc_act=quant.desc_act) \
        if quant is not None else {}
    estimate = estimate_memory(model.config, tokens=tokens, dtype=model.dtype, device=device, **settings)
    # On CPU only the tensor terms are measured (exactly); on GPU max_memory_allocated sees everything.
    expected = estimate.tensor_bytes() if device == "cpu" else estimate.total
    unit, scale = _unit_for(measured)
    return (f"Measured on {device} ({_dtype_name(model.dtype)}): {measured / scale:.3f} {unit}; estimated "
            f"{expected / scale:.3f} {unit} ({expected / measured - 1:+.2%})")


def memory_report(name_or_config: Union[str, Path, QwenConfig], bits: Optional[int] = None, tokens: int = 2048,
                  group_size: int = 128, measure: bool = False) -> str:
    """The `qwen-quantize memory` report for a published name (`Qwen-7B-Chat-Int4`; no download), a folder holding
    config.json, or a QwenConfig. Bits default to the name's -Int4 / -Int8, or the config's quantization_config,
    else dense. Qwen's figures are shown where they apply (a published size, 2048 tokens, g128). `measure` also loads
    the folder's weights and runs the protocol (on CUDA when available)."""
    published_model = None if isinstance(name_or_config, QwenConfig) else find_published(str(name_or_config))
    folder = None
    if isinstance(name_or_config, QwenConfig):
        config, title = name_or_config, "config"
    elif published_model is not None:
        config, title = published_model.size.config(), published_model.name
        if bits is None:
            bits = BITS_OF_PRECISION[published_model.precision]
    else:
        folder = Path(name_or_config).expanduser()
        config, title = QwenConfig.from_file(folder), str(folder)
    sym, desc_act, quant = True, False, config.quantization_config
    if quant is not None and bits in (None, quant.bits):
        bits, group_size, sym, desc_act = quant.bits, quant.group_size, quant.sym, quant.desc_act
    estimate = estimate_memory(config, bits=bits, group_size=group_size, tokens=tokens, device="cuda", sym=sym,
                               desc_act=desc_act)
    report = f"{title}\n"
    precision = {b: p for p, b in BITS_OF_PRECISION.items()}.get(bits)
    # Qwen published memory figures for v1's sizes only (published.SIZES).
    figures = published_model is not None and bool(published_model.size.speed_memory)
    comparable = figures and tokens == PUBLISHED_TOKENS
    if comparable and precision and (bits is None or group_size == 128):
        estimate.published_gpus = published_gpus(published_model.size.name, precision)
        report += format_memory_report(estimate, published_model.size.speed_memory[precision][1])
    else:
        report += format_memory_report(estimate)
    if comparable:
        cells = [c for c in published_table() if c.size == published_model.size.name]
        report += f"\n\nAll precisions of Qwen-{published_model.size.name}:\n{format_published_table(cells)}"
    elif published_model is not None and not figures:
        report += f"\n\n{published_model.name}: no published figure (Qwen published memory figures for Qwen v1 only)"
    if measure:
        if folder is None:
            raise ValueError("measuring needs a local checkpoint folder, not a published name or a bare config")
        report += "\n\n" + measured_report(folder, tokens)
    return report
