"""A chat check people can read: a quantized model's greedy ChatML answers beside its full-precision model's.

Perplexity misses the failure users report most of quantized chat models: the answer is right, but the model no longer
emits its end-of-turn token (`<|im_end|>`) and rambles on to the token budget. compare() asks both models the short
factual questions of chat_prompts.jsonl (English and Chinese, each with its answer's key words) and reports for each
the two answers, whether each stopped at a stop id within the budget and whether they agree; format_report() is the
table `qwen-quantize eval QUANTIZED --chat --baseline FULL_PRECISION` prints. The quantized model is measured against
the full-precision one, not against the truth: a question the full-precision model gets wrong still shows whether the
quantized model answers and stops as it does.

Greedy answers drift apart after one different token, and a drifted answer may end elsewhere for that reason alone. So
the quantized model also reads full precision's own answer (teacher forcing): where full precision ended its turn, is
the end of turn the quantized model's top token too? That isolates the lost end-of-turn logit from drift, and the
mean KL divergence of the two models' next-token distributions over that answer measures how far the quantized model
strays in chat at all (llama.cpp's KLD measure, on conversations instead of text).
"""
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .calibration import json_list, json_type, string_fields
from .config import is_int
from .json_files import parse_json
from .tokenizer import encode_chatml, load_tokenizer

PROMPTS_FILE = Path(__file__).with_name("chat_prompts.jsonl")
DEFAULT_MAX_NEW_TOKENS = 64
# Full precision ends its turn decisively where its end-of-turn log-probability beats the next token's by this many
# nats. Below it the choice is close to a coin flip that any 4-bit export may turn (their mean KL from full precision
# is 0.1-0.6 nats a token on SmolLM2): on the shipped prompts SmolLM2's margins are 0.2-0.7 or 1.6-3.3 nats.
DECISIVE_MARGIN = 1.5
# Table widths in terminal columns (a CJK character takes two).
PROMPT_COLUMNS, ANSWER_COLUMNS = 34, 40


@dataclass
class ChatPrompt:
    messages: list  # [{"role", "content"}], rendered with the assistant header after them
    expect: list  # key words: an answer holding any one of them (ignoring case) has the expected answer
    source: str  # where it came from, for error messages: "file:line" or "prompts[i]"


@dataclass
class Answer:
    text: str  # the new tokens decoded, the stop id left out
    tokens: int  # new tokens generated, the stop id included
    stopped: bool  # ended at a stop id within the budget
    expected: bool  # holds one of the prompt's key words
    ids: list = field(default_factory=list, repr=False)  # the new token ids, the stop id included


@dataclass
class ChatRow:
    prompt: ChatPrompt
    full_precision: Answer
    quantized: Answer
    # Teacher-forced on full precision's answer: whether the quantized model's top token where full precision ended
    # its turn is a stop id, and full precision's margin there (its stop id's log-probability minus the best other
    # token's; both None where full precision did not stop); KL(full precision || quantized) summed over the
    # answer's tokens (nats).
    ends_turn_on_full_precision_answer: Optional[bool] = None
    full_precision_end_margin: Optional[float] = None
    kl_sum: float = 0.0

    @property
    def decisive_end(self) -> bool:
        return self.full_precision_end_margin is not None and self.full_precision_end_margin >= DECISIVE_MARGIN

    @property
    def agree(self) -> bool:
        """The same text, or both holding the expected key word (two right answers worded differently agree)."""
        return (self.full_precision.text.strip() == self.quantized.text.strip()
                or self.full_precision.expected and self.quantized.expected)

    @property
    def missed_stop(self) -> bool:
        """The failure this check is for: full precision ended its turn, the quantized model ran to the budget."""
        return self.full_precision.stopped and not self.quantized.stopped


@dataclass
class ChatReport:
    rows: list  # ChatRow per prompt, in order
    max_new_tokens: int

    @property
    def agreements(self) -> int:
        return sum(row.agree for row in self.rows)

    @property
    def full_precision_stops(self) -> int:
        return sum(row.full_precision.stopped for row in self.rows)

    @property
    def quantized_stops(self) -> int:
        return sum(row.quantized.stopped for row in self.rows)

    @property
    def missed_stops(self) -> list:
        """Numbers (from 1) of the prompts where full precision stopped and the quantized model did not."""
        return [number for number, row in enumerate(self.rows, start=1) if row.missed_stop]

    @property
    def stops_where_full_precision_stops(self) -> bool:
        return not self.missed_stops

    @property
    def ends_on_full_precision_answers(self) -> int:
        return sum(bool(row.ends_turn_on_full_precision_answer) for row in self.rows)

    @property
    def missed_ends_on_full_precision_answers(self) -> list:
        """Numbers of the prompts where full precision ended its turn and, reading its answer, the quantized model's
        top token there is not a stop id."""
        return [number for number, row in enumerate(self.rows, start=1)
                if row.ends_turn_on_full_precision_answer is False]

    @property
    def decisive_ends(self) -> int:
        return sum(row.decisive_end for row in self.rows)

    @property
    def missed_decisive_ends(self) -> list:
        """missed_ends_on_full_precision_answers where full precision ended its turn decisively (DECISIVE_MARGIN)."""
        return [number for number, row in enumerate(self.rows, start=1)
                if row.decisive_end and row.ends_turn_on_full_precision_answer is False]

    @property
    def decisive_ends_kept(self) -> int:
        return self.decisive_ends - len(self.missed_decisive_ends)

    @property
    def mean_kl(self) -> float:
        """KL(full precision || quantized) per token of full precision's answers, nats."""
        return sum(row.kl_sum for row in self.rows) / sum(row.full_precision.tokens for row in self.rows)


