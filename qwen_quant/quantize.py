"""Block-by-block GPTQ of a Qwen checkpoint, written in the layout of Qwen's published Int4 / Int8 models.

Only one decoder block's weights are ever materialised: the others stay in the memory-mapped safetensors. Each block
is quantized true-sequentially in its family's groups (layout.Layout.groups: v1's [c_attn], [c_proj], [w1, w2],
[mlp.c_proj]; qwen2's and qwen3's [q, k, v], [o], [gate, up], [down], q/k/v sharing one Hessian): every group's
Hessian is collected from the outputs of the already-quantized groups before it, then the quantized block produces
the next block's inputs. Finished blocks are saved in a work folder beside the output, so a killed run resumes at the
next block; the output folder appears, by one rename, only when the checkpoint is complete.
"""
import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .checkpoint import WeightReader, copy_side_files, resolve_model_path, write_shards
from .config import QuantConfig, QwenConfig
from .finite import SLICE_ELEMENTS, all_finite
from .gptq import HessianAccumulator, gptq_quantize, input_scales, rtn_quantize
from .layout import GPTQ_PACKED, GPTQ_TENSORS, Layout, layout_of
from .loading import check_tensors, fill_module
from .model import Block, make_rope, ntk_alpha
from .output_folder import MODEL_CARD_MARK, WorkFolder, check_output, filesystem_errors, finished_block_bytes
from .packing import dequantize, pack_qweight, pack_qzeros
from .plan import (CHUNK_TOKENS, block_compute_dtype, check_plan, check_settings, peak_rss_bytes, plan_quantization,
                   plan_totals, return_freed_tensors_to_os)
from .published import find_published
from .settings import QuantizeSettings, check_arguments, settings_of
from .tensor_parallel import attention_of, pad_mlp, tp_summary

log = logging.getLogger("qwen_quant")
FP16_MAX = torch.finfo(torch.float16).max


@dataclass
class LayerReport:
    name: str
    shape: tuple  # (out, in)
    tokens: int  # calibration tokens whose activations built the Hessian (0 for RTN)
    loss: Optional[float]  # output error tr((W-Q) H (W-Q)^T) / 2N on the calibration inputs
    rtn_loss: Optional[float]  # the same for round-to-nearest on the same grid
    damp: Optional[float]
    seconds: float


@dataclass
class BlockReport:
    """One decoder block: where its time went (wall seconds; on CUDA after waiting for the queued work) and its layers."""
    index: int
    layers: list = field(default_factory=list)  # LayerReport of each linear
    read_s: float = 0.0  # reading its weights
    forward_s: float = 0.0  # its stages over the calibration chunks (the output of a resumed block included)
    hessian_s: float = 0.0  # accumulating the Hessians
    gptq_s: float = 0.0  # quantizing its linears: GPTQ (or RTN), the RTN comparison, packing
    write_s: float = 0.0  # saving the finished block in the work folder
    seconds: float = 0.0  # the whole block
    cpu_s: float = 0.0  # process CPU time of the whole block, all threads
    resumed: bool = False
    peak_rss_bytes: int = 0  # the process's peak RSS so far, read when the block is done
    # The quantizer's output (QuantResult) per linear name while quantize()'s on_block runs, then emptied so that the
    # report holds no tensors; kept only for an on_block (the codes of a block's finished linears would sit beside
    # its widest GPTQ), empty for a resumed block.
    results: Optional[dict] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class QuantizeReport:
    output: Path
    settings: QuantizeSettings
    layers: list = field(default_factory=list)
    blocks: list = field(default_factory=list)  # BlockReport of each block, without its results
    seconds: float = 0.0
    calibration_s: float = 0.0  # reading, tokenizing and embedding the calibration windows
    export_s: float = 0.0  # writing the output checkpoint's tensors
    peak_rss_bytes: int = 0
    peak_cuda_bytes: int = 0
    output_bytes: int = 0
    resumed_blocks: int = 0
    notes: list = field(default_factory=list)  # what the folder can and cannot be used for (TP degree, auto_map)


