"""Quality ablation of the quantizer's options on both real models: the share of RTN's perplexity increase each
option (and each combination kept) leaves, and its quantization time.

    python benchmarks/bench_ablation.py --model stories|smollm2 [--settings 4:32,3:32] [--options default,...]
        [--nsamples N] [--json PATH]

stories: stories260k_qwen, calibration 128 x 128 tokens of calib_ids.npy, eval_ids.npy in 256-token windows.
smollm2: SmolLM2-135M-Instruct in the Qwen layout, calibration --nsamples (128) x 512 tokens of
calib_wikitext2_valid_ids.npy (seed 0), perplexity on the first 12 windows of 2048 of eval_wikitext2_test_ids.npy.
Settings are bits:group (symmetric); RTN is the plain min/max grid with the same groups; share = (option - fp) /
(RTN - fp). Quantized weights are dequantized into the fp32 model.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import add_common_args, machine, machine_line, shared_data_dir, smollm2_dir, table, write_json
from qwen_quant import QwenForCausalLM
from qwen_quant.evaluate import perplexity
from qwen_quant.model import load_dequantized
from qwen_quant.quantize import quantize

# Each option is a set of quantize() arguments on top of GPTQ's defaults.
OPTIONS = {
    "textbook": dict(mse=False, group_act_order=False),  # GPTQ as published: min/max grid, columns in order
    "clipped": dict(group_act_order=False),  # + the clipped (MSE) grid: the default before group act-order
    "default": dict(),  # + group act-order (on by default where a group size is set)
    "no-mse": dict(mse=False),  # the defaults with the plain min/max grid
    "act-order": dict(desc_act=True, static_groups=True),  # column act-order with static groups, instead
    "desc-act": dict(desc_act=True),  # column act-order as published (g_idx in the order of the inputs), instead
    "damp0.05": dict(damp_percent=0.05),
    "asym0.25": dict(asym_calibration=0.25),
    "asym0.5": dict(asym_calibration=0.5),
    "asym1": dict(asym_calibration=1.0),
    # The defaults without the full-precision stream (its forward and cross terms are most of their cost).
    "asym0": dict(asym_calibration=0),
    "asym0-in-order": dict(asym_calibration=0, group_act_order=False),
    "asym0+scaling": dict(asym_calibration=0, input_scaling=True),
    "asym0-in-order+scaling": dict(asym_calibration=0, group_act_order=False, input_scaling=True),
    "scaling": dict(input_scaling=True),
    "scaling+asym0.5": dict(input_scaling=True, asym_calibration=0.5),
    "refine0": dict(refine_passes=0),
    "refine1": dict(refine_passes=1),
    "refine3": dict(refine_passes=3),
}
MODELS = {
    # name: (calibration file, calibration seqlen, default nsamples, eval file, eval seqlen, default settings)
    "stories": ("stories260k_qwen/calib_ids.npy", 128, 128, "stories260k_qwen/eval_ids.npy", 256, "4:32,3:32"),
    "smollm2": ("smollm2_135m/calib_wikitext2_valid_ids.npy", 512, 128,
                "smollm2_135m/eval_wikitext2_test_ids.npy", 2048, "4:128,4:64,3:128"),
}
EVAL_WINDOWS = 12  # smollm2: the first 12 windows of 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", choices=sorted(MODELS), default="stories")
    parser.add_argument("--settings", default=None, help="bits:group,... (default: the model's ablation settings)")
    parser.add_argument("--options", default="textbook,clipped,default,asym0.5", help=",".join(OPTIONS))
    parser.add_argument("--nsamples", type=int, default=None)
    args = parser.parse_args()
    print(machine_line(machine()), flush=True)
    data = shared_data_dir()
    calib, calib_len, nsamples, eval_file, eval_len, settings = MODELS[args.model]
    model = smollm2_dir(data) if args.model == "smollm2" else data / "stories260k_qwen"
    ids = torch.from_numpy(np.load(data / eval_file).astype(np.int64))
    if args.model == "smollm2":
        ids = ids[:EVAL_WINDOWS * eval_len]

    def ppl(m) -> float:
        return perplexity(m, ids, seqlen=eval_len, batch_size=64 if eval_len <= 256 else 1, progress=False).perplexity

    fp = ppl(QwenForCausalLM.from_pretrained(model))
    print(f"{args.model}: full precision {fp:.4f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in (args.settings or settings).split(","):
            bits, group = (int(v) for v in setting.split(":"))
            quantize(model, Path(tmp) / "rtn", bits=bits, group_size=group, method="rtn", mse=False, progress=False,
                     overwrite=True)
            rtn = ppl(load_dequantized(Path(tmp) / "rtn"))
            print(f"  {bits}-bit g{group} RTN {rtn:.4f}", flush=True)
            for option in args.options.split(","):
                start = time.perf_counter()
                quantize(model, Path(tmp) / "q", bits=bits, group_size=group, calibration=str(data / calib),
                         nsamples=args.nsamples or nsamples, seqlen=calib_len, seed=0, progress=False,
                         overwrite=True, **OPTIONS[option])
                seconds = time.perf_counter() - start
                value = ppl(load_dequantized(Path(tmp) / "q"))
                rows.append(dict(bits=bits, group=group, option=option, rtn=rtn, ppl=value,
                                 share=(value - fp) / (rtn - fp), seconds=seconds))
                print(f"  {bits}-bit g{group} {option}: {value:.4f} share {rows[-1]['share']:.3f} "
                      f"({seconds:.0f} s)", flush=True)
    print(table(rows, [("bits", "bits", "d"), ("group", "group", "d"), ("option", "option", ""),
                       ("rtn", "RTN ppl", ".4f"), ("ppl", "ppl", ".4f"), ("share", "share of RTN", ".3f"),
                       ("seconds", "quantize s", ".1f")]))
    print(machine_line(machine()))
    write_json(args.json, {"model": args.model, "fp": fp, "nsamples": args.nsamples or nsamples, "rows": rows})


if __name__ == "__main__":
    main()