def chat_prompt(record, source: str) -> ChatPrompt:
    """{"messages": [{"role", "content"}, ...], "expect": ["key word", ...]} -> ChatPrompt; anything else is a
    ValueError naming `source` and what is wrong."""
    try:
        if not isinstance(record, dict):
            raise ValueError(f"a chat prompt must be a JSON object, got {json_type(record)}")
        for key in ("messages", "expect"):
            if key not in record:
                raise ValueError(f"a chat prompt needs the key {key!r}")
        messages = [dict(zip(("role", "content"), string_fields(message, index, ("role", "content"))))
                    for index, message in enumerate(json_list(record, "messages"))]
        if not messages:
            raise ValueError("'messages' is empty: a chat prompt needs at least the user's question")
        expect = record["expect"]
        if not (isinstance(expect, list) and expect and all(isinstance(word, str) and word.strip() for word in expect)):
            raise ValueError("'expect' must be a non-empty list of non-empty strings (the answer's key words)")
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return ChatPrompt(messages, expect, source)


def load_prompts(path: Union[str, Path] = PROMPTS_FILE) -> list:
    """The ChatPrompts of a .jsonl file, one a line (blank lines skipped); a bad line is a ValueError naming
    file:line."""
    path = Path(path)
    prompts = [chat_prompt(parse_json(line, f"{path}:{line_no}"), f"{path}:{line_no}")
               for line_no, line in enumerate(path.read_bytes().splitlines(), start=1) if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no chat prompts")
    return prompts


def checked_prompts(prompts: Optional[Sequence]) -> list:
    """None: the shipped prompts; else ChatPrompts or {"messages", "expect"} dicts, the dicts checked by chat_prompt's
    rule."""
    if prompts is None:
        return load_prompts()
    if isinstance(prompts, (str, bytes, dict)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of chat prompts, got {type(prompts).__name__}")
    return [prompt if isinstance(prompt, ChatPrompt) else chat_prompt(prompt, f"prompts[{index}]")
            for index, prompt in enumerate(prompts)]


def rendered(prompt: ChatPrompt, tokenizer) -> list:
    """The prompt's ChatML ids, ending in the assistant header the answer follows."""
    try:
        return encode_chatml(tokenizer, prompt.messages, add_generation_prompt=True)
    except ValueError as err:
        raise ValueError(f"{prompt.source}: {err}") from None


def chat_tokenizer(folder: Union[str, Path]):
    """The tokenizer of a model folder, which the chat check cannot do without."""
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise FileNotFoundError(f"{folder} holds no tokenizer (qwen.tiktoken or tokenizer.json): the chat check "
                                "needs one to write its questions and read the answers")
    return tokenizer


def check_arguments(full_precision_model, quantized_model, tokenizer, max_new_tokens) -> None:
    if tokenizer is None:
        raise TypeError("compare needs the models' tokenizer (qwen_quant.tokenizer.load_tokenizer(folder)), got None")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
    vocab = {model.config.vocab_size for model in (full_precision_model, quantized_model)}
    if len(vocab) > 1:
        raise ValueError(f"the two models have different vocabularies (vocab_size {sorted(vocab)}): the quantized "
                         "model must come from the full-precision one")


def greedy_answer(model, tokenizer, prompt_ids: list, max_new_tokens: int, expect: list) -> Answer:
    new = model.generate(prompt_ids, max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids)[0, len(prompt_ids):]
    new = new.tolist()
    stopped = bool(new) and new[-1] in tokenizer.stop_ids  # generation ends at the first stop id
    text = tokenizer.decode(new[:-1] if stopped else new)
    return Answer(text, len(new), stopped, any(word.casefold() in text.casefold() for word in expect), new)


def log_probs(model, ids: list) -> torch.Tensor:
    """fp32 log-probabilities [len(ids), vocab rows] of each next token."""
    return model(torch.tensor([ids], device=model.device)).float().log_softmax(-1)[0]


def teacher_forced(full_precision_model, quantized_model, tokenizer, prompt_ids: list, answer: Answer) -> tuple:
    """(ends_turn_on_full_precision_answer, full_precision_end_margin, kl_sum) of a ChatRow: both models read the
    prompt and full precision's answer in one forward each."""
    ids = prompt_ids + answer.ids
    predicting = slice(len(prompt_ids) - 1, len(ids) - 1)  # the positions whose next token is the answer's
    full, quantized = (log_probs(model, ids)[predicting] for model in (full_precision_model, quantized_model))
    kl_sum = float((full.exp() * (full - quantized)).sum())
    if not answer.stopped:
        return None, None, kl_sum
    others = full[-1].clone()
    others[answer.ids[-1]] = -math.inf
    margin = float(full[-1, answer.ids[-1]] - others.max())
    return int(quantized[-1].argmax()) in tokenizer.stop_ids, margin, kl_sum


def compare(full_precision_model, quantized_model, tokenizer, prompts: Optional[Sequence] = None,
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True) -> ChatReport:
    """Greedy answers of both models to each prompt (the shipped chat_prompts.jsonl when None), at most
    max_new_tokens new tokens each, stopping at the tokenizer's stop ids. Every prompt is checked and rendered before
    the first answer is generated."""
    check_arguments(full_precision_model, quantized_model, tokenizer, max_new_tokens)
    prompts = checked_prompts(prompts)
    inputs = [rendered(prompt, tokenizer) for prompt in prompts]
    rows = []
    with torch.no_grad():
        for prompt, ids in tqdm(list(zip(prompts, inputs)), desc="chat check", unit="prompt", disable=not progress):
            answers = [greedy_answer(model, tokenizer, ids, max_new_tokens, prompt.expect)
                       for model in (full_precision_model, quantized_model)]
            rows.append(ChatRow(prompt, *answers, *teacher_forced(full_precision_model, quantized_model, tokenizer,
                                                                  ids, answers[0])))
    return ChatReport(rows, max_new_tokens)


def columns(text: str) -> int:
    """Terminal columns of `text`: East Asian wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def cell(text: str, width: int) -> str:
    """`text` on one line (white space runs as one space), cut to `width` columns with "…", padded to them."""
    text = " ".join(text.split())
    if columns(text) > width:
        while columns(text) > width - 1:
            text = text[:-1]
        text += "…"
    return text + " " * (width - columns(text))


def stop_cell(answer: Answer) -> str:
    return f"{'yes' if answer.stopped else 'no'} {answer.tokens}"


def question(prompt: ChatPrompt) -> str:
    return prompt.messages[-1]["content"]


def prompt_numbers(numbers: list) -> str:
    return f"prompt{'s' * (len(numbers) > 1)} {', '.join(map(str, numbers))}"


def format_report(report: ChatReport) -> str:
    """The report as a table (a row per prompt), the totals, then in full the answers that disagree or miss a stop."""
    header = (f"{'#':>3}  {cell('prompt', PROMPT_COLUMNS)}  {cell('full precision', ANSWER_COLUMNS)}  {'stop':<6}  "
              f"{cell('quantized', ANSWER_COLUMNS)}  {'stop':<6}  agree")
    lines = [header, "-" * columns(header)]
    for number, row in enumerate(report.rows, start=1):
        fp, q = row.full_precision, row.quantized
        lines.append(f"{number:>3}  {cell(question(row.prompt), PROMPT_COLUMNS)}  {cell(fp.text, ANSWER_COLUMNS)}  "
                     f"{stop_cell(fp):<6}  {cell(q.text, ANSWER_COLUMNS)}  {stop_cell(q):<6}  "
                     f"{'yes' if row.agree else 'no'}{'  <- never stops' if row.missed_stop else ''}")
    total = len(report.rows)
    lines += ["", "stop: yes/no = ended at a stop id within the budget, then the new tokens generated",
              f"agree: {report.agreements}/{total} prompts (the same answer, or both holding its expected words)",
              f"stopped within {report.max_new_tokens} new tokens: full precision "
              f"{report.full_precision_stops}/{total}, quantized {report.quantized_stops}/{total}"]
    missed = report.missed_stops
    lines.append("stops wherever full precision stops: " + (
        "yes" if not missed else f"NO - the quantized model runs to the budget where full precision stopped, on "
                                 f"{prompt_numbers(missed)}"))
    missed_ends = report.missed_ends_on_full_precision_answers
    lines += ["reading full precision's answers: the quantized model's top token is the end of turn where full "
              f"precision's is on {report.ends_on_full_precision_answers}/{report.full_precision_stops}"
              + (f" (not on {prompt_numbers(missed_ends)})" if missed_ends else ""),
              f"  where full precision ends its turn decisively (by {DECISIVE_MARGIN:g} nats or more): "
              f"{report.decisive_ends_kept}/{report.decisive_ends}",
              f"mean KL(full precision || quantized) per answer token: {report.mean_kl:.4f} nats"]
    listed = [(number, row) for number, row in enumerate(report.rows, start=1) if not row.agree or row.missed_stop]
    if listed:
        lines += ["", "answers that disagree or miss a stop, in full:"]
    for number, row in listed:
        lines += [f"{number:>3}  {question(row.prompt)}", f"     full precision: {row.full_precision.text!r}",
                  f"     quantized:      {row.quantized.text!r}"]
    return "\n".join(lines)