def default_output_name(model_path, folder: Path, bits: int, layout: Layout) -> str:
    """Qwen's naming, the layout's suffix after the model's name (the Hub folder name for a published model):
    Qwen-14B-Chat -> Qwen-14B-Chat-Int4, Qwen2.5-7B-Instruct -> Qwen2.5-7B-Instruct-GPTQ-Int4."""
    published = find_published(str(model_path))
    base = published.repo_id.split("/")[1] if published else folder.name
    return base + layout.quantized_suffix.format(bits=bits)


@filesystem_errors
def quantize(model_path, output_dir=None, settings: Optional[QuantizeSettings] = None, *, device=None,
             resume: bool = False, overwrite: bool = False, progress: bool = True,
             on_block: Optional[Callable[[BlockReport], None]] = None, hub: Optional[str] = None,
             **options) -> QuantizeReport:
    """Quantize the checkpoint at model_path (a folder or a published name) and write it to output_dir.

    settings: the method's options (settings.QuantizeSettings says what each does), or instead those options by
    name (bits=4, method="rtn", ...), the others at their defaults. The run's own arguments:
    hub: where a published name is downloaded from (checkpoint.resolve_model_path).
    on_block(block_report) is called after each block is saved (or resumed), with its index, timings, layer reports
    and, during the call only, the quantizer's results.
    resume: continue a killed run from the work folder beside the output. Other settings or calibration tokens are
    an error; a finished block is reused only while the source content it was made from (its weights, the blocks'
    before it and the embedding) is unchanged, else it and every later block are quantized again, with a warning.
    Every argument is checked before any file is read (the settings when they are made, the run's flags here).
    """
    start = time.time()
    settings = settings_of(settings, options)
    check_arguments(resume=resume, overwrite=overwrite, progress=progress)
    quant, method = settings.quant_config(), settings.method
    log.info(f"quantizing {model_path}: {settings.description()}")
    folder = resolve_model_path(model_path, hub)
    config = QwenConfig.from_file(folder)
    layout = layout_of(config)
    output = Path(output_dir) if output_dir else Path(default_output_name(model_path, folder, settings.bits, layout))
    work_path = check_output(output, folder, overwrite)
    # The output's config: the source's, with the MLP width grown for --tp (the weights are padded as they are read).
    out_config = check_settings(config, folder, settings.bits, settings.group_size, method, settings.seqlen,
                                settings.tp)
    reader = WeightReader(folder)
    check_tensors(reader, config)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = config.dtype if not (device.type == "cpu" and config.dtype == torch.float16) else torch.float32
    compute_dtype = block_compute_dtype(device, dtype)
    plan = plan_quantization(out_config, settings, device.type, dtype, tokenizer=(folder / "qwen.tiktoken").is_file())
    # A fresh run clears the work folder; a resumed one keeps its finished blocks.
    check_plan(plan, output, device, reusable_bytes=finished_block_bytes(work_path) if resume else 0)
    log.info(plan_totals(plan))
    for name in unquantized_tensors(layout, reader):  # fail now rather than at the export, hours later
        read_fp16(reader, name)
    return_freed_tensors_to_os()
    # Every check that can be made before the first write is made: a refused run leaves nothing behind, and one that
    # fails from here on leaves only finished blocks to resume (WorkFolder's context).
    with WorkFolder(work_path, resume) as work:
        report = QuantizeReport(output=output, settings=settings)

        hidden = rope = tokens_digest = None
        key = ""  # the content read so far, which the next block's output depends on (read_keyed)
        if method == "gptq":
            calibration_start = time.perf_counter()
            (hidden, tokens_digest), key = read_keyed(reader, key, lambda: embed_calibration(
                folder, reader, config, layout, settings, dtype, device))
            report.calibration_s = time.perf_counter() - calibration_start
            seqlen = settings.seqlen
            rope = make_rope(config, seqlen, ntk_alpha(seqlen, config.seq_length) if config.use_dynamic_ntk else 1.0,
                             device=device)
        # The full-precision model's activations, for asymmetric calibration.
        fp_hidden = hidden.clone() if hidden is not None and settings.asym_calibration else None
        # Resume is keyed by content, not paths: the calibration tokens and the weights' layout here; each block's
        # file holds the key of the source content it was made from.
        work.start({**settings.key(), "calibration_tokens_sha256": tokens_digest, "config": config.to_dict(),
                    "weights_sha256": reader.fingerprint()})
        bar = tqdm(range(config.num_hidden_layers), desc="quantizing", unit="block", disable=not progress)
        for i in bar:
            prefix = layout.block_prefix(i)
            timings = BlockReport(i, results={} if on_block is not None else None)
            block_start, block_cpu = clock(device), time.process_time()
            with torch.device("meta"):
                block = Block(config)
            key = read_keyed(reader, key, lambda: fill_module(block, reader, prefix, compute_dtype, device))[1]
            if out_config.ffn_size != config.ffn_size:
                pad_mlp(block.get_submodule(layout.down.rpartition(".")[0]), out_config.ffn_size, layout)
            timings.read_s = clock(device) - block_start
            saved = work.load_block(i, key)
            if saved is not None:  # done before the run was killed: reuse its tensors, recompute its outputs
                timings.layers = [LayerReport(**r) for r in saved[1]]
                timings.resumed = True
                report.resumed_blocks += 1
                if fp_hidden is not None:  # its full-precision output first, while the block holds its own weights
                    run_block(block, fp_hidden, rope)
                for path in layout.linears:
                    set_dequantized(block.get_submodule(path), saved[0], prefix + path, quant, compute_dtype)
                if settings.input_scaling:  # the norms hold the scales' inverses
                    for norm in layout.norms:
                        block.get_submodule(norm).weight.copy_(saved[0][f"{prefix}{norm}.weight"])
                if hidden is not None:
                    step_start = clock(device)
                    run_block(block, hidden, rope)
                    timings.forward_s = clock(device) - step_start
            else:
                tensors = quantize_block(block, prefix, hidden, rope, settings, bar, timings, fp_hidden)
                step_start = clock(device)
                work.save_block(i, tensors, [asdict(r) for r in timings.layers], key)
                timings.write_s = clock(device) - step_start
            if hidden is not None and not all_finite(hidden):  # blame this block, not the next one's Hessian
                raise ValueError(f"block {i} ({prefix}*) outputs NaN or inf on the calibration inputs: its weights "
                                 f"overflow the compute dtype {str(dtype).removeprefix('torch.')}")
            del block
            timings.seconds, timings.cpu_s = clock(device) - block_start, time.process_time() - block_cpu
            timings.peak_rss_bytes = peak_rss_bytes()
            report.layers += timings.layers
            report.blocks.append(timings)
            if on_block is not None:
                on_block(timings)
            timings.results = {}
        bar.close()
        # The calibration activations are done with: free them before the export reads the big tensors.
        hidden = fp_hidden = None

        out = work.path / "checkpoint"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        export_start = time.perf_counter()
        report.output_bytes = write_shards(exported_tensors(reader, config, layout, work), out,
                                           settings.max_shard_bytes)
        report.export_s = time.perf_counter() - export_start
        out_config.torch_dtype = "float16"
        out_config.quantization_config = quant
        if layout.remote_code:  # v1's remote code reads the flags, AutoGPTQ the file beside config.json
            out_config.extra.update(bf16=False, fp16=True, fp32=False)
            (out / "quantize_config.json").write_text(json.dumps(quant.to_dict(), indent=2) + "\n")
        out_config.save(out)
        copy_side_files(folder, out)
        report.notes.append(tp_summary(config, out_config, quant, settings.tp, attention_of(out_config)))
        if layout.remote_code and "auto_map" not in config.extra:
            report.notes.append(f"{folder / 'config.json'} has no auto_map, so neither has the output: transformers "
                                "cannot load it with trust_remote_code (add Qwen's auto_map and remote code to use it)")
        report.seconds = time.time() - start
        report.peak_rss_bytes = peak_rss_bytes()
        if device.type == "cuda":
            report.peak_cuda_bytes = torch.cuda.max_memory_allocated(device)
        (out / "README.md").write_text(model_card(report, folder), encoding="utf-8")
        work.publish(out, output, overwrite)  # a folder replaced by --overwrite goes only once this one is complete
        return report


