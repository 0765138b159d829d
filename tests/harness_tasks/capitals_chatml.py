"""The questions of capitals_chatml.yaml and capitals_choice.yaml: capitals_chatml.jsonl beside this file, read by
the datasets json loader."""
import json
from pathlib import Path

import datasets

QUESTIONS = Path(__file__).with_name("capitals_chatml.jsonl")


def load(**_) -> datasets.DatasetDict:
    """{"test": {"country", "capital"} rows}; lm_eval passes its metadata, which is not ours to read."""
    return datasets.load_dataset("json", data_files={"test": str(QUESTIONS)})


def process_results(doc: dict, results: list) -> dict:
    (reply,) = results
    return {"names_capital": float(doc["capital"].lower() in reply.lower())}


def choices(doc: dict) -> list[str]:
    """Every capital of the file, in its order: the same choices for every question."""
    return [json.loads(line)["capital"] for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]
