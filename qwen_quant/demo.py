"""`qwen-quantize demo`: the whole job, offline, on a tiny real model shipped inside the package.

stories260k_qwen (karpathy's stories260K, MIT, in the Qwen v1 layout; see stories260k_qwen/README.md) is quantized to
Int4 with GPTQ (group 32: its hidden size is 64), then the two models are compared on held-out TinyStories text:
perplexity, and a greedy story from each. Last, the memory table of the published Qwen sizes, which needs no weights.
"""
import tempfile
from pathlib import Path

import numpy as np
import torch

DEMO_MODEL = Path(__file__).with_name("stories260k_qwen")
BOS = 1  # llama2.c's tokenizer: BOS starts, and ends, a story
STORY_TOKENS = 60
EVAL_SEQLEN = 256


def run_demo(output=None, overwrite: bool = False, print_fn=print) -> dict:
    """Quantize the embedded model into `output` (a temporary folder when None) and print the comparison.
    overwrite: replace `output` when it holds a previous output of ours (quantize's overwrite)."""
    from .evaluate import perplexity
    from .memory import format_published_table, published_table
    from .model import QwenForCausalLM
    from .quantize import quantize, summary_table
    from .tok512 import decode_tok512

    with tempfile.TemporaryDirectory(prefix="qwen-quantize-demo-") as tmp:
        out = Path(output) if output else Path(tmp) / "stories260k_qwen-Int4"
        print_fn(f"Quantizing the embedded stories260k_qwen ({DEMO_MODEL}) to Int4 with GPTQ, group 32 ...")
        report = quantize(DEMO_MODEL, out, bits=4, group_size=32, calibration=DEMO_MODEL / "calib_ids.npy",
                          nsamples=32, seqlen=128, overwrite=overwrite, progress=False)
        print_fn(summary_table(report, worst=3))
        eval_ids = torch.from_numpy(np.load(DEMO_MODEL / "eval_ids.npy").astype(np.int64))
        results = {"output": out if output else None}  # a temporary folder is gone once this returns
        for label, folder in (("full precision", DEMO_MODEL), ("Int4 GPTQ", out)):
            model = QwenForCausalLM.from_pretrained(folder)
            ppl = perplexity(model, eval_ids, seqlen=EVAL_SEQLEN, batch_size=16, progress=False)
            story = model.generate(torch.tensor([BOS]), max_new_tokens=STORY_TOKENS, stop_ids=[BOS])[0, 1:].tolist()
            story = decode_tok512(DEMO_MODEL / "tok512.bin", [t for t in story if t != BOS])
            results[label] = {"perplexity": ppl.perplexity, "story": story}
            print_fn(f"\n{label}: perplexity {ppl.perplexity:.3f} on {ppl.targets} held-out TinyStories tokens "
                     f"({ppl.windows} windows of {EVAL_SEQLEN})\n  greedy story: {story}")
        increase = results["Int4 GPTQ"]["perplexity"] / results["full precision"]["perplexity"] - 1
        print_fn(f"\nInt4 perplexity increase: {100 * increase:+.2f} % (a 64-wide model; billion-parameter models "
                 "lose far less)")
        print_fn("\nPeak memory of the published Qwen models (batch 1, 2048 new tokens), ours beside Qwen's figure:")
        print_fn(format_published_table(published_table()))
        kept = f"is {out}" if output else "was a temporary one (keep it with --output DIR)"
        print_fn(f"\nThe Int4 folder {kept}; next: qwen-quantize --bits 4 Qwen-1_8B-Chat")
    return results