def read_keyed(reader: WeightReader, key: str, read: Callable) -> tuple:
    """(read(), the new key): a sha256 of `key` and of every tensor read() takes from the checkpoint, hashed as it is
    read. Chained from the embedding through block i, it is the source content block i's output depends on: --resume
    reuses a finished block only when its key is unchanged."""
    reader.digest = hashlib.sha256(key.encode())
    try:
        return read(), reader.digest.hexdigest()
    finally:
        reader.digest = None


def unquantized_tensors(layout: Layout, reader: WeightReader) -> list:
    """The tensors outside the blocks, written as they are in fp16: the embedding, the final norm and the head,
    unless a tied head is absent from the source (it stays tied: the output has none either)."""
    return [name for name in (layout.embedding, layout.final_norm, layout.lm_head) if name in reader]


def embed_calibration(folder, reader, config, layout, settings: QuantizeSettings, dtype, device) -> tuple:
    """Calibration windows -> embeddings [nsamples, seqlen, hidden] in the compute dtype, and the tokens' sha256."""
    from .calibration import get_calibration_data
    from .tokenizer import load_tokenizer

    tokens = get_calibration_data(settings.calibration, load_tokenizer(folder), nsamples=settings.nsamples,
                                  seqlen=settings.seqlen, seed=settings.seed)
    if int(tokens.max()) >= config.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"calibration token ids span [{int(tokens.min())}, {int(tokens.max())}], outside the "
                         f"model's vocabulary of {config.vocab_size}")
    wte = reader.get(layout.embedding)
    hidden = torch.nn.functional.embedding(tokens, wte).to(device=device, dtype=dtype)
    if not all_finite(hidden):
        raise ValueError(f"calibration embeddings contain NaN or inf ({layout.embedding} is not finite)")
    return hidden, hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()


