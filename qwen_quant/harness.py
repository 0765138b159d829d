"""Our runtime as an lm-evaluation-harness model: QwenQuantLM, registered in lm_eval as "qwen_quant".

Three ways to use it:
- `qwen-quantize eval MODEL --tasks T1,T2 [--limit N] [--include-path DIR] [--baseline FP_MODEL]` (cli.run_eval:
  select_tasks, then task_table);
- Python: `lm_eval.simple_evaluate(model=QwenQuantLM(pretrained=FOLDER), tasks=[...])`, or `model="qwen_quant",
  model_args="pretrained=FOLDER,backend=cpu"` once this module is imported;
- lm_eval's own command line: `python -m qwen_quant.harness --model qwen_quant --model_args pretrained=FOLDER
  --tasks T --device cpu`. lm_eval 0.4 looks models up only in its own registry (no package entry points), so a plain
  `lm_eval --model qwen_quant` cannot find ours: importing this module registers the name, and running it as a script
  starts lm_eval's command line after that.

Scoring follows lm_eval's Hugging Face model: a continuation's log-probability is the sum of the log-softmax of the
model's logits at its tokens (fp32, over every logit row, as evaluate.perplexity's cross-entropy); documents are
scored in lm_eval's rolling windows of max_length tokens after an <|endoftext|> prefix; generation is greedy
(QwenForCausalLM.generate) until a stop string, a stop id of the folder's tokenizer, or max_gen_toks.
"""
import difflib
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import resolve_model_path
from .config import QwenConfig, field_problems
from .model import QwenForCausalLM
from .tokenizer import ENDOFTEXT, IM_END, IM_START, MODEL_CONFIG, encode_chatml, load_tokenizer

MISSING_LM_EVAL = 'lm-evaluation-harness is not installed: pip install "qwen_quant[eval]"'
try:
    import lm_eval.models  # noqa: F401  lm_eval adds its own models only to an empty registry: they go in before ours
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as missing:
    if (missing.name or "").split(".")[0] != "lm_eval":
        raise
    raise RuntimeError(MISSING_LM_EVAL) from None

MODEL_NAME = "qwen_quant"
DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's Hugging Face model's
# A prompt written by lm_eval (its chat template, or a task's ChatML text) carries these markers as text; the model
# must see the control tokens it was trained on, as a Hugging Face tokenizer gives them.
CHATML_MARKERS = frozenset({ENDOFTEXT, IM_START, IM_END})
# encode_chatml's rendering, for lm_eval's record of the run and its request cache's key.
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class UntilReached(Exception):
    """Raised from generate's streamer when every reply of the batch has ended: generation ends there."""


class Replies:
    """generate's streamer for a batch: each row's new tokens, up to its first stop id or the token that completes
    one of the stop strings. A row that has ended is left out of what follows (the batch steps on for the others);
    when every row has ended, UntilReached ends generate."""

    def __init__(self, rows: int, until: Sequence[str], stop_ids: Sequence[int], decode):
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.running = set(range(rows))
        self.until, self.stop_ids, self.decode = until, stop_ids, decode

    def __call__(self, tokens: torch.Tensor) -> None:
        for row, token in enumerate(tokens.tolist()):
            if row in self.running:
                self.tokens[row].append(token)
                if token in self.stop_ids or any(stop in self.decode(self.tokens[row]) for stop in self.until):
                    self.running.discard(row)
        if not self.running:
            raise UntilReached

    def texts(self) -> list[str]:
        """Each row's reply: its tokens decoded without the stop id (generate keeps it) and cut at the stop string."""
        return [postprocess_generated_text(self.decode(new[:-1] if new and new[-1] in self.stop_ids else new),
                                           self.until, None) for new in self.tokens]


