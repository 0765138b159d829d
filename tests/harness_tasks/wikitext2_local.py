"""WikiText-2's raw test split as lm_eval documents, one per article, from the team's shared data (no download).

The file: `wikitext_file` (lm_eval --metadata '{"wikitext_file": PATH}'), else wikitext2/raw_test_nonempty_lines/
wiki.test.raw under $QWEN_QUANT_DATA, else under ../shared/data beside the checkout (where the tests find it).
"""
import os
import re
from pathlib import Path

import datasets

RAW_TEST = Path("wikitext2") / "raw_test_nonempty_lines" / "wiki.test.raw"
ARTICLE_TITLE = re.compile(r" = [^=].* = ")  # " = Robert Boulter = "; sections are " = = Career = = "


def default_file() -> Path:
    shared = os.environ.get("QWEN_QUANT_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
    return Path(shared) / RAW_TEST


def articles(wikitext_file=None, **_) -> datasets.DatasetDict:
    """{"test": documents {"page": text}}; lm_eval passes its metadata too, which is not ours to read."""
    path = Path(wikitext_file) if wikitext_file else default_file()
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 test text not found at {path}: set QWEN_QUANT_DATA to the shared data "
                                "folder, or pass --metadata '{\"wikitext_file\": PATH}'")
    pages: list[str] = []
    for line in path.read_text(encoding="utf-8").replace("\r\n", "\n").splitlines(keepends=True):
        if ARTICLE_TITLE.fullmatch(line.rstrip("\n")) or not pages:
            pages.append(line)
        else:
            pages[-1] += line
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": pages})})
