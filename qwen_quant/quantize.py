"""Block-by-block GPTQ of a Qwen checkpoint, written in the layout of Qwen's published Int4 / Int8 models.

Only one decoder block's weights are ever materialised: the others stay in the memory-mapped safetensors. Each block
is quantized true-sequentially in Qwen's groups [c_attn], [c_proj], [w1, w2], [mlp.c_proj]: every group's Hessian is
collected from the outputs of the already-quantized groups before it, then the quantized block produces the next
block's inputs. Finished blocks are saved in a work folder beside the output, so a killed run resumes at the next
block; the output folder appears, by one rename, only when the checkpoint is complete.
"""
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import QUANTIZED_LINEARS, WeightReader, copy_side_files, fill_module, resolve_model_path, write_shards
from .config import QuantConfig, QwenConfig
from .gptq import HessianAccumulator, gptq_quantize, rtn_quantize
from .model import Block, make_rope, ntk_alpha
from .packing import check_bits, dequantize, pack_qweight, pack_qzeros, values_per_period
from .plan import check_plan, plan_quantization, plan_totals, return_freed_tensors_to_os
from .published import find_published

log = logging.getLogger("qwen_quant")
TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
METHODS = ("gptq", "rtn")


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
class QuantizeReport:
    output: Path
    quant: QuantConfig
    method: str
    layers: list = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_cuda_bytes: int = 0
    output_bytes: int = 0
    resumed_blocks: int = 0
    calibration: str = ""


def default_output_name(model_path, folder: Path, bits: int) -> str:
    """Qwen's naming: Qwen-14B-Chat -> Qwen-14B-Chat-Int4 (the Hub folder name for a published model)."""
    published = find_published(str(model_path))
    base = published.repo_id.split("/")[1] if published else folder.name
    return f"{base}-Int{bits}"


def check_settings(config: QwenConfig, bits: int, group_size: int, method: str) -> None:
    check_bits(bits)
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group size {group_size} must be positive or -1 (per channel)")
    for name, k in (("attn.c_attn", config.hidden_size), ("attn.c_proj", config.hidden_size),
                    ("mlp.w1", config.hidden_size), ("mlp.w2", config.hidden_size), ("mlp.c_proj", config.ffn_size)):
        if group_size > 0 and k % group_size:
            raise ValueError(f"group size {group_size} does not divide the {k} inputs of {name}; "
                             f"choose a divisor of {k} or -1")
        if k % values_per_period(bits)[0]:
            raise ValueError(f"{name} has {k} inputs: {bits}-bit packing needs a multiple of {values_per_period(bits)[0]}")


