"""Time and peak memory of qwen_quant.quantize (block-by-block GPTQ), each run in a fresh spawned process.

Jobs:
- stories260k_qwen (a real tiny Qwen): GPTQ and RTN, 4-bit g32, 128 x 128-token windows of its calib_ids.npy.
- a random bf16 checkpoint with real Qwen shapes (--shape 1.8B: hidden 2048, MLP 5504, 16 heads; 7B: hidden 4096,
  MLP 11008, 32 heads; 151936 vocab rows, untied lm_head) and only --layers blocks (default 2), GPTQ 4-bit g128 on
  --nsamples x --seqlen windows (default 128 x 512) of the WikiText-2 test text tokenized with the real Qwen
  tokenizer (copied into the temporary model folder), or of random ids (--calibration random); then RTN on it.
  The team's target at 1.8B shapes: <= 40 s per block and <= 1.5 GiB peak RSS (GPTQModel 7.6.0: 61 s, 3.45 GiB).

"s/block" is the wall time of one block: reading its weights, the calibration forwards and Hessians, GPTQ, the RTN
comparison, packing, and saving the finished block; "total" also holds reading/embedding the calibration data and
writing the output checkpoint. Peak RSS is the child process's high-water mark (torch and the script included),
"above start" the part above its RSS before the job; on CUDA also torch.cuda.max_memory_allocated.
--quick (CI: about 45 s on 2 idle cores, several minutes when other processes load them): stories GPTQ + RTN, and
1 block of the 1.8B shapes (32768 vocab rows, random ids) on 16 x 512 tokens.

    python benchmarks/bench_quantize.py [--quick] [--device cuda] [--shape 7B] [--layers N] [--nsamples N]
        [--seqlen N] [--calibration wikitext|random] [--mse on|off] [--asym-calibration ALPHA]
        [--group-act-order on|off] [--threads N] [--json results.json]
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from qwen_quant.config import REAL_VOCAB
from qwen_quant.quantize import quantize
from qwen_quant.settings import QuantizeSettings

from common import GIB, add_common_args, isolated, machine, machine_line, revision, \
    shared_data_dir, table, write_json

TARGET_S_PER_BLOCK, TARGET_PEAK_GIB = 40.0, 1.5  # at Qwen-1.8B shapes, 128 x 512 tokens, 4-bit g128, 2 cores
PEER = "GPTQModel 7.6.0: 61 s per block, 3.45 GiB peak RSS for 1.45 GB of bf16 weights (REFERENCE.md section 5)"


def make_checkpoint(folder: str, shape: str, layers: int, vocab: int) -> int:
    from qwen_quant.published import SIZES
    from qwen_quant.synthetic import save_random_checkpoint

    config = SIZES[shape].config()
    config.num_hidden_layers, config.vocab_size = layers, vocab
    save_random_checkpoint(folder, config, torch.bfloat16, seed=0)
    return checkpoint_bytes(folder)


def checkpoint_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def quantize_job(model_dir: str, out_dir: str, settings: dict, threads: int = None) -> dict:
    """quantize() with the timings it reports per block (QuantizeReport.blocks) and the peak RSS after each block."""
    if threads:
        torch.set_num_threads(threads)
    report = quantize(model_dir, out_dir, progress=False, overwrite=True, **settings)
    blocks = [{"load_s": b.read_s, "forward_s": b.forward_s, "hessian_s": b.hessian_s, "gptq_s": b.gptq_s,
               "save_s": b.write_s, "total_s": b.seconds, "cpu_s": b.cpu_s, "peak_rss_after": b.peak_rss_bytes}
              for b in report.blocks]
    ratios = [r.loss / r.rtn_loss for r in report.layers if r.loss is not None and r.rtn_loss]
    return {"seconds": report.seconds, "blocks": blocks, "embed_s": report.calibration_s, "export_s": report.export_s,
            "peak_rss_bytes": report.peak_rss_bytes, "peak_cuda_bytes": report.peak_cuda_bytes,
            "output_bytes": report.output_bytes, "min_tokens": min((r.tokens for r in report.layers), default=0),
            "gptq_rtn_ratio": sum(ratios) / len(ratios) if ratios else None,
            "layers": [{"name": r.name, "shape": list(r.shape), "tokens": r.tokens, "loss": r.loss,
                        "rtn_loss": r.rtn_loss, "seconds": r.seconds} for r in report.layers]}


def run(label: str, model_dir, out_dir, weights: int, settings: dict, threads: int = None) -> dict:
    print(f"running {label} ...", flush=True)
    child = isolated(quantize_job, str(model_dir), str(out_dir), settings, threads)
    r = child["result"]
    shutil.rmtree(out_dir, ignore_errors=True)
    blocks = r["blocks"]
    row = {"job": label, "method": settings["method"], "bits": settings["bits"], "group_size": settings["group_size"],
           "nsamples": settings.get("nsamples"), "seqlen": settings.get("seqlen"), "blocks": len(blocks),
           "total_s": r["seconds"], "cpu_s": child["cpu_seconds"],
           "s_per_block": sum(b["total_s"] for b in blocks) / len(blocks),
           "cpu_s_per_block": sum(b["cpu_s"] for b in blocks) / len(blocks),
           "max_s_per_block": max(b["total_s"] for b in blocks), "embed_s": r["embed_s"], "export_s": r["export_s"],
           **{f"{step}_s_per_block": sum(b[f"{step}_s"] for b in blocks) / len(blocks)
              for step in ("forward", "hessian", "gptq")},
           "peak_rss_bytes": child["peak_rss_bytes"], "peak_rss_gib": child["peak_rss_bytes"] / GIB,
           "baseline_rss_bytes": child["baseline_rss_bytes"],
           "above_start_gib": child["peak_rss_above_baseline_bytes"] / GIB,
           "peak_cuda_gib": child["peak_cuda_bytes"] / GIB if child["peak_cuda_bytes"] else None,
           "weights_bytes": weights, "weights_gb": weights / 1e9, "peak_per_weights": child["peak_rss_bytes"] / weights,
           "gptq_rtn_ratio": r["gptq_rtn_ratio"], "min_tokens": r["min_tokens"], "detail": r}
    print(f"  {row['total_s']:.1f} s total, {row['s_per_block']:.2f} s/block, peak RSS {row['peak_rss_gib']:.2f} GiB",
          flush=True)
    return row


def calibration_source(kind: str, model_dir: Path, data: Path, tmp: Path, vocab: int):
    if kind == "wikitext":
        shutil.copyfile(data / "qwen_tiktoken" / "qwen.tiktoken", model_dir / "qwen.tiktoken")  # temp folder only
        return str(data / "wikitext2" / "raw_test_hf_joined" / "wikitext-test.txt")
    ids = tmp / "random_ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, min(vocab, REAL_VOCAB), size=2**20, dtype=np.int64))
    return str(ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shape", choices=("1.8B", "7B"), default="1.8B", help="shapes of the random model's blocks")
    parser.add_argument("--layers", type=int, help="blocks of the random model (default 2, --quick 1)")
    parser.add_argument("--nsamples", type=int,
                        help="calibration windows of the random model (default 128, --quick 16)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--vocab", type=int, help="embedding and lm_head rows of the random model (default 151936, "
                        "--quick 32768: only the embedding, the export and the weights' size depend on it)")
    parser.add_argument("--calibration", choices=("wikitext", "random"),
                        help="default wikitext; random when --vocab is below the tokenizer's 151851 ids")
    parser.add_argument("--mse", choices=("on", "off"), help="quantize()'s clipping search (default: its default)")
    parser.add_argument("--asym-calibration", type=float, metavar="ALPHA",
                        help="quantize()'s asymmetric calibration (default: its default; 0: off, the cost before it)")
    parser.add_argument("--group-act-order", choices=("on", "off"),
                        help="quantize()'s group act-order (default: its default)")
    parser.add_argument("--refine-passes", type=int, metavar="N",
                        help="quantize()'s refine passes (default: its default)")
    parser.add_argument("--threads", type=int, help="torch threads of the quantizing process (default: torch's)")
    parser.add_argument("--skip-stories", action="store_true")
    parser.add_argument("--skip-rtn", action="store_true", help="no RTN run on the random model")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    layers = args.layers or (1 if args.quick else 2)
    nsamples = args.nsamples or (16 if args.quick else 128)
    vocab = args.vocab or (32768 if args.quick else 151936)
    extra = {} if args.mse is None else {"mse": args.mse == "on"}
    if args.asym_calibration is not None:
        extra["asym_calibration"] = args.asym_calibration
    if args.group_act_order is not None:
        extra["group_act_order"] = args.group_act_order == "on"
    if args.refine_passes is not None:
        extra["refine_passes"] = args.refine_passes
    mse = QuantizeSettings(**extra).mse  # the default where --mse is not given
    calibration_kind = args.calibration or ("wikitext" if vocab >= REAL_VOCAB else "random")
    if calibration_kind == "wikitext" and vocab < REAL_VOCAB:
        raise SystemExit(f"--calibration wikitext needs --vocab >= {REAL_VOCAB} (the tokenizer's ids)")
    data = shared_data_dir()
    info = machine()
    print(machine_line(info))

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quantize_") as tmp:
        tmp = Path(tmp)
        if not args.skip_stories:
            stories = data / "stories260k_qwen"
            weights = checkpoint_bytes(stories)
            for method in ("gptq", "rtn"):
                settings = dict(bits=4, group_size=32, method=method, device=args.device, nsamples=128, seqlen=128,
                                calibration=str(stories / "calib_ids.npy"), **extra)
                rows.append(run(f"stories260k {method.upper()} 4-bit g32", stories, tmp / "out", weights, settings,
                                args.threads))

        model_dir = tmp / f"qwen_{args.shape}_{layers}"
        print(f"writing a random Qwen-{args.shape}-shaped checkpoint, {layers} blocks, {vocab} vocab rows, bf16 ...",
              flush=True)
        weights = isolated(make_checkpoint, str(model_dir), args.shape, layers, vocab)["result"]
        calibration = calibration_source(calibration_kind, model_dir, data, tmp, vocab)
        for method in ("gptq",) + (() if args.skip_rtn or args.quick else ("rtn",)):
            settings = dict(bits=4, group_size=128, method=method, device=args.device, nsamples=nsamples,
                            seqlen=args.seqlen, calibration=calibration, **extra)
            rows.append(run(f"Qwen-{args.shape} shapes x{layers} {method.upper()} 4-bit g128", model_dir, tmp / "out",
                            weights, settings, args.threads))

    print()
    print(machine_line(info))
    print(f"qwen_quant {revision()}, mse (clipping search) {'on' if mse else 'off'}; random model: Qwen-{args.shape} "
          f"shapes, {layers} block(s), {vocab} vocab rows, bf16; calibration {nsamples} x {args.seqlen} tokens "
          f"({calibration_kind}); device {args.device}" + (f"; {args.threads} torch thread(s)" if args.threads else "")
          + "".join(f"; {key} {value}" for key, value in extra.items() if key != "mse"))
    columns = [("job", "job", ""), ("nsamples", "samples", "d"), ("seqlen", "seqlen", "d"), ("blocks", "blocks", "d"),
               ("total_s", "total s", ".1f"), ("s_per_block", "s/block", ".2f"),
               ("cpu_s_per_block", "cpu s/block", ".2f"), ("forward_s_per_block", "forward", ".1f"),
               ("hessian_s_per_block", "Hessian", ".1f"), ("gptq_s_per_block", "GPTQ", ".1f"),
               ("embed_s", "calib s", ".1f"),
               ("export_s", "export s", ".1f"), ("peak_rss_gib", "peak RSS GiB", ".2f"),
               ("above_start_gib", "above start GiB", ".2f"), ("weights_gb", "weights GB", ".3f"),
               ("peak_per_weights", "peak/weights", ".2f"), ("gptq_rtn_ratio", "GPTQ/RTN err", ".3f")]
    if args.device.startswith("cuda"):
        columns.insert(12, ("peak_cuda_gib", "peak CUDA GiB", ".2f"))
    print(table(rows, columns))
    print("s/block: mean wall time of a block (read + calibrate + quantize + pack + save); cpu s/block: its CPU time "
          f"(all {args.threads or torch.get_num_threads()} threads); forward, Hessian, GPTQ: its s in the block's stages, "
          "the Hessian accumulation and the quantization of its linears (RTN comparison and packing included); "
          "calib s: reading, tokenizing and embedding the "
          "calibration windows; "
          "export s: writing the output checkpoint")
    for row in rows:
        if row["job"].startswith("Qwen-1.8B") and row["method"] == "gptq" and args.device == "cpu":
            if (row["nsamples"], row["seqlen"]) != (128, 512):
                print(f"(the target of {TARGET_S_PER_BLOCK:g} s/block and {TARGET_PEAK_GIB:g} GiB is set for 128 x 512 "
                      f"tokens: not judged on {row['nsamples']} x {row['seqlen']})")
                continue
            ok = row["s_per_block"] <= TARGET_S_PER_BLOCK and row["peak_rss_gib"] <= TARGET_PEAK_GIB
            verdict = "MEETS" if ok else "MISSES"
            print(f"{verdict} the target ({TARGET_S_PER_BLOCK:g} s/block, {TARGET_PEAK_GIB:g} GiB): "
                  f"{row['s_per_block']:.1f} s/block, {row['peak_rss_gib']:.2f} GiB "
                  f"({row['nsamples']} x {row['seqlen']} tokens, {row['blocks']} block(s)); peer: {PEER}")
    write_json(args.json, {"benchmark": "bench_quantize", "machine": info, "revision": revision(), "quick": args.quick,
                           "device": args.device, "shape": args.shape, "layers": layers, "vocab": vocab, "mse": mse,
                           "options": extra, "calibration": calibration_kind,
                           "threads": args.threads or torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
