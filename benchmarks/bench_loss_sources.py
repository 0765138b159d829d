"""Where a quantized model's perplexity loss comes from: the full-precision model with only some of its linears
replaced by their quantized weights (dequantized), for two quantized folders side by side (e.g. GPTQ and RTN of the
same settings), on SmolLM2-135M's first --windows (12) windows of 2048 of eval_wikitext2_test_ids.npy.

    python benchmarks/bench_loss_sources.py FP_FOLDER GPTQ_FOLDER RTN_FOLDER [--windows N] [--json PATH]

Rows: every linear (the whole quantized model), one kind of linear at a time in every block, and every linear of a
third of the blocks. "share of total" = the row's increase over full precision / the whole model's increase.
"""
import argparse

import numpy as np
import torch

from common import add_common_args, machine, machine_line, shared_data_dir, table, write_json
from qwen_quant import QwenForCausalLM
from qwen_quant.layout import QUANTIZED_LINEARS
from qwen_quant.evaluate import perplexity
from qwen_quant.model import load_dequantized


def subsets(layers: int) -> dict:
    """name -> set of (block, linear path) quantized in that row."""
    every = {(i, p) for i in range(layers) for p in QUANTIZED_LINEARS}
    rows = {"all linears": every}
    rows.update({f"{p} only": {(i, p) for i in range(layers)} for p in QUANTIZED_LINEARS})
    third = -(-layers // 3)
    for start in range(0, layers, third):
        end = min(start + third, layers)
        rows[f"blocks {start}-{end - 1}"] = {(i, p) for i in range(start, end) for p in QUANTIZED_LINEARS}
    return rows


def mixed(fp_model, quantized, chosen: set) -> None:
    """Put the quantized weights of `chosen` into fp_model, the full-precision ones everywhere else."""
    for i, (fp_block, q_block) in enumerate(zip(fp_model.blocks, quantized["model"].blocks)):
        for p in QUANTIZED_LINEARS:
            source = q_block if (i, p) in chosen else quantized["fp_block"][i]
            fp_block.get_submodule(p).weight.data = source.get_submodule(p).weight.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("fp")
    parser.add_argument("folders", nargs="+", help="quantized folders, e.g. GPTQ then RTN")
    parser.add_argument("--windows", type=int, default=12)
    args = parser.parse_args()
    print(machine_line(machine()), flush=True)
    ids = torch.from_numpy(np.load(shared_data_dir() / "smollm2_135m" / "eval_wikitext2_test_ids.npy")
                           .astype(np.int64))[:args.windows * 2048]
    model = QwenForCausalLM.from_pretrained(args.fp)
    reference = QwenForCausalLM.from_pretrained(args.fp)
    fp = perplexity(model, ids, seqlen=2048, progress=False).perplexity
    print(f"full precision {fp:.4f} on {args.windows} windows of 2048", flush=True)
    rows = {name: {"row": name} for name in subsets(model.config.num_hidden_layers)}
    for k, folder in enumerate(args.folders):
        quantized = {"model": load_dequantized(folder), "fp_block": reference.blocks}
        for name, chosen in subsets(model.config.num_hidden_layers).items():
            mixed(model, quantized, chosen)
            rows[name][f"ppl{k}"] = perplexity(model, ids, seqlen=2048, progress=False).perplexity
            print(f"  {folder}: {name}: {rows[name][f'ppl{k}']:.4f}", flush=True)
        total = rows["all linears"][f"ppl{k}"] - fp
        for row in rows.values():
            row[f"share{k}"] = (row[f"ppl{k}"] - fp) / total
    columns = [("row", "quantized linears", "")]
    for k in range(len(args.folders)):
        columns += [(f"ppl{k}", f"ppl [{k}]", ".4f"), (f"share{k}", f"share of total [{k}]", ".2f")]
    print("\n".join(f"[{k}] {folder}" for k, folder in enumerate(args.folders)))
    print(table(list(rows.values()), columns))
    print(machine_line(machine()))
    write_json(args.json, {"fp": fp, "windows": args.windows, "folders": args.folders, "rows": list(rows.values())})


if __name__ == "__main__":
    main()
