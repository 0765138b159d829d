"""The benchmark suite at CI sizes (about 15 minutes on 2 cores): quality, memory, kernels, decoding, prefill,
quantization, and the real 30-block SmolLM2-135M (bench_smollm2.py --quick).

Writes benchmarks/results.json, rewrites the table between the run_all markers of benchmarks/RESULTS.md, draws
benchmarks/results.png, and exits 1 when a QUALITY bar is missed (GPTQ vs RTN perplexity, Int8 loss, memory at or
below Qwen's published figures; on SmolLM2 GPTQ vs RTN at 4-bit g128, full precision's ChatML answer and the chat
check of a conversation-calibrated Int4: --quick evaluates 4 windows, so the full-precision reference of 12 windows is
bench_smollm2.py's full run's bar). Timings
are printed and recorded, never judged.

    python benchmarks/run_all.py
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_quality import CORE, MAX_GPTQ_SHARE_OF_RTN_LOSS, quality_failures, run_grid  # noqa: E402
from common import machine, machine_line, shared_data_dir  # noqa: E402
from qwen_quant.memory import published_table  # noqa: E402

BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
# Each timing benchmark runs as its own script at CI size; its JSON is gathered here.
TIMED = [("kernels", ["bench_kernels.py", "--quick"]), ("decode", ["bench_decode.py", "--quick", "--compile"]),
         ("prefill", ["bench_prefill.py", "--quick"]), ("quantize", ["bench_quantize.py", "--quick"])]


def run_script(args: list, check: bool = True) -> dict:
    """The script's --json results; with check=False a script that exits 1 for a missed bar still gives them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, str(HERE / args[0]), *args[1:], "--json", str(out)], check=check)
        return json.loads(out.read_text())


def markdown(results: dict) -> str:
    q = results["quality"]
    lines = [results["machine_line"], "",
             f"**Quality** (stories260k_qwen, full precision {q['fp_perplexity']:.4f}; 128 x 128 calibration "
             "windows, 256-token evaluation windows):", "",
             "| bits | group | RTN ppl | GPTQ ppl | GPTQ share of RTN's loss | bar |", "|---|---|---|---|---|---|"]
    for r in q["rows"]:
        bar = f"<= {MAX_GPTQ_SHARE_OF_RTN_LOSS:.0%}" if r["bits"] in (3, 4) else "<= +0.1 % ppl"
        lines.append(f"| {r['bits']} | {r['group_size']} | {r['rtn']:.4f} | {r['gptq']:.4f} | {r['share']:.1%} | "
                     f"{bar} |")
    lines += ["", "**Memory** (GiB, batch 1, 1-token context, 2048 new tokens; ours: estimate of our runtime):", "",
              "| model | precision | ours | published | difference |", "|---|---|---|---|---|"]
    for c in results["memory"]:
        lines.append(f"| Qwen-{c['size']} | {c['precision']} | {c['ours_gib']:.2f} | {c['published_gib']:.2f} | "
                     f"{c['ours_gib'] - c['published_gib']:+.2f} |")
    d = results["decode"]
    lines += ["", f"**Decoding on this CPU** (Qwen-{d['shape']} shapes, {d['layers']} blocks, {d['tokens']} tokens):",
              "", "| precision | mode | backend | tokens/s | vs bf16 eager | compiled / eager | tensors GiB |",
              "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        gain = f"{r['compiled_vs_eager']:.2f}x" if r.get("compiled_vs_eager") else "-"
        lines.append(f"| {r['precision']} | {r['mode']} | {r['backend']} | {r['tokens_per_s']:.2f} | "
                     f"{r['vs_bf16_eager']:.2f}x | {gain} | {r['loaded_gib']:.3f} |")
    p = results["prefill"]
    lines += ["", f"**Prompt processing on this CPU** (Qwen-{p['shape']} shapes, {p['layers']} blocks, first token, "
              f"models in turns, median of {p['rounds']} rounds):", "",
              "| prompt tokens | precision | backend | route | first token s | vs bf16 |", "|---|---|---|---|---|---|"]
    for r in p["rows"]:
        lines.append(f"| {r['prompt_tokens']} | {r['precision']} | {r['backend']} | {r['route']} | "
                     f"{r['median_s']:.3f} | {r['speed_vs_bf16']:.2f}x |")
    s = results["smollm2"]
    gptq = s["rows"][0]
    lines += ["", f"**SmolLM2-135M** (30 blocks; perplexity on the first {s['windows']} windows of 2048 of WikiText-2 "
              f"test; {s['nsamples']} x {s['calib_seqlen']} calibration windows):", "",
              "| full precision | RTN 4-bit g128 | GPTQ 4-bit g128 | GPTQ s/block | quantization peak RSS GiB |",
              "|---|---|---|---|---|",
              f"| {s['fp_perplexity']:.4f} | {gptq['rtn']:.4f} | {gptq['gptq']:.4f} | "
              f"{gptq['seconds_per_block']:.1f} | {gptq['peak_rss_gib']:.2f} |", "",
              "| precision | decode tokens/s | ChatML answer to \"What is the capital of France?\" |", "|---|---|---|"]
    for d, c in zip(s["decode"], s["chat"]):
        reply = " ".join(c["reply"].split()).replace("|", "\\|")  # one table cell: a reply may hold newlines
        lines.append(f"| {d['precision']} | {d['tokens_per_s']:.1f} | {reply} |")
    lines += ["", "**The chat check** (20 ChatML questions, fp32; bar: the conversation-calibrated Int4 ends its turn "
              "wherever full precision does decisively and strays less than RTN):", "",
              "| Int4 g128 | greedy: ends its turn | reading fp's answers: ends where fp ends | decisive ends | "
              "mean KL |", "|---|---|---|---|---|"]
    for label, c in s["chat_check"].items():
        lines.append(f"| {label.replace('_', ', ')} | {c['stops']}/{c['prompts']} (fp {c['full_precision_stops']}) | "
                     f"{c['ends_on_full_precision_answers']}/{c['full_precision_stops']} | "
                     f"{c['decisive_ends_kept']}/{c['decisive_ends']} | "
                     f"{c['mean_kl']:.4f} |")
    if results["failures"]:
        lines += ["", "**Bars missed:** " + "; ".join(results["failures"])]
    lines += ["", f"Suite time: {suite_time(results)}. Full outputs: benchmarks/results.json."]
    return "\n".join(lines)


def suite_time(results: dict) -> str:
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["step_seconds"].items())
    return f"{results['seconds']:.0f} s ({parts})"


