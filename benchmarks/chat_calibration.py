"""A ChatML calibration file (.jsonl of conversations, `qwen-quantize --dataset FILE.jsonl`) made from the shared
data: each WikiText-2 validation article's opening paragraph as the answer to "Tell me about TITLE.", and Tatoeba's
English-Chinese sentence pairs as four-turn translation chats, both directions; shuffled with seed 0.

    python benchmarks/chat_calibration.py OUT.jsonl [--mixed OUT.npy --tokenizer MODEL]

--mixed also writes [16, 512] calibration windows (a .npy for --dataset, used as is): 8 random windows of SmolLM2's
WikiText-2 validation ids and 8 of the conversations rendered as ChatML by MODEL's tokenizer (seed 0).
"""
import argparse
import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from common import shared_data_dir
from qwen_quant.calibration import encode_chat_jsonl, random_windows
from qwen_quant.tokenizer import load_tokenizer

TRANSLATION_TURNS = 4
TRANSLATION_CHATS = 1000
MIXED_WINDOWS, MIXED_SEQLEN = 8, 512  # of each source


def detokenized(line: str) -> str:
    """WikiText's tokenized text (" @-@ ", " , ") as plain prose."""
    for joined, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        line = line.replace(joined, plain)
    line = re.sub(r" ([,.;:!?)'])", r"\1", line)
    return line.replace("( ", "(").replace(" 's", "'s").strip()


def article_openings(path: Path) -> list:
    """(title, first paragraph) of each top-level article (" = Title = ") of a WikiText file."""
    articles, title = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        heading = re.fullmatch(r" = ([^=].*[^=]) = ", line)
        if heading:
            title = detokenized(heading.group(1))
        elif title and line.strip() and not line.strip().startswith("="):
            articles.append((title, detokenized(line)))
            title = None
    return articles


def translation_pairs(path: Path) -> list:
    """(English, Chinese) of Tatoeba's tab-separated file (a BOM first; a third column of attribution)."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [tuple(line.split("\t")[:2]) for line in lines if line.strip()]


def conversations(data: Path, rng: random.Random) -> list:
    chats = [[{"role": "user", "content": f"Tell me about {title}."}, {"role": "assistant", "content": opening}]
             for title, opening in article_openings(data / "wikitext2" / "tokenized_v1" / "valid.txt")]
    pairs = translation_pairs(data / "calib_zh" / "tatoeba_cmn_eng" / "cmn.txt")
    rng.shuffle(pairs)
    for start in range(0, TRANSLATION_CHATS * TRANSLATION_TURNS, TRANSLATION_TURNS):
        chat = []
        for english, chinese in pairs[start:start + TRANSLATION_TURNS]:
            if rng.random() < 0.5:
                chat += [{"role": "user", "content": f"Translate into Chinese: {english}"},
                         {"role": "assistant", "content": chinese}]
            else:
                chat += [{"role": "user", "content": f"把这句话翻译成英文：{chinese}"},
                         {"role": "assistant", "content": english}]
        chats.append(chat)
    rng.shuffle(chats)
    return chats


def write_conversations(path: Path, data: Path) -> int:
    """The conversations (seed 0) as a ChatML .jsonl for --dataset; returns how many."""
    chats = conversations(data, random.Random(0))
    with open(path, "w", encoding="utf-8") as out:
        for chat in chats:
            out.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
    return len(chats)


def mixed_windows(data: Path, chats: Path, model: Path) -> np.ndarray:
    """MIXED_WINDOWS windows of WikiText-2 validation ids, then as many of the conversations in ChatML."""
    wikitext = torch.from_numpy(np.load(data / "smollm2_135m" / "calib_wikitext2_valid_ids.npy").astype(np.int64))
    rendered = torch.tensor(encode_chat_jsonl(chats, load_tokenizer(model)))
    generator = torch.Generator().manual_seed(0)
    return torch.cat([random_windows(wikitext, MIXED_WINDOWS, MIXED_SEQLEN, generator, "WikiText-2 validation"),
                      random_windows(rendered, MIXED_WINDOWS, MIXED_SEQLEN, generator, str(chats))]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--mixed", type=Path, help="also write text + conversation windows to this .npy")
    parser.add_argument("--tokenizer", type=Path, help="with --mixed: the model folder whose tokenizer renders them")
    args = parser.parse_args()
    if args.mixed and not args.tokenizer:
        parser.error("--mixed needs --tokenizer MODEL")
    data = shared_data_dir()
    print(f"{args.output}: {write_conversations(args.output, data)} conversations")
    if args.mixed:
        np.save(args.mixed, mixed_windows(data, args.output, args.tokenizer))
        print(f"{args.mixed}: {MIXED_WINDOWS} WikiText + {MIXED_WINDOWS} conversation windows of {MIXED_SEQLEN}")


if __name__ == "__main__":
    main()