def chunks(n_samples: int, seqlen: int):
    step = max(1, CHUNK_TOKENS // seqlen)
    return [slice(s, min(s + step, n_samples)) for s in range(0, n_samples, step)]


def run_stage(block: Block, stage: int, hidden: torch.Tensor, attended: Optional[torch.Tensor], rope,
              previous=None) -> torch.Tensor:
    """Block.stage on one chunk's views, computed in the block's dtype: `hidden` holds the block's input before
    Block.RESIDUAL and the residual stream from it on; `attended` receives the attention's output (stage 1)."""
    dtype = block_dtype(block)
    if stage >= Block.RESIDUAL:
        return block.stage(stage, None, hidden.to(dtype), rope, previous)
    y = attended if stage == Block.RESIDUAL - 1 else None
    y_work = None if y is None else y.to(dtype)
    result = block.stage(stage, hidden.to(dtype), y_work, rope, previous)
    if y_work is not y:  # a copy in the block's dtype: store what the stage wrote into it
        y.copy_(y_work)
    return result


def block_dtype(block: Block) -> torch.dtype:
    """The dtype the block computes in: its first norm's (every weight of a block has the same)."""
    return block.get_submodule(block.layout.norms[0]).weight.dtype


def attention_scratch(block: Block, hidden: torch.Tensor) -> torch.Tensor:
    """Room for the attention's output of `hidden`'s tokens: heads x head_dim wide, which is not the hidden size
    where an explicit head_dim differs (Qwen3-0.6B)."""
    return hidden.new_empty(hidden.shape[:-1] + (block.attention_width,))


def add_attention(block: Block, x: torch.Tensor, attended: torch.Tensor) -> None:
    """Block.add_attention on one chunk's views, in the block's dtype: the residual stream after attention takes the
    place of the block's input x, which no later stage reads."""
    dtype = block_dtype(block)
    x_work = x.to(dtype)
    block.add_attention(x_work, attended.to(dtype), out=x_work)
    if x_work is not x:
        x.copy_(x_work)


def clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done: CUDA time is charged to the step that queued it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def quantize_block(block: Block, prefix: str, hidden, rope, settings: QuantizeSettings, bar, timings: BlockReport,
                   fp_hidden=None) -> dict:
    """Quantize one block in place (its linears get their dequantized weights); `hidden` becomes its output.

    Returns the block's tensors to save; its layer reports, results and the time of each step go into `timings`.
    The layout's groups are quantized in order, each from the Hessian of its inputs given by Block.stage with the groups
    before it already quantized: `hidden` carries the stages (the block's input, then the residual stream after
    attention), and a scratch of its size carries the attention's output from stage 1 to Block.RESIDUAL.
    With `fp_hidden` (the full-precision model's input to this block, which becomes its output), a copy of the block
    keeping its own weights runs the same stages beside it, for asymmetric calibration; as its weights never change,
    it adds attention chunk by chunk at once and gives its output with the last group's inputs (its MLP's hidden
    activations are at hand then).
    """
    layout, quant, mse = block.layout, settings.quant_config(), settings.mse
    # The norms (and qwen3's q/k norms) are written unquantized; input scaling replaces the block norms' entries.
    tensors = {prefix + n: to_fp16(block.get_parameter(n), prefix + n)
               for n in (f"{norm}.weight" for norm in layout.norms + layout.qk_norms)}
    device = block.get_parameter(f"{layout.norms[0]}.weight").device

    def quantize_group(paths, hessian: Optional[HessianAccumulator]):
        H = hessian.hessian if hessian is not None else None
        # alpha C in place: the accumulator is done with, and a scaled copy would be one more [K, K] at GPTQ's peak.
        if hessian is not None and hessian.cross is not None:
            hessian.cross.mul_(settings.asym_calibration)
        for i, path in enumerate(paths):
            bar.set_postfix_str(path)
            t0 = clock(device)
            name = prefix + path
            linear = block.get_submodule(path)
            w = linear.weight.float()
            if settings.method == "gptq":
                result = gptq_quantize(w, H, quant.bits, quant.group_size, quant.sym, quant.desc_act,
                                       quant.static_groups, quant.damp_percent, mse=mse, asym_cross=hessian.cross,
                                       free_cross=i == len(paths) - 1,  # the group's last layer frees C once used
                                       group_act_order=settings.group_act_order,
                                       refine_passes=settings.refine_passes, name=name)
                # The baseline every paper reports: plain round-to-nearest on the min/max grid.
                rtn_loss = rtn_quantize(w, quant.bits, quant.group_size, quant.sym, mse=False, hessian=H).loss
            else:
                result, rtn_loss = rtn_quantize(w, quant.bits, quant.group_size, quant.sym, mse=mse, name=name), None
            tensors.update(export_linear(name, result, linear.bias, quant, layout.bias_on_every_linear))
            set_dequantized(linear, tensors, name, quant, linear.weight.dtype)
            seconds = clock(device) - t0
            timings.gptq_s += seconds
            if timings.results is not None:
                timings.results[name] = result
            timings.layers.append(LayerReport(name, tuple(w.shape), hessian.nsamples if hessian else 0, result.loss,
                                              rtn_loss, result.damp, seconds))

    if settings.method == "rtn":
        quantize_group(layout.linears, None)
        return tensors

    parts = chunks(hidden.shape[0], hidden.shape[1])
    # Attention's output waits for the quantized c_proj in `scratch`, from stage 1 until add_attention at RESIDUAL;
    # from then on `hidden` holds the residual stream and, at the end, the block's output.
    scratch = None
    # The full-precision stream's block shares the weights until quantize_group replaces one (the copy keeps the
    # original). Its weights never change, so it adds attention at once, in one chunk's scratch.
    fp_block = copy.deepcopy(block, {id(p): p for p in block.parameters()}) if fp_hidden is not None else None
    fp_scratch = attention_scratch(block, fp_hidden[parts[0]]) if fp_hidden is not None else None
    for stage, group in enumerate(layout.groups):
        last = stage == len(layout.groups) - 1
        hessian = HessianAccumulator(block.get_submodule(group[0]).in_features, prefix + "+".join(group), device,
                                     asymmetric=fp_block is not None)
        if stage == Block.RESIDUAL - 1:
            scratch = attention_scratch(block, hidden)
        for s in parts:
            start = clock(device)
            if stage == Block.RESIDUAL:  # out is quantized: the residual stream takes the spent input's place
                add_attention(block, hidden[s], scratch[s])
            inputs = run_stage(block, stage, hidden[s], None if scratch is None else scratch[s], rope)
            fp_inputs = None
            if fp_block is not None:
                fp_attended = fp_scratch[:s.stop - s.start]
                fp_inputs = run_stage(fp_block, stage, fp_hidden[s], fp_attended, rope)
                if stage == Block.RESIDUAL - 1:
                    add_attention(fp_block, fp_hidden[s], fp_attended)
                if last:  # its output now, from the inputs at hand
                    fp_hidden[s] = run_stage(fp_block, stage + 1, fp_hidden[s], None, rope, fp_inputs)
            middle = clock(device)
            hessian.add_batch(inputs, fp_inputs)
            inputs = fp_inputs = None  # not beside the next chunk's, nor at GPTQ's peak
            timings.forward_s += middle - start
            timings.hessian_s += clock(device) - middle
        if stage == Block.RESIDUAL:
            scratch = None
        if fp_block is not None and stage == Block.RESIDUAL - 1:
            setattr(fp_block, layout.attention, None)  # spent: the full-precision stream has added attention
        if last:  # the full-precision stream has its output: free it before the last GPTQ
            fp_block = fp_scratch = fp_attended = None
        if settings.input_scaling and group in layout.norm_before:
            scale_inputs(block, group, layout.norm_before[group], hessian, quant, mse, tensors, prefix)
        quantize_group(group, hessian)
    # The fully quantized block's output is the next block's input.
    start = clock(device)
    for s in parts:
        hidden[s] = run_stage(block, len(layout.groups), hidden[s], None, rope)
    timings.forward_s += clock(device) - start
    return tensors


def scale_inputs(block: Block, group: tuple, norm_path: str, hessian: HessianAccumulator, quant: QuantConfig,
                 mse: bool, tensors: dict, prefix: str) -> None:
    """Multiply the group's weights by gptq.input_scales per input and divide the norm before them by the same, so
    the block computes what it did (up to the norm's fp16 rounding, which the block then uses as the output does)."""
    linears = [block.get_submodule(path) for path in group]
    scales = input_scales([linear.weight for linear in linears], hessian.hessian, quant.bits, quant.group_size,
                          quant.sym, mse)
    norm = block.get_submodule(norm_path)
    name = f"{prefix}{norm_path}.weight"
    tensors[name] = to_fp16(norm.weight.float() / scales, name)
    # New tensors, not in place: the full-precision stream's block shares the old ones.
    norm.weight = torch.nn.Parameter(tensors[name].to(norm.weight), requires_grad=False)
    for linear in linears:
        linear.weight = torch.nn.Parameter(linear.weight * scales.to(linear.weight), requires_grad=False)
    hessian.scale_inputs(scales)


@torch.inference_mode()
def run_block(block: Block, hidden: torch.Tensor, rope) -> None:
    """The output of an already quantized block, into `hidden`, by the same stages and roundings as quantize_block
    (a block whose weights stay runs chunk by chunk: one chunk's scratch)."""
    parts = chunks(hidden.shape[0], hidden.shape[1])
    scratch = attention_scratch(block, hidden[parts[0]])
    for s in parts:
        attended = scratch[:s.stop - s.start]
        run_stage(block, 1, hidden[s], attended, rope)
        add_attention(block, hidden[s], attended)
        hidden[s] = run_stage(block, len(block.layout.groups), hidden[s], None, rope)


def export_linear(name: str, result, bias: Optional[torch.Tensor], quant: QuantConfig,
                  zero_bias: bool) -> dict:
    """The published tensors of one linear: its bias if it has one, else zeros when zero_bias (the layout's
    bias_on_every_linear) and nothing otherwise."""
    tensors = {
        f"{name}.qweight": pack_qweight(result.codes.t().contiguous(), quant.bits),
        f"{name}.qzeros": pack_qzeros(result.zeros, quant.bits, quant.checkpoint_format),
        f"{name}.scales": to_fp16(result.scales, f"{name}.scales"),
        f"{name}.g_idx": result.g_idx.to(torch.int32),
    }
    if bias is not None:
        tensors[f"{name}.bias"] = to_fp16(bias, f"{name}.bias").cpu()
    elif zero_bias:
        tensors[f"{name}.bias"] = torch.zeros(result.codes.shape[0], dtype=torch.float16)
    return tensors


def to_fp16(tensor: torch.Tensor, name: str, in_place: bool = False) -> torch.Tensor:
    """tensor as the output stores it, in fp16; a value that is not finite there is an error naming the tensor.

    Converted a slice at a time. in_place: the caller gives the tensor up, and a 16-bit one (bf16) is converted
    within its own memory: the embedding and the lm_head are then held once, not twice."""
    tensor = tensor.detach()
    if tensor.dtype == torch.float16:
        out = tensor
    elif in_place and tensor.element_size() == 2 and tensor.is_contiguous():
        out = tensor.view(torch.float16)
    else:
        out = torch.empty(tensor.shape, dtype=torch.float16, device=tensor.device)
    source, target = tensor.reshape(-1), out.view(-1)
    for i in range(0, source.numel(), SLICE_ELEMENTS):
        piece = source[i:i + SLICE_ELEMENTS]
        half = piece.to(torch.float16)
        if not all_finite(half):
            if not all_finite(piece):
                raise ValueError(f"tensor {name} contains NaN or inf")
            # The slices before this one fitted fp16 (and may be overwritten): the largest value is in the rest.
            raise ValueError(f"tensor {name} has values up to {float(source[i:].abs().max()):.4g}, beyond the range "
                             f"of fp16 (+-{FP16_MAX:.0f}) in which the output stores it")
        if out is not tensor:
            target[i:i + SLICE_ELEMENTS] = half
    return out


def read_fp16(reader: WeightReader, name: str) -> torch.Tensor:
    """A checkpoint tensor as the output stores it, converted within the memory it was read into where that memory
    is ours (WeightReader.reads_are_copies)."""
    return to_fp16(reader.get(name), name, in_place=reader.reads_are_copies)


def set_dequantized(linear: torch.nn.Linear, tensors: dict, name: str, quant: QuantConfig, dtype) -> None:
    """Put the exported weight back, decoded from the very tensors written, so a resumed run computes the same."""
    w = dequantize(*(tensors[f"{name}.{t}"] for t in GPTQ_PACKED), quant.bits,
                   quant.checkpoint_format)
    linear.weight = torch.nn.Parameter(w.to(device=linear.weight.device, dtype=dtype), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(tensors[f"{name}.bias"].to(linear.bias.device, dtype), requires_grad=False)


def exported_tensors(reader: WeightReader, config: QwenConfig, layout: Layout, work: WorkFolder):
    """Every tensor of the output in checkpoint order: fp16 embedding, blocks (norms, q/k norms, linears), final
    norm, fp16 lm_head unless it is tied and absent (unquantized_tensors)."""
    embedding, *after_blocks = unquantized_tensors(layout, reader)
    yield embedding, read_fp16(reader, embedding)
    for i in range(config.num_hidden_layers):
        saved = load_file(work.block_file(i))
        prefix = layout.block_prefix(i)
        for norm in layout.norms + layout.qk_norms:
            yield f"{prefix}{norm}.weight", saved[f"{prefix}{norm}.weight"]
        for path in layout.linears:
            for t in GPTQ_TENSORS:
                if f"{prefix}{path}.{t}" in saved:  # a bias only where export_linear wrote one
                    yield f"{prefix}{path}.{t}", saved[f"{prefix}{path}.{t}"]
    for name in after_blocks:
        yield name, read_fp16(reader, name)


def summary_table(report: QuantizeReport, worst: int = 8) -> str:
    """The worst layers by GPTQ/RTN error, then totals."""
    lines = []
    rows = [r for r in report.layers if r.loss is not None]
    if rows:
        rows.sort(key=lambda r: -(r.loss / r.rtn_loss if r.rtn_loss else 0))
        lines.append(f"{'layer':<36} {'tokens':>8} {'GPTQ loss':>11} {'RTN loss':>11} {'ratio':>6} {'damp':>6} {'s':>6}")
        for r in rows[:worst]:
            ratio = r.loss / r.rtn_loss if r.rtn_loss else float("nan")
            lines.append(f"{r.name:<36} {r.tokens:>8} {r.loss:>11.4g} {r.rtn_loss:>11.4g} {ratio:>6.3f} "
                         f"{r.damp:>6.3g} {r.seconds:>6.2f}")
        if len(rows) > worst:
            lines.append(f"... {len(rows) - worst} more layers (worst {worst} by GPTQ/RTN error shown)")
        mean_ratio = sum(r.loss / r.rtn_loss for r in rows if r.rtn_loss) / max(1, sum(1 for r in rows if r.rtn_loss))
        lines.append(f"mean GPTQ/RTN output-error ratio over {len(rows)} layers: {mean_ratio:.3f}")
    gib = 2**30
    lines.append(report.settings.description())
    lines.append(f"total time {report.seconds:.1f} s ({report.resumed_blocks} blocks resumed); peak RSS "
                 f"{report.peak_rss_bytes / gib:.2f} GiB" + (f", peak CUDA {report.peak_cuda_bytes / gib:.2f} GiB"
                                                              if report.peak_cuda_bytes else ""))
    lines.append(f"output {report.output} ({report.output_bytes / 1e9:.3f} GB of tensors)")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def model_card(report: QuantizeReport, source: Path) -> str:
    settings = report.settings
    q = settings.quant_config()
    return f"""# {report.output.name}

GPTQ {q.bits}-bit quantization of `{source.name}` {MODEL_CARD_MARK}, in the layout of Qwen's published
`*-Int{q.bits}` checkpoints (AutoGPTQ format `{q.checkpoint_format}`), readable by transformers + optimum/GPTQModel and vLLM
(see the notes below).

| setting | value |
|---|---|
| method | {settings.method} |
| bits | {q.bits} |
| group size | {q.group_size} |
| symmetric | {q.sym} |
| act-order (desc_act) | {q.desc_act} |
| static groups | {q.static_groups} |
| damp percent | {q.damp_percent} |
| group act-order | {settings.group_act_order} |
| asymmetric calibration (alpha) | {settings.asym_calibration} |
| clipped grid (mse) | {settings.mse} |
| input scaling | {settings.input_scaling} |
| refine passes | {settings.refine_passes} |
| true sequential | {q.true_sequential} |
| calibration | {settings.calibration_name()} ({settings.nsamples} x {settings.seqlen} tokens, seed {settings.seed}) |
| time | {report.seconds:.1f} s |

## Measured quality (output error of each linear on its calibration inputs)

```
{summary_table(report)}
```
"""