class QwenQuantLM(TemplateLM):
    """A checkpoint folder (full precision or GPTQ) or published name, run by QwenForCausalLM.

    model_args: pretrained (folder or name), backend (auto | torch | cpu | triton, for quantized linears), device,
    batch_size (requests per forward), max_length (tokens a forward sees; default and upper bound: the config's
    seq_length, within which padding a batch cannot change the dynamic-NTK factor), max_gen_toks (the default of
    generate_until's requests that name none; each request's must be below max_length), hub (where a published name
    comes from)."""

    def __init__(self, pretrained, backend: str = "auto", device=None, batch_size=1, max_length=None,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, hub: Optional[str] = None):
        super().__init__()
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"pretrained must be a model folder or published name, not {type(pretrained).__name__}")
        if isinstance(batch_size, str) and batch_size.isdecimal():  # lm_eval's --batch_size is text ("auto" too)
            batch_size = int(batch_size)
        sizes = SimpleNamespace(batch_size=batch_size, max_gen_toks=max_gen_toks,
                                max_length=1 if max_length is None else max_length)
        problems = field_problems(sizes, positive_ints=("batch_size", "max_gen_toks", "max_length"))
        if problems:
            raise ValueError(f"{MODEL_NAME} model_args: {'; '.join(problems)}")
        self.folder = resolve_model_path(pretrained, hub)
        seq_length = QwenConfig.from_file(self.folder / MODEL_CONFIG).seq_length
        self._max_length = seq_length if max_length is None else max_length
        if self._max_length > seq_length:
            raise ValueError(f"{MODEL_NAME} model_args: max_length {self._max_length} is past the model's seq_length "
                             f"({seq_length})")
        self.tokenizer = load_tokenizer(self.folder)
        if self.tokenizer is None:
            raise ValueError(f"{self.folder} has no text tokenizer (qwen.tiktoken or tokenizer.json): "
                             "lm-evaluation-harness tasks are text")
        self._batch_size, self._max_gen_toks = batch_size, max_gen_toks
        self.model = QwenForCausalLM.from_pretrained(self.folder, device=device, backend=backend)
        newline = self.tokenizer.encode("\n")
        self._turn_end = [self.tokenizer.im_end_id, *newline]  # what encode_chatml writes after each message

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.folder).replace("/", "__")

    def chat_template(self, chat_template=False) -> Optional[str]:
        return CHATML_TEMPLATE if chat_template else None

    def get_model_info(self) -> dict:
        quant = self.model.config.quantization_config
        return {"model_folder": str(self.folder), "dtype": str(self.model.dtype).removeprefix("torch."),
                "quantization": quant.to_dict() if quant is not None else None}

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """No BOS is ever added (add_special_tokens changes nothing); ChatML's markers in the text are their ids."""
        return self.tokenizer.encode(string, allowed_special=CHATML_MARKERS)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """encode_chatml's ChatML as text. Without add_generation_prompt the last message is left open, for the
        model to continue (lm_eval's assistant prefill)."""
        ids = encode_chatml(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and chat_history:
            ids = ids[:len(ids) - len(self._turn_end)]
        return self.tok_decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy?) of each (key, context ids, continuation ids), in request order. Longest
        first, batch_size at a time, right-padded: causal attention keeps the padding out of every scored position."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        scores = []
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm) as bar:
            for batch in order.get_batched(n=self.batch_size):
                scores += self._score_batch(batch)
                bar.update(len(batch))
        return order.get_original(scores)

    @torch.inference_mode()
    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        # The last max_length + 1 tokens of context + continuation: the model reads all but the last.
        inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in batch]
        for (_, _, continuation), tokens in zip(batch, inputs):
            if len(continuation) > len(tokens):
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit in max_length "
                                 f"{self.max_length}")
        ids = torch.full((len(batch), max(map(len, inputs))), self.eot_token_id, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, :len(tokens)] = torch.tensor(tokens)
        logits = self.model(ids.to(self.device))
        scores = []
        for row, ((key, _, continuation), tokens) in enumerate(zip(batch, inputs)):
            target = torch.tensor(continuation, dtype=torch.long, device=self.device)
            predicting = logits[row, len(tokens) - len(continuation):len(tokens)]
            logprob = float(predicting.log_softmax(-1).gather(-1, target[:, None]).sum())
            greedy = bool((self.model.sample(predicting, 0.0, None, None, None) == target).all())
            scores.append((logprob, greedy))
            if key is not None:  # rolling windows have none: loglikelihood_rolling caches whole documents
                self.cache_hook.add_partial("loglikelihood", key, (logprob, greedy))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-probability after an <|endoftext|> prefix, in lm_eval's windows of max_length: every
        token scored once; each window conditions on the token before it, the last one on a full max_length."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            pairs = get_rolling_token_windows(self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy replies in request order, batch_size requests to a generate call, as lm_eval's Hugging Face model
        batches them: grouped by generation kwargs, longest prompt first, left-padded."""
        order = Collator([request.args for request in requests], group_by="gen_kwargs", group_fn=lambda args: args[1],
                         sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]))
        replies = []
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for batch in order.get_batched(n=self.batch_size):
                contexts, all_gen_kwargs = zip(*batch)
                for args, reply in zip(batch, self._generate(contexts, all_gen_kwargs[0])):
                    self.cache_hook.add_partial("generate_until", args, reply)
                    replies.append(reply)
                bar.update(len(batch))
        return order.get_original(replies)

    def _generate(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
        """The replies to contexts sharing gen_kwargs, in one left-padded generate call. Prompts stay within
        max_length, itself within seq_length, so padding never changes the dynamic-NTK factor (generate's rule)."""
        max_gen_toks, until = self._generation_settings(gen_kwargs)
        # Each context's last tokens, leaving room for the reply within max_length.
        prompts = [self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
                   for context in contexts]
        ids, attention_mask = left_padded(prompts, self.eot_token_id)
        replies = Replies(len(prompts), until, self.tokenizer.stop_ids, self.tok_decode)
        try:
            self.model.generate(ids, max_gen_toks, stop_ids=self.tokenizer.stop_ids, streamer=replies,
                                attention_mask=attention_mask)
        except UntilReached:
            pass
        return replies.texts()

    def _generation_settings(self, gen_kwargs: dict) -> tuple[int, list[str]]:
        """(max_gen_toks, stop strings) of a request's generation kwargs; anything but greedy decoding is refused."""
        settings = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until, max_gen_toks = settings.pop("until"), settings.pop("max_gen_toks")
        if settings.pop("do_sample"):
            raise ValueError(f"generation kwargs {gen_kwargs}: {MODEL_NAME} decodes greedily only (do_sample false)")
        settings.pop("temperature", None)  # 0 whenever do_sample is false
        if settings:
            raise ValueError(f"generation kwargs {sorted(settings)} are not supported by {MODEL_NAME} "
                             "(until, max_gen_toks, do_sample false and temperature 0 are)")
        if not 0 < max_gen_toks < self.max_length:
            raise ValueError(f"max_gen_toks {max_gen_toks} must be in 1..max_length - 1 ({self.max_length - 1})")
        stops = [stop for stop in until if stop is not None]
        if not all(isinstance(stop, str) for stop in stops):
            raise ValueError(f"generation kwargs until={until!r} must be strings")
        return max_gen_toks, [stop for stop in stops if stop]  # "" would stop at once


def left_padded(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one [B, longest] batch padded on the left with pad_id, and its attention mask (1 = token)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return ids, attention_mask


model_registry.register(MODEL_NAME, target="qwen_quant.harness:QwenQuantLM")


def select_tasks(names: Sequence[str], include_path=None) -> "TaskManager":
    """lm_eval's task index holding every name (a task, group or tag, or a task's YAML file), each checked before
    any model is loaded. When every name is a task of include_path, that folder alone is indexed: lm_eval's own
    14,000 tasks take seconds to index (a group or tag may list them, so naming one reads them too)."""
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: no such folder")
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    for name in names:
        if name not in manager.all_tasks and not Path(name).is_file():
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            where = "lm-evaluation-harness's tasks" + (f" or {include_path}" if include_path is not None else "")
            raise ValueError(f"unknown task {name!r}: not a task, group or tag of {where}, nor a task YAML file"
                             + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + ("" if include_path is not None else "; local task files need --include-path DIR"))
    return manager


def evaluate_tasks(lm: QwenQuantLM, names: Sequence[str], manager: "TaskManager", limit: Optional[int] = None) -> dict:
    """lm_eval's results for the tasks (at most `limit` documents each)."""
    return simple_evaluate(model=lm, tasks=list(names), limit=limit, task_manager=manager, log_samples=False)


def task_table(model, names: Sequence[str], manager: "TaskManager", limit: Optional[int] = None, baseline=None,
               **model_args) -> str:
    """The tasks' metrics on `model`, beside `baseline`'s and the difference when a baseline is given. model_args
    go to QwenQuantLM for both; each model is released before the next loads."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its progress lines would bury the table
    results = evaluate_tasks(QwenQuantLM(model, **model_args), names, manager, limit)
    base = None if baseline is None else evaluate_tasks(QwenQuantLM(baseline, **model_args), names, manager, limit)
    return results_table(results, base)


def metric_rows(results: dict) -> list[tuple[str, str, int, float, Optional[float]]]:
    """(task, metric, documents, value, stderr or None) of every numeric metric of lm_eval's results."""
    rows = []
    for task, metrics in results["results"].items():
        documents = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            name, _, kind = key.partition(",")
            if not kind or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{kind}")
            label = name if kind == "none" else f"{name} ({kind})"
            rows.append((task, label, documents, value, stderr if isinstance(stderr, (int, float)) else None))
    return rows


def results_table(results: dict, baseline: Optional[dict] = None) -> str:
    """task | metric | n | value | stderr, then baseline and difference columns when a baseline's results are
    given (same tasks, same documents)."""
    rows = metric_rows(results)
    base = {(task, label): value for task, label, _, value, _ in metric_rows(baseline)} if baseline else {}
    task_width = max([4, *(len(row[0]) for row in rows)])
    metric_width = max([6, *(len(row[1]) for row in rows)])
    header = f"{'task':<{task_width}}  {'metric':<{metric_width}}  {'n':>5}  {'value':>12}  {'stderr':>10}"
    lines = [header + (f"  {'baseline':>12}  {'difference':>12}" if baseline else "")]
    for task, label, documents, value, stderr in rows:
        line = (f"{task:<{task_width}}  {label:<{metric_width}}  {documents if documents is not None else '':>5}  "
                f"{value:>12.4f}  {'' if stderr is None else f'{stderr:.4f}':>10}")
        if baseline:
            reference = base.get((task, label))
            line += (f"  {reference:>12.4f}  {value - reference:>+12.4f}" if reference is not None
                     else f"  {'':>12}  {'':>12}")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    """lm_eval's own command line, with --model qwen_quant known (registered above)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
