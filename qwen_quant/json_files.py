"""Reading JSON that comes from a user's files: one parser for config.json, generation_config.json, the safetensors
index and header, .jsonl calibration lines and our own work files.

Every failure is a ValueError that names the source and what is wrong with it, never a quote of its bytes: a file that
is not UTF-8, is not JSON, nests deeper than Python's parser recurses (RecursionError), or is larger than any such file
we read should be (checked before it is read).
"""
import json
from pathlib import Path
from typing import Union

MAX_JSON_BYTES = 64 * 2**20  # config, generation config and index files are kilobytes; Qwen's tokenizer.json 7 MB


def parse_json(raw: Union[bytes, str], source: str):
    """The JSON value of `raw` (bytes are decoded as UTF-8, a leading BOM dropped); a ValueError naming `source`."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source} is not UTF-8 text (byte {e.start} cannot be decoded): is it a JSON file?") \
                from None
    try:
        return json.loads(raw.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from None
    except ValueError as e:  # Python's limit on the digits of an integer it converts
        raise ValueError(f"{source} holds a number of more digits than Python converts ({e.args[0][:40]}...)") \
            from None
    except RecursionError:
        raise ValueError(f"{source} nests its JSON arrays or objects too deeply to be read") from None


def read_json(path: Union[str, Path], max_bytes: int = MAX_JSON_BYTES):
    """The JSON value of the file at `path`, refused unread when it is larger than max_bytes."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes, larger than the {max_bytes} a JSON file of a model folder may be")
    return parse_json(path.read_bytes(), str(path))