def rewrite_results_md(text: str) -> None:
    path = HERE / "RESULTS.md"
    old = path.read_text(encoding="utf-8") if path.is_file() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old:
        old += f"\n{BEGIN}\n{END}\n"
    head, rest = old.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    q = results["quality"]
    rows = q["rows"]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["rtn"] for r in rows], 0.4, label="RTN")
    left.bar([i + 0.2 for i in x], [r["gptq"] for r in rows], 0.4, label="GPTQ (ours)")
    left.axhline(q["fp_perplexity"], color="black", linestyle="--", label="full precision")
    left.set_xticks(list(x), [f"{r['bits']}-bit g{r['group_size']}" for r in rows])
    left.set_ylabel("perplexity (stories260k_qwen eval)")
    left.set_title("Quality: perplexity by method and bits")
    left.legend()
    cells = results["memory"]
    labels = [f"{c['size']}\n{c['precision']}" for c in cells]
    right.bar([i - 0.2 for i in range(len(cells))], [c["published_gib"] for c in cells], 0.4, label="Qwen published")
    right.bar([i + 0.2 for i in range(len(cells))], [c["ours_gib"] for c in cells], 0.4, label="qwen_quant estimate")
    right.set_xticks(range(len(cells)), labels, fontsize=7)
    right.set_yscale("log")
    right.set_ylabel("peak GiB (batch 1, 2048 tokens)")
    right.set_title("Memory: our runtime vs Qwen's published figures")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    start = lap_start = time.perf_counter()
    steps = {}  # seconds of each step, so that CI's time can be traced to its parts

    def step_done(name: str) -> None:
        nonlocal lap_start
        now = time.perf_counter()
        steps[name], lap_start = now - lap_start, now

    info = machine()
    print(machine_line(info), flush=True)
    print("== quality: stories260k_qwen, GPTQ and RTN", flush=True)
    fp, rows = run_grid(CORE, shared_data_dir() / "stories260k_qwen")
    failures = quality_failures(fp, rows)
    for r in rows:
        print(f"  {r['bits']}-bit g{r['group_size']}: RTN {r['rtn']:.4f}, GPTQ {r['gptq']:.4f} "
              f"(GPTQ keeps {r['share']:.1%} of RTN's loss); full precision {fp:.4f}", flush=True)
    print("== memory: the published protocol, four sizes x three precisions", flush=True)
    cells = [c.__dict__ for c in published_table()]
    for c in cells:
        print(f"  Qwen-{c['size']} {c['precision']}: ours {c['ours_gib']:.2f} GiB, published {c['published_gib']:.2f}")
        if c["ours_gib"] > c["published_gib"]:
            failures.append(f"memory Qwen-{c['size']} {c['precision']}: {c['ours_gib']:.2f} GiB > published "
                            f"{c['published_gib']:.2f}")
    step_done("quality and memory")
    results = {"machine": info, "machine_line": machine_line(info).splitlines()[0],
               "quality": {"fp_perplexity": fp, "rows": rows}, "memory": cells}
    for name, args in TIMED:
        print(f"== {name}: {' '.join(args)}", flush=True)
        results[name] = run_script(args)
        step_done(name)
    print("== SmolLM2-135M: bench_smollm2.py --quick", flush=True)
    results["smollm2"] = run_script(["bench_smollm2.py", "--quick"], check=False)
    step_done("smollm2")
    failures += [f"SmolLM2-135M: {f}" for f in results["smollm2"]["failures"]]
    results["failures"] = failures
    results["seconds"], results["step_seconds"] = time.perf_counter() - start, steps
    (HERE / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    rewrite_results_md(markdown(results))
    plot(results, HERE / "results.png")
    print(f"wrote benchmarks/results.json, benchmarks/RESULTS.md, benchmarks/results.png; {suite_time(results)}")
    if failures:
        print("QUALITY BARS MISSED:\n  " + "\n  ".join(failures))
        raise SystemExit(1)
    print("quality bars: all met")


if __name__ == "__main__":
    main()
