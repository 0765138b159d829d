"""Quantization quality on the real stories260k_qwen: perplexity of GPTQ and RTN against full precision.

Calibration: 128 x 128-token windows of calib_ids.npy; evaluation: eval_ids.npy in non-overlapping 256-token
windows, the quantized weights dequantized into the full-precision model (the model card's protocol: fp 5.667).

    python benchmarks/bench_quality.py [--grid core|full] [--json PATH]

core: bits 3 / 4 / 8 at group 32, symmetric (the bars CI checks). full: bits 2 / 3 / 4 / 8 x group 32 / 64 / -1 x
sym / asym x desc_act off / on.
"""
import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import add_common_args, machine, machine_line, shared_data_dir, table, write_json
from qwen_quant import QwenForCausalLM
from qwen_quant.evaluate import perplexity
from qwen_quant.model import load_dequantized
from qwen_quant.quantize import quantize

CORE = [dict(bits=b, group_size=32, sym=True, desc_act=False) for b in (3, 4, 8)]
FULL = [dict(bits=b, group_size=g, sym=s, desc_act=d)
        for b, g, s, d in itertools.product((2, 3, 4, 8), (32, 64, -1), (True, False), (False, True))]
# Quality bars (the GPTQ issue): at 3 and 4 bits GPTQ keeps at most this share of RTN's perplexity increase ...
# Measured with the defaults (group act-order, asymmetric calibration 0.5, the cost-weighted clipping search, refine
# 2 passes): 38.5 % at 4 bits, 22.4 % at 3 bits (benchmarks/RESULTS.md, "Refine after GPTQ"); equivalent variants
# move the 4-bit share by about 0.03 on this toy, and CI's 2 threads sum in another order: the bar leaves room.
MAX_GPTQ_SHARE_OF_RTN_LOSS = 0.50
# ... and 8 bits raises perplexity by at most this fraction.
MAX_INT8_INCREASE = 0.001


def eval_perplexity(model, ids) -> float:
    return perplexity(model, ids, seqlen=256, batch_size=64, progress=False).perplexity


def run_grid(grid: list, stories: Path) -> tuple[float, list]:
    ids = torch.from_numpy(np.load(stories / "eval_ids.npy").astype(np.int64))
    fp = eval_perplexity(QwenForCausalLM.from_pretrained(stories), ids)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for settings in grid:
            row = dict(settings)
            for method in ("rtn", "gptq"):
                out = Path(tmp) / f"{method}"
                start = time.perf_counter()
                # RTN is the plain min/max baseline; GPTQ uses its default clipped grid.
                quantize(stories, out, method=method, calibration=stories / "calib_ids.npy", nsamples=128,
                         seqlen=128, progress=False, overwrite=True, mse=method == "gptq", **settings)
                row[f"{method}_seconds"] = time.perf_counter() - start
                row[method] = eval_perplexity(load_dequantized(out), ids)
            row["share"] = (row["gptq"] - fp) / (row["rtn"] - fp) if row["rtn"] > fp else float("nan")
            rows.append(row)
    return fp, rows


def quality_failures(fp: float, rows: list) -> list[str]:
    """The quality bars a run misses, as sentences (empty when all hold)."""
    failures = []
    for r in rows:
        if r["group_size"] != 32 or not r["sym"] or r["desc_act"]:
            continue
        if r["bits"] in (3, 4) and not r["share"] <= MAX_GPTQ_SHARE_OF_RTN_LOSS:
            failures.append(f"{r['bits']}-bit g32: GPTQ keeps {r['share']:.0%} of RTN's perplexity increase "
                            f"(bar {MAX_GPTQ_SHARE_OF_RTN_LOSS:.0%})")
        if r["bits"] == 8 and not r["gptq"] <= fp * (1 + MAX_INT8_INCREASE):
            failures.append(f"8-bit g32: perplexity {r['gptq']:.4f} is more than {MAX_INT8_INCREASE:.1%} above {fp:.4f}")
    return failures


COLUMNS = [("bits", "bits", "d"), ("group_size", "group", "d"), ("sym", "sym", ""), ("desc_act", "act-order", ""),
           ("rtn", "RTN ppl", ".4f"), ("gptq", "GPTQ ppl", ".4f"), ("share", "GPTQ/RTN loss", ".3f"),
           ("gptq_seconds", "GPTQ s", ".1f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--grid", choices=("core", "full"), default="core")
    parser.add_argument("--bits", type=int, nargs="*", help="only these bit widths of the grid")
    args = parser.parse_args()
    info = machine()
    print(machine_line(info))
    grid = [s for s in (FULL if args.grid == "full" else CORE) if not args.bits or s["bits"] in args.bits]
    fp, rows = run_grid(grid, shared_data_dir() / "stories260k_qwen")
    print(f"stories260k_qwen full precision: perplexity {fp:.4f}")
    print(table(rows, COLUMNS))
    failures = quality_failures(fp, rows)
    print("\n".join(failures) if failures else "quality bars: all met")
    write_json(args.json, {"machine": info, "fp_perplexity": fp, "rows": rows, "failures": failures})
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
