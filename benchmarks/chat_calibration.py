"""A ChatML calibration file (.jsonl of conversations, `qwen-quantize --dataset FILE.jsonl`) made from the shared
data: each WikiText-2 validation article's opening paragraph as the answer to "Tell me about TITLE.", and Tatoeba's
English-Chinese sentence pairs as four-turn translation chats, both directions; shuffled with seed 0.

    python benchmarks/chat_calibration.py OUT.jsonl
"""
import argparse
import json
import random
import re
from pathlib import Path

from common import shared_data_dir

TRANSLATION_TURNS = 4
TRANSLATION_CHATS = 1000


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    chats = conversations(shared_data_dir(), random.Random(0))
    with open(args.output, "w", encoding="utf-8") as out:
        for chat in chats:
            out.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
    print(f"{args.output}: {len(chats)} conversations")


if __name__ == "__main__":
    main()
