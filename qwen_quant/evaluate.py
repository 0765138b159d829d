"""Perplexity, by the standard GPTQ protocol (non-overlapping windows) or with a sliding window."""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import encode_text, load_hub_dataset, read_text, read_token_ids

EVAL_DATASETS = ("wikitext2",)  # Hub test splits, joined with "\n\n" as GPTQ does


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood, nats
    targets: int  # tokens predicted
    windows: int
    seqlen: int
    stride: Optional[int]


def load_eval_tokens(source, tokenizer=None) -> torch.Tensor:
    """A 1-D LongTensor of token ids: a dataset name, a .txt file, a .npy of ids, or ids as they are."""
    if isinstance(source, (torch.Tensor, np.ndarray, list)):
        ids = source if isinstance(source, torch.Tensor) else torch.as_tensor(np.asarray(source))
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:  # would truncate to ids
            raise ValueError(f"evaluation token ids must be integers, got {str(ids.dtype).removeprefix('torch.')}")
        tokens = ids.long().flatten()
    elif str(source) in EVAL_DATASETS:
        tokens = _encode(tokenizer, load_hub_dataset(str(source), split="test")["text"], source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation data {source!r} is neither a file nor a known dataset "
                                    f"({', '.join(EVAL_DATASETS)})")
        if path.suffix == ".npy":
            tokens = read_token_ids(path)
        else:
            tokens = _encode(tokenizer, read_text(path), path)
    if tokens.numel() < 2:
        raise ValueError(f"evaluation data {source if not isinstance(source, torch.Tensor) else 'tensor'} "
                         f"holds {tokens.numel()} tokens: nothing to evaluate")
    return tokens


def _encode(tokenizer, text, source) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError(f"evaluation text {source} needs a tokenizer (the model folder has no qwen.tiktoken or "
                         "tokenizer.json)")
    return encode_text(tokenizer, text)


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048, stride: Optional[int] = None, batch_size: int = 1,
               progress: bool = True, max_windows: Optional[int] = None) -> PerplexityResult:
    """exp(mean NLL). Without stride: non-overlapping windows of seqlen, each predicting its tokens 2..n, the
    trailing partial window dropped (GPTQ's protocol). With stride: windows of seqlen every `stride` tokens, each
    scoring only the tokens not scored before (the sliding-window protocol). max_windows: only the first ones."""
    max_len = model.config.max_position_embeddings
    if seqlen > max_len:
        raise ValueError(f"seqlen {seqlen} is larger than the model's maximum length {max_len}")
    for option, value, least in (("seqlen", seqlen, 2), ("batch_size", batch_size, 1), ("max_windows", max_windows, 1)):
        if value is not None and value < least:  # a window of one token predicts nothing
            raise ValueError(f"{option} must be at least {least}, got {value}")
    tokens = tokens.flatten().long()
    vocab = model.config.vocab_size
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"evaluation token ids span [{int(tokens.min())}, {int(tokens.max())}], outside the model's "
                         f"vocabulary of {vocab} (ids 0..{vocab - 1})")
    if tokens.numel() < seqlen:
        raise ValueError(f"evaluation data has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if stride is None:
        windows = [(i * seqlen, (i + 1) * seqlen, i * seqlen + 1) for i in range(tokens.numel() // seqlen)]
    else:
        if not 0 < stride <= seqlen:
            raise ValueError(f"stride {stride} must be in 1..seqlen ({seqlen})")
        windows, scored = [], 1
        for start in range(0, tokens.numel() - 1, stride):
            end = min(start + seqlen, tokens.numel())
            windows.append((start, end, max(scored, start + 1)))
            scored = end
            if end == tokens.numel():
                break
    windows = windows[:max_windows]
    nll, targets = 0.0, 0
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        # Windows of one batch share a length (all but possibly the last strided one, which runs alone).
        for group in ([batch] if len({e - s for s, e, _ in batch}) == 1 else [[w] for w in batch]):
            ids = torch.stack([tokens[s:e] for s, e, _ in group]).to(model.device)
            logits = model(ids)
            for row, (s, e, first) in enumerate(group):
                pred = logits[row, first - s - 1: e - s - 1]
                nll += F.cross_entropy(pred, ids[row, first - s:], reduction="sum").item()
                targets += e - first
    mean = nll / targets
    return PerplexityResult(math.exp(mean), mean, targets, len(windows), seqlen, stride)
