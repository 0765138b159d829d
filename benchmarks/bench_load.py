"""Peak memory and time of QwenForCausalLM.from_pretrained on a random bf16 checkpoint, single file and sharded.

The checkpoint has the real Qwen-1.8B shapes (hidden 2048, 16 heads, MLP 5504, 151936 vocab rows for both the
embedding and the untied lm_head) with only --layers blocks (default 2: 1.447 GB of bf16 weights, of which the
embedding and lm_head are 1.245 GB). --quick: 1 block and 32768 vocab rows (0.37 GB).

Each load runs in a fresh spawned process: "load peak" is that process's peak RSS minus its RSS before loading
(torch and qwen_quant already imported). Should the loader map the files instead of reading them, the model's tensors
would stay file-backed and become resident only when read: "touched peak" therefore also reads every parameter once,
as any use of the model does (one element of every 4 KiB page, so no temporary copy inflates the peak). The checkpoint
was just written, so its pages are in the page cache (a warm load).
The issue's requirement: peak < 1.5x the weights' bytes.

    python benchmarks/bench_load.py [--quick] [--layers N] [--json results.json]
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import GIB, add_common_args, isolated, machine, machine_line, peak_rss_bytes, rss_bytes, rss_parts, table, \
    write_json

LIMIT_RATIO = 1.5


def make_checkpoint(folder: str, layers: int, vocab: int, max_shard_bytes: int) -> int:
    from qwen_quant.published import SIZES
    from qwen_quant.synthetic import save_random_checkpoint

    config = SIZES["1.8B"].config()
    config.num_hidden_layers, config.vocab_size = layers, vocab
    save_random_checkpoint(folder, config, torch.bfloat16, seed=0, max_shard_bytes=max_shard_bytes)
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def load_job(folder: str) -> dict:
    from qwen_quant import QwenForCausalLM

    before, parts_before = rss_bytes(), rss_parts()
    start = time.perf_counter()
    model = QwenForCausalLM.from_pretrained(folder)
    load_s = time.perf_counter() - start
    load_peak, after_load = peak_rss_bytes(), rss_parts()
    start = time.perf_counter()
    # One element of every 4 KiB page: makes each page resident without the temporary float copy a full sum makes.
    checksum = sum(float(p.reshape(-1)[::max(1, 4096 // p.element_size())].float().sum()) for p in model.parameters())
    touch_s = time.perf_counter() - start
    return {"rss_before": before, "load_s": load_s, "load_peak": load_peak, "rss_parts_before": parts_before,
            "rss_after_load": after_load,
            "touch_s": touch_s, "touched_peak": peak_rss_bytes(), "rss_after_touch": rss_parts(),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "dtype": str(model.dtype), "checksum": checksum}


def growth(r: dict, part: str) -> int:
    return r["rss_after_touch"].get(part, 0) - r["rss_parts_before"].get(part, 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--layers", type=int, help="decoder blocks (default 2, --quick 1)")
    parser.add_argument("--shard-mb", type=int, default=300, help="max shard size of the sharded checkpoint (MB)")
    args = parser.parse_args()
    layers = args.layers or (1 if args.quick else 2)
    vocab = 32768 if args.quick else 151936
    info = machine()
    print(machine_line(info))
    shape = f"Qwen-1.8B shapes (hidden 2048, MLP 5504, 16 heads), {layers} blocks, {vocab} vocab rows, bf16"
    print(f"checkpoint: {shape}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        for layout, shard_bytes in (("single file", 10**12), ("sharded", args.shard_mb * 10**6)):
            folder = str(Path(tmp) / layout.replace(" ", "_"))
            weights = isolated(make_checkpoint, folder, layers, vocab, shard_bytes)["result"]
            files = len(list(Path(folder).glob("*.safetensors")))
            r = isolated(load_job, folder)["result"]
            load_peak = r["load_peak"] - r["rss_before"]
            touched_peak = r["touched_peak"] - r["rss_before"]
            rows.append({"layout": f"{layout} ({files} file{'s' if files > 1 else ''})", "files": files,
                         "weights_bytes": weights, "weights_gb": weights / 1e9, "load_s": r["load_s"],
                         "touch_s": r["touch_s"], "rss_before_gib": r["rss_before"] / GIB,
                         "load_peak_bytes": load_peak, "load_peak_gib": load_peak / GIB,
                         "load_ratio": load_peak / weights, "touched_peak_bytes": touched_peak,
                         "touched_peak_gib": touched_peak / GIB, "touched_ratio": touched_peak / weights,
                         "anon_growth_gib": growth(r, "RssAnon") / GIB, "file_growth_gib": growth(r, "RssFile") / GIB,
                         "param_bytes": r["param_bytes"], "dtype": r["dtype"]})
            print(f"  {layout}: done", flush=True)

    print()
    print(table(rows, [("layout", "layout", ""), ("weights_gb", "weights GB", ".3f"), ("load_s", "load s", ".2f"),
                       ("rss_before_gib", "RSS before GiB", ".2f"), ("load_peak_gib", "load peak GiB", ".2f"),
                       ("load_ratio", "/weights", ".2f"), ("touch_s", "touch s", ".2f"),
                       ("touched_peak_gib", "touched peak GiB", ".2f"), ("touched_ratio", "/weights", ".2f"),
                       ("anon_growth_gib", "+anon GiB", ".2f"), ("file_growth_gib", "+file GiB", ".2f")]))
    print("peaks are above the child's RSS before loading; +anon / +file: growth of the child's anonymous and "
          "file-backed (mapped files, shared libraries) RSS from before loading to after the touch")
    worst = max(max(r["load_ratio"], r["touched_ratio"]) for r in rows)
    verdict = "PASS" if worst < LIMIT_RATIO else "FAIL"
    print(f"{verdict}: worst peak / weights = {worst:.2f} (requirement < {LIMIT_RATIO})")
    write_json(args.json, {"benchmark": "bench_load", "machine": info, "checkpoint": shape, "quick": args.quick,
                           "limit_ratio": LIMIT_RATIO, "pass": worst < LIMIT_RATIO, "rows": rows})


if __name__ == "__main__":
    main()
