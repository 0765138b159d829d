"""`qwen-quantize`: quantize a model (the default), or `qwen-quantize eval` / `memory` / `plan` / `demo`."""
import argparse
import logging
import math
import os
import sys

SUBCOMMANDS = ("eval", "memory", "plan", "demo")
DEBUG_VARIABLE = "QWEN_QUANT_DEBUG"  # set to 1 for the traceback of an unexpected error
DEFAULT_EVAL_DATASET = "wikitext2"  # eval's perplexity text when --dataset is not given (and --tasks is not)


# argparse types: a value out of range is refused at parse time, with the option named by argparse.
def int_at_least(least: int, most: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least or most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{value} must be at least {least}" +
                                             (f" and at most {most}" if most is not None else ""))
        return value
    return parse


def group_size(text: str) -> int:
    value = int_at_least(-1)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not a group size: use a positive number of inputs, or -1 per channel")
    return value


def finite_float(least: float, most: float = math.inf, least_included: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above_least = value >= least if least_included else value > least
        if not (math.isfinite(value) and above_least and value <= most):  # NaN fails every comparison
            low = f"{'at least' if least_included else 'above'} {least:g}"
            high = f" and at most {most:g}" if math.isfinite(most) else ""
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {low}{high}")
        return value
    return parse


def task_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give task names separated by commas, none of them empty")
    return names


def device_name(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine ({why}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def gigabytes(text: str) -> int:
    """A positive size in GB, as bytes."""
    return int(finite_float(0, least_included=False)(text) * 1e9)


def quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-quantize", description="GPTQ-quantize a Qwen model (v1, Qwen1.5 / 2 / "
                                "2.5, Qwen3) into the layout of Qwen's published Int4/Int8 checkpoints. Other "
                                "commands: qwen-quantize eval MODEL, qwen-quantize memory MODEL, qwen-quantize plan "
                                "MODEL, qwen-quantize demo.")
    p.add_argument("model", help="a local folder, or a published name such as Qwen-14B-Chat or Qwen2.5-7B-Instruct")
    add_method_arguments(p)
    p.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--output", default=None, help="output folder (default here: MODEL-Int4 / MODEL-Int8, for "
                                                  "Qwen1.5 / 2 / 2.5 / 3 MODEL-GPTQ-Int4 / MODEL-GPTQ-Int8)")
    p.add_argument("--resume", action="store_true", help="continue a killed run at its next block")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_hub_argument(p)
    return p


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """The method's options, which quantize and plan take alike: each named as QuantizeSettings' field (dest), and
    absent from the namespace unless given, so that QuantizeSettings' defaults are the only ones."""
    from dataclasses import fields

    from .calibration import SEED_RANGE
    from .packing import SUPPORTED_BITS
    from .settings import METHODS, QuantizeSettings

    default = {f.name: f.default for f in fields(QuantizeSettings)}
    g = p.add_argument_group("the method's options", argument_default=argparse.SUPPRESS)
    g.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help=f"default {default['bits']}")
    g.add_argument("--group-size", type=group_size, help="inputs per quantization group (default "
                   f"{default['group_size']}); -1 = per channel")
    g.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing activation")
    g.add_argument("--static-groups", action="store_true", help="fix the group grids before GPTQ updates them")
    g.add_argument("--group-act-order", action=argparse.BooleanOptionalAction,
                   help="act-order of whole groups, with no run-time cost (g_idx stays in order); default: on "
                        "with a group size and without --desc-act / --static-groups")
    g.add_argument("--asym-calibration", type=finite_float(0, 1), metavar="ALPHA", help="match the full-precision "
                   "model's outputs (GPTAQ) with this strength in [0, 1] (default "
                   f"{default['asym_calibration']}); 0: off (half the forwards and activation memory)")
    g.add_argument("--input-scaling", action=argparse.BooleanOptionalAction,
                   help="scale the inputs after ln_1 / ln_2 per channel (AWQ-style), folded into the norms")
    g.add_argument("--refine-passes", type=int_at_least(0), metavar="N",
                   help="after GPTQ, N rounds of least-squares scales and re-chosen codes (default "
                        f"{default['refine_passes']}); 0: plain GPTQ")
    g.add_argument("--no-sym", dest="sym", action="store_false", help="asymmetric grid (writes gptq_v2 zeros)")
    g.add_argument("--damp", dest="damp_percent", type=finite_float(0, 1), metavar="DAMP",
                   help="damping as a fraction of the mean Hessian diagonal, in [0, 1] (default "
                   f"{default['damp_percent']})")
    g.add_argument("--no-mse", dest="mse", action="store_false",
                   help="the textbook min/max grid instead of the clipped grid searched per group")
    g.add_argument("--dataset", dest="calibration", metavar="DATASET",
                   help="c4, wikitext2, or a .txt / .jsonl (chats) / .npy file "
                   f"(default {default['calibration']})")
    g.add_argument("--nsamples", type=int_at_least(1), help=f"calibration windows (default {default['nsamples']})")
    g.add_argument("--seqlen", type=int_at_least(1), help="tokens per calibration window (default "
                   f"{default['seqlen']})")
    g.add_argument("--seed", type=int_at_least(SEED_RANGE[0], SEED_RANGE[1] - 1), help=f"default {default['seed']}")
    g.add_argument("--method", choices=METHODS, help=f"default {default['method']}")
    g.add_argument("--max-shard-size", dest="max_shard_bytes", type=gigabytes, metavar="GB",
                   help=f"GB per safetensors shard (default {default['max_shard_bytes'] / 1e9:g})")
    g.add_argument("--tp", type=int, help="pad the MLP width so that vLLM can split the output over this many "
                   "GPUs (1, 2, 4 or 8); the outputs are unchanged")


def quantize_settings(args: argparse.Namespace):
    """The one QuantizeSettings of a quantize or plan command line (add_method_arguments)."""
    from dataclasses import fields

    from .settings import QuantizeSettings

    names = {f.name for f in fields(QuantizeSettings)}
    return QuantizeSettings(**{name: value for name, value in vars(args).items() if name in names})


def add_hub_argument(p: argparse.ArgumentParser) -> None:
    from .checkpoint import HUBS

    p.add_argument("--hub", choices=HUBS, default=None,
                   help="where published names are downloaded from (default: $QWEN_QUANT_HUB, else huggingface)")


def eval_parser() -> argparse.ArgumentParser:
    from .chat_check import DEFAULT_MAX_NEW_TOKENS

    p = argparse.ArgumentParser(prog="qwen-quantize eval", description="Perplexity of a full-precision or quantized "
                                "model (GPTQ protocol: non-overlapping windows), lm-evaluation-harness tasks (--tasks) "
                                "or its chat answers beside the full-precision model's (--chat).")
    p.add_argument("model")
    p.add_argument("--dataset", default=None, help=f"{DEFAULT_EVAL_DATASET} (the default, unless --tasks is given), "
                   "a .txt file, or a .npy of token ids")
    p.add_argument("--seqlen", type=int_at_least(2), default=2048)
    p.add_argument("--stride", type=int_at_least(1), default=None,
                   help="sliding-window evaluation with this stride (at most --seqlen)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1)
    p.add_argument("--max-windows", type=int_at_least(1), default=None, help="evaluate only the first N windows")
    p.add_argument("--baseline", default=None, help="a full-precision model to compare with")
    p.add_argument("--tasks", type=task_names, default=None, metavar="T1,T2",
                   help="lm-evaluation-harness tasks (names, or task YAML files): a table of their metrics, after "
                   "the perplexity when --dataset is given too (needs pip install \"qwen_quant[eval]\")")
    p.add_argument("--limit", type=int_at_least(1), default=None, metavar="N", help="with --tasks: the first N "
                   "documents of each task")
    p.add_argument("--include-path", default=None, metavar="DIR", help="with --tasks: a folder of local task YAML "
                   "files (tests/harness_tasks holds WikiText-2 and ChatML ones)")
    p.add_argument("--chat", action="store_true", help="instead of perplexity: greedy ChatML answers to short "
                   "questions beside --baseline's, whether they agree and whether each ends its turn")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"with --chat: the token budget of each answer (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "triton"))
    p.add_argument("--device", type=device_name, default=None)
    add_hub_argument(p)
    return p


def memory_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-quantize memory", description="Peak memory of the published protocol "
                                "(batch 1, 1-token context, generating --tokens), term by term, beside Qwen's figure "
                                "(published for v1's sizes).")
    p.add_argument("model", help="a published name (no download needed) or a folder holding config.json")
    p.add_argument("--bits", type=int, default=None, choices=(4, 8), help="default: from the name, else bf16")
    p.add_argument("--group-size", type=group_size, default=128)
    p.add_argument("--tokens", type=int_at_least(1), default=2048)
    return p


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-quantize demo", description="Quantize the tiny real model shipped in "
                                "the package (stories260k_qwen) to Int4, offline, and compare it with the original: "
                                "perplexity, a greedy story from each, and the memory table of the published sizes.")
    p.add_argument("--output", default=None, help="keep the Int4 folder here (default: a temporary folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the --output folder of an earlier run")
    return p


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-quantize plan", description="Before quantizing: the run's peak device "
                                "memory, peak host memory, output disk and time, term by term.")
    p.add_argument("model", help="a published name (no download needed) or a folder holding config.json")
    add_method_arguments(p)  # the run's, so that a plan's command line is the run's
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return p