def quantize(model_path, output_dir=None, bits: int = 4, group_size: int = 128, desc_act: bool = False,
             sym: bool = True, damp_percent: float = 0.01, static_groups: bool = False, calibration="c4",
             nsamples: int = 128, seqlen: int = 2048, seed: int = 0, device=None, method: str = "gptq",
             resume: bool = False, overwrite: bool = False, max_shard_bytes: int = 4 * 10**9,
             mse: bool = True, progress: bool = True) -> QuantizeReport:
    """Quantize the checkpoint at model_path (a folder or a published name) and write it to output_dir."""
    start = time.time()
    folder = resolve_model_path(model_path)
    config = QwenConfig.from_file(folder)
    if config.quantization_config is not None:
        raise ValueError(f"{folder} is already quantized ({config.quantization_config.bits}-bit)")
    check_settings(config, bits, group_size, method)
    # Qwen's files are v1 ("gptq"), which stores zero - 1 and so cannot hold the zero point 0 of an asymmetric grid.
    quant = QuantConfig(bits=bits, group_size=group_size, damp_percent=damp_percent, desc_act=desc_act,
                        static_groups=static_groups, sym=sym, checkpoint_format="gptq" if sym else "gptq_v2")
    output = Path(output_dir) if output_dir else Path(default_output_name(model_path, folder, bits))
    work = output.with_name(output.name + ".partial")
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"output folder {output} already exists: pass --overwrite to replace it")
    if work.exists() and not resume:
        shutil.rmtree(work)
    (work / "blocks").mkdir(parents=True, exist_ok=True)
    settings = {"quant": asdict(quant), "method": method, "calibration": str(calibration), "nsamples": nsamples,
                "seqlen": seqlen, "seed": seed, "mse": mse, "model": str(folder.resolve())}
    settings_file = work / "settings.json"
    if resume and settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(f"--resume: {work} was started with other settings ({settings_file}); "
                         "run without --resume to start over")
    settings_file.write_text(json.dumps(settings, indent=2))

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = config.dtype if not (device.type == "cpu" and config.dtype == torch.float16) else torch.float32
    plan = plan_quantization(config, bits, group_size, nsamples, seqlen, device.type, dtype, method,
                             tokenizer=(folder / "qwen.tiktoken").is_file(), max_shard_bytes=max_shard_bytes)
    check_plan(plan, output, device, reusable_bytes=sum(f.stat().st_size for f in (work / "blocks").iterdir()))
    log.info(plan_totals(plan))
    return_freed_tensors_to_os()
    reader = WeightReader(folder)
    report = QuantizeReport(output=output, quant=quant, method=method, calibration=str(calibration))

    hidden = rope = None
    if method == "gptq":
        hidden = embed_calibration(folder, reader, config, calibration, nsamples, seqlen, seed, dtype, device)
        rope = make_rope(config, torch.arange(seqlen, device=device), ntk_alpha(seqlen, config.seq_length)
                         if config.use_dynamic_ntk else 1.0)
    bar = tqdm(range(config.num_hidden_layers), desc="quantizing", unit="block", disable=not progress)
    for i in bar:
        prefix = f"transformer.h.{i}."
        block_file = work / "blocks" / f"block_{i:05d}.safetensors"
        with torch.device("meta"):
            block = Block(config)
        fill_module(block, reader, prefix, dtype, device)
        if block_file.is_file():  # done before the run was killed: reuse its tensors, recompute its outputs
            saved = load_file(block_file)
            report.layers += [LayerReport(**r) for r in json.loads((block_file.with_suffix(".json")).read_text())]
            report.resumed_blocks += 1
            for path in QUANTIZED_LINEARS:
                set_dequantized(block.get_submodule(path), saved, prefix + path, quant, dtype)
            if hidden is not None:
                run_block(block, hidden, rope)
        else:
            tensors, layers = quantize_block(block, prefix, hidden, rope, quant, method, mse, bar)
            write_atomic(lambda p: save_file(tensors, str(p)), block_file)
            write_atomic(lambda p: p.write_text(json.dumps([asdict(r) for r in layers])), block_file.with_suffix(".json"))
            report.layers += layers
        del block
    bar.close()
    hidden = None  # the calibration activations are done with: free them before the export reads the big tensors

    out = work / "checkpoint"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    report.output_bytes = write_shards(exported_tensors(reader, config, work), out, max_shard_bytes)
    out_config = QwenConfig.from_dict(config.to_dict())
    out_config.torch_dtype = "float16"
    out_config.extra.update(bf16=False, fp16=True, fp32=False)
    out_config.quantization_config = quant
    out_config.save(out)
    (out / "quantize_config.json").write_text(json.dumps(quant.to_dict(), indent=2) + "\n")
    copy_side_files(folder, out)
    report.seconds = time.time() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        report.peak_cuda_bytes = torch.cuda.max_memory_allocated(device)
    (out / "README.md").write_text(model_card(report, folder, settings), encoding="utf-8")
    if output.exists():  # --overwrite: the old folder goes only once the new one is complete
        shutil.rmtree(output)
    os.replace(out, output)
    shutil.rmtree(work)
    return report


def embed_calibration(folder, reader, config, calibration, nsamples, seqlen, seed, dtype, device) -> torch.Tensor:
    """Calibration windows -> embeddings [nsamples, seqlen, hidden] in the compute dtype."""
    from .calibration import get_calibration_data
    from .tokenizer import QwenTokenizer

    if seqlen > config.max_position_embeddings:
        raise ValueError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {config.max_position_embeddings}")
    tokenizer = QwenTokenizer.from_pretrained(folder) if (Path(folder) / "qwen.tiktoken").is_file() else None
    tokens = get_calibration_data(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
    if int(tokens.max()) >= config.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"calibration token ids span [{int(tokens.min())}, {int(tokens.max())}], outside the "
                         f"model's vocabulary of {config.vocab_size}")
    wte = reader.get("transformer.wte.weight")
    hidden = torch.nn.functional.embedding(tokens, wte).to(device=device, dtype=dtype)
    if not torch.isfinite(hidden).all():
        raise ValueError("calibration embeddings contain NaN or inf (transformer.wte.weight is not finite)")
    return hidden


