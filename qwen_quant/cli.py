"""`qwen-quantize`: quantize a model (the default), or `qwen-quantize eval` / `memory` / `plan`."""
import argparse
import logging
import sys

SUBCOMMANDS = ("eval", "memory", "plan")


def quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-quantize", description="GPTQ-quantize a Qwen (v1) model into the layout "
                                "of Qwen's published Int4/Int8 checkpoints. Other commands: qwen-quantize eval "
                                "MODEL, qwen-quantize memory MODEL, qwen-quantize plan MODEL.")
    p.add_argument("model", help="a local folder, or a published name such as Qwen-14B-Chat")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128, help="inputs per quantization group; -1 = per channel")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing activation")
    p.add_argument("--static-groups", action="store_true", help="fix the group grids before GPTQ updates them")
    p.add_argument("--no-sym", dest="sym", action="store_false", help="asymmetric grid (writes gptq_v2 zeros)")
    p.add_argument("--damp", type=float, default=0.01, help="damping as a fraction of the mean Hessian diagonal")
    p.add_argument("--no-mse", dest="mse", action="store_false",
                   help="the textbook min/max grid instead of the clipped grid searched per group")
    p.add_argument("--dataset", default="c4", help="c4, wikitext2, or a .txt / .jsonl (chats) / .npy file")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--output", default=None, help="output folder (default: MODEL-Int4 / MODEL-Int8 here)")
    p.add_argument("--resume", action="store_true", help="continue a killed run at its next block")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size", type=float, default=4.0, help="GB per safetensors shard")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-quantize eval", description="Perplexity of a full-precision or quantized "
                                "model (GPTQ protocol: non-overlapping windows).")
    p.add_argument("model")
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, a .txt file, or a .npy of token ids")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--stride", type=int, default=None, help="sliding-window evaluation with this stride")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--baseline", default=None, help="a full-precision model to compare with")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "triton"))
    p.add_argument("--device", default=None)
    return p


def memory_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-quantize memory", description="Peak memory of the published protocol "
                                "(batch 1, 1-token context, generating --tokens), term by term, beside Qwen's figure.")
    p.add_argument("model", help="a published name (no download needed) or a folder holding config.json")
    p.add_argument("--bits", type=int, default=None, choices=(4, 8), help="default: from the name, else bf16")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048)
    return p


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-quantize plan", description="Before quantizing: the run's peak device "
                                "memory, peak host memory, output disk and time, term by term.")
    p.add_argument("model", help="a published name (no download needed) or a folder holding config.json")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return p


def run_quantize(args) -> None:
    from .quantize import quantize, summary_table

    report = quantize(args.model, args.output, bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
                      sym=args.sym, damp_percent=args.damp, static_groups=args.static_groups, calibration=args.dataset,
                      nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
                      method=args.method, resume=args.resume, overwrite=args.overwrite,
                      max_shard_bytes=int(args.max_shard_size * 1e9), mse=args.mse)
    print(summary_table(report))


def run_eval(args) -> None:
    from .checkpoint import resolve_model_path
    from .evaluate import load_eval_tokens, perplexity
    from .model import QwenForCausalLM
    from .tokenizer import QwenTokenizer

    def ppl(name):
        folder = resolve_model_path(name)
        model = QwenForCausalLM.from_pretrained(folder, device=args.device, backend=args.backend)
        tokenizer = QwenTokenizer.from_pretrained(folder) if (folder / "qwen.tiktoken").is_file() else None
        tokens = load_eval_tokens(args.dataset, tokenizer)
        if args.max_windows:
            tokens = tokens[: args.max_windows * args.seqlen]
        return perplexity(model, tokens, seqlen=args.seqlen, stride=args.stride, batch_size=args.batch_size)

    result = ppl(args.model)
    print(f"{args.model}: perplexity {result.perplexity:.4f} on {args.dataset} ({result.targets} tokens predicted, "
          f"{result.windows} windows of {result.seqlen})")
    if args.baseline:
        base = ppl(args.baseline)
        print(f"{args.baseline}: perplexity {base.perplexity:.4f}")
        print(f"increase: {result.perplexity - base.perplexity:+.4f} "
              f"({100 * (result.perplexity / base.perplexity - 1):+.2f} %)")


def run_memory(args) -> None:
    from .memory import memory_report

    print(memory_report(args.model, bits=args.bits, tokens=args.tokens, group_size=args.group_size))


def run_plan(args) -> None:
    from .plan import plan_report

    print(plan_report(args.model, bits=args.bits, group_size=args.group_size, nsamples=args.nsamples,
                      seqlen=args.seqlen, device=args.device, method=args.method))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
        parser, run = {"eval": (eval_parser, run_eval), "memory": (memory_parser, run_memory),
                       "plan": (plan_parser, run_plan)}[command]
    else:
        parser, run = quantize_parser, run_quantize
    args = parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        print(f"qwen-quantize: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