def run_quantize(args) -> None:
    from .quantize import quantize, summary_table

    report = quantize(args.model, args.output, quantize_settings(args), device=args.device, resume=args.resume,
                      overwrite=args.overwrite, hub=args.hub)
    print(summary_table(report))


def run_eval(args) -> None:
    if args.chat:
        return run_chat_check(args)
    manager = None
    if args.tasks is not None:  # before any model loads: lm-evaluation-harness is installed and knows every task
        from .harness import select_tasks, task_table

        manager = select_tasks(args.tasks, args.include_path)
    if manager is None or args.dataset is not None:
        run_perplexity(args)
    if manager is not None:
        print(task_table(args.model, args.tasks, manager, limit=args.limit, baseline=args.baseline,
                         backend=args.backend, device=args.device, batch_size=args.batch_size, hub=args.hub))


def run_perplexity(args) -> None:
    from .checkpoint import resolve_model_path
    from .evaluate import load_eval_tokens, perplexity
    from .model import QwenForCausalLM
    from .tokenizer import load_tokenizer

    def ppl(name):
        folder = resolve_model_path(name, args.hub)
        model = QwenForCausalLM.from_pretrained(folder, device=args.device, backend=args.backend)
        tokens = load_eval_tokens(dataset, load_tokenizer(folder))
        return perplexity(model, tokens, seqlen=args.seqlen, stride=args.stride, batch_size=args.batch_size,
                          max_windows=args.max_windows)

    dataset = args.dataset or DEFAULT_EVAL_DATASET
    result = ppl(args.model)
    print(f"{args.model}: perplexity {result.perplexity:.4f} on {dataset} ({result.targets} tokens predicted, "
          f"{result.windows} windows of {result.seqlen})")
    if args.baseline:
        base = ppl(args.baseline)
        print(f"{args.baseline}: perplexity {base.perplexity:.4f}")
        print(f"increase: {result.perplexity - base.perplexity:+.4f} "
              f"({100 * (result.perplexity / base.perplexity - 1):+.2f} %)")