CHUNK_TOKENS = 8192  # rows per forward step: bounds the temporary memory of a stage


def chunks(n_samples: int, seqlen: int):
    step = max(1, CHUNK_TOKENS // seqlen)
    return [slice(s, min(s + step, n_samples)) for s in range(0, n_samples, step)]


@torch.inference_mode()
def quantize_block(block: Block, prefix: str, hidden, rope, quant: QuantConfig, method: str, mse: bool, bar):
    """Quantize one block in place (its linears get their dequantized weights); `hidden` becomes its output."""
    tensors = {prefix + "ln_1.weight": block.ln_1.weight.half(), prefix + "ln_2.weight": block.ln_2.weight.half()}
    layers = []
    attn, mlp = block.attn, block.mlp

    def quantize_group(paths, hessian: Optional[HessianAccumulator]):
        for path in paths:
            bar.set_postfix_str(path)
            t0 = time.time()
            name = prefix + path
            linear = block.get_submodule(path)
            w = linear.weight.float()
            if method == "gptq":
                H = hessian.hessian
                result = gptq_quantize(w, H, quant.bits, quant.group_size, quant.sym, quant.desc_act,
                                       quant.static_groups, quant.damp_percent, mse=mse, name=name)
                # The baseline every paper reports: plain round-to-nearest on the min/max grid.
                rtn_loss = rtn_quantize(w, quant.bits, quant.group_size, quant.sym, mse=False, hessian=H).loss
            else:
                result, rtn_loss = rtn_quantize(w, quant.bits, quant.group_size, quant.sym, mse=mse, name=name), None
            tensors.update(export_linear(name, result, linear.bias, quant))
            set_dequantized(linear, tensors, name, quant, linear.weight.dtype)
            layers.append(LayerReport(name, tuple(w.shape), hessian.nsamples if hessian else 0, result.loss,
                                      rtn_loss, result.damp, time.time() - t0))

    if method == "rtn":
        quantize_group(QUANTIZED_LINEARS, None)
        return tensors, layers

    h, ff = attn.c_proj.in_features, mlp.c_proj.in_features
    parts = chunks(hidden.shape[0], hidden.shape[1])
    # Stage 1: c_attn sees ln_1(x).
    acc = HessianAccumulator(h, prefix + "attn.c_attn", hidden.device)
    for s in parts:
        acc.add_batch(block.ln_1(hidden[s]))
    quantize_group(["attn.c_attn"], acc)
    # Stage 2: c_proj sees the attention output computed with the quantized c_attn.
    mixed = torch.empty_like(hidden)
    acc = HessianAccumulator(h, prefix + "attn.c_proj", hidden.device)
    for s in parts:
        mixed[s] = attn.mix(attn.c_attn(block.ln_1(hidden[s])), rope)
        acc.add_batch(mixed[s])
    quantize_group(["attn.c_proj"], acc)
    # Stage 3: w1 and w2 share their input ln_2(x + c_proj(...)); `mixed` now holds the residual stream.
    acc = HessianAccumulator(h, prefix + "mlp.w1+w2", hidden.device)
    for s in parts:
        mixed[s] = hidden[s] + attn.c_proj(mixed[s])
        acc.add_batch(block.ln_2(mixed[s]))
    quantize_group(["mlp.w1", "mlp.w2"], acc)
    # Stage 4: mlp.c_proj sees up * silu(gate) from the quantized w1, w2.
    acc = HessianAccumulator(ff, prefix + "mlp.c_proj", hidden.device)
    for s in parts:
        acc.add_batch(mlp.hidden(block.ln_2(mixed[s])))
    quantize_group(["mlp.c_proj"], acc)
    # The fully quantized block's output is the next block's input.
    for s in parts:
        hidden[s] = mixed[s] + mlp(block.ln_2(mixed[s]))
    return tensors, layers


@torch.inference_mode()
def run_block(block: Block, hidden: torch.Tensor, rope) -> None:
    for s in chunks(hidden.shape[0], hidden.shape[1]):
        hidden[s] = block(hidden[s], rope)


def export_linear(name: str, result, bias: Optional[torch.Tensor], quant: QuantConfig) -> dict:
    """The published tensors of one linear; every linear carries a bias (zeros where the model has none)."""
    n = result.codes.shape[0]
    return {
        f"{name}.qweight": pack_qweight(result.codes.t().contiguous(), quant.bits),
        f"{name}.qzeros": pack_qzeros(result.zeros, quant.bits, quant.checkpoint_format),
        f"{name}.scales": result.scales.to(torch.float16),
        f"{name}.g_idx": result.g_idx.to(torch.int32),
        f"{name}.bias": (bias.detach().to(torch.float16).cpu() if bias is not None
                         else torch.zeros(n, dtype=torch.float16)),
    }


def set_dequantized(linear: torch.nn.Linear, tensors: dict, name: str, quant: QuantConfig, dtype) -> None:
    """Put the exported weight back, decoded from the very tensors written, so a resumed run computes the same."""
    w = dequantize(*(tensors[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx")), quant.bits,
                   quant.checkpoint_format)
    linear.weight = torch.nn.Parameter(w.to(device=linear.weight.device, dtype=dtype), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(tensors[f"{name}.bias"].to(linear.bias.device, dtype), requires_grad=False)


def exported_tensors(reader: WeightReader, config: QwenConfig, work: Path):
    """Every tensor of the output in checkpoint order: fp16 embedding, blocks, final norm, fp16 lm_head."""
    yield "transformer.wte.weight", reader.get("transformer.wte.weight").to(torch.float16)
    for i in range(config.num_hidden_layers):
        saved = load_file(work / "blocks" / f"block_{i:05d}.safetensors")
        prefix = f"transformer.h.{i}."
        yield prefix + "ln_1.weight", saved[prefix + "ln_1.weight"]
        yield prefix + "ln_2.weight", saved[prefix + "ln_2.weight"]
        for path in QUANTIZED_LINEARS:
            for t in TENSORS:
                yield f"{prefix}{path}.{t}", saved[f"{prefix}{path}.{t}"]
    yield "transformer.ln_f.weight", reader.get("transformer.ln_f.weight").to(torch.float16)
    yield "lm_head.weight", reader.get("lm_head.weight").to(torch.float16)


def write_atomic(write, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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
    lines.append(f"method {report.method}, {report.quant.bits}-bit, group {report.quant.group_size}, "
                 f"{'sym' if report.quant.sym else 'asym'}{', desc_act' if report.quant.desc_act else ''}")
    lines.append(f"total time {report.seconds:.1f} s ({report.resumed_blocks} blocks resumed); peak RSS "
                 f"{report.peak_rss_bytes / gib:.2f} GiB" + (f", peak CUDA {report.peak_cuda_bytes / gib:.2f} GiB"
                                                              if report.peak_cuda_bytes else ""))
    lines.append(f"output {report.output} ({report.output_bytes / 1e9:.3f} GB of tensors)")
    return "\n".join(lines)


def model_card(report: QuantizeReport, source: Path, settings: dict) -> str:
    q = report.quant
    return f"""# {report.output.name}

GPTQ {q.bits}-bit quantization of `{source.name}` made with qwen_quant, in the layout of Qwen's published
`*-Int{q.bits}` checkpoints (AutoGPTQ format `{q.checkpoint_format}`), readable by transformers + optimum/GPTQModel and vLLM.

| setting | value |
|---|---|
| method | {report.method} |
| bits | {q.bits} |
| group size | {q.group_size} |
| symmetric | {q.sym} |
| act-order (desc_act) | {q.desc_act} |
| static groups | {q.static_groups} |
| damp percent | {q.damp_percent} |
| true sequential | {q.true_sequential} |
| calibration | {settings['calibration']} ({settings['nsamples']} x {settings['seqlen']} tokens, seed {settings['seed']}) |
| time | {report.seconds:.1f} s |

## Measured quality (output error of each linear on its calibration inputs)

```
{summary_table(report)}
```
"""