def run_chat_check(args) -> None:
    from .chat_check import chat_tokenizer, compare, format_report
    from .checkpoint import resolve_model_path
    from .model import QwenForCausalLM

    baseline, quantized = (resolve_model_path(name, args.hub) for name in (args.baseline, args.model))
    tokenizer = chat_tokenizer(quantized)  # exports carry the tokenizer of the model they come from
    models = [QwenForCausalLM.from_pretrained(folder, device=args.device, backend=args.backend)
              for folder in (baseline, quantized)]
    print(format_report(compare(*models, tokenizer, max_new_tokens=args.max_new_tokens)))


def run_memory(args) -> None:
    from .memory import memory_report

    print(memory_report(args.model, bits=args.bits, tokens=args.tokens, group_size=args.group_size))


def run_plan(args) -> None:
    from .plan import plan_report

    print(plan_report(args.model, quantize_settings(args), device=args.device))


def run_demo(args) -> None:
    from .demo import run_demo as demo

    demo(args.output, overwrite=args.overwrite)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
        parser, run = {"eval": (eval_parser, run_eval), "memory": (memory_parser, run_memory),
                       "plan": (plan_parser, run_plan), "demo": (demo_parser, run_demo)}[command]
    else:
        parser, run = quantize_parser, run_quantize
    p = parser()
    args = p.parse_args(argv)
    if getattr(args, "stride", None) is not None and args.stride > args.seqlen:
        p.error(f"argument --stride: {args.stride} must be at most --seqlen ({args.seqlen})")
    if getattr(args, "tasks", None) is None and (getattr(args, "limit", None) or getattr(args, "include_path", None)):
        p.error("arguments --limit and --include-path go with --tasks")
    if getattr(args, "tasks", None) is not None and args.chat:
        p.error("argument --tasks: not with --chat (two evaluations: run them one at a time)")
    if getattr(args, "chat", False) and args.baseline is None:
        p.error("argument --chat: needs --baseline FULL_PRECISION, the model whose answers are compared with")
    try:
        run(args)
    except Exception as e:  # every failure becomes one line and exit code 2
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"qwen-quantize: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


def error_message(e: Exception) -> str:
    """One line for the user: our own errors say what is wrong; anything else is named as unexpected."""
    if isinstance(e, KeyError):  # str() of a KeyError is the repr of its message
        return str(e.args[0]) if e.args else "KeyError"
    if isinstance(e, MemoryError):
        return f"out of memory{f' ({e})' if str(e) else ''}"
    if isinstance(e, (ValueError, OSError, RuntimeError)):  # OSError's text names the path it failed on
        return str(e)
    return f"unexpected {type(e).__name__}: {e} (run with {DEBUG_VARIABLE}=1 for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
