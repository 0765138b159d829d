"""Checkpoint files: finding a model folder (local, Hugging Face Hub, ModelScope), reading its weights tensor by
tensor with every header checked, writing safetensors shards, and copying the side files a published folder carries.

This module knows files, not the model: `loading` puts what it reads into one. Pickle checkpoints are refused unless
the caller opts in.
"""
import fnmatch
import hashlib
import json
import logging
import math
import os
import pickle
import reprlib
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

import torch

from .json_files import parse_json, read_json
from .published import find_published, published_names

log = logging.getLogger("qwen_quant")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Hugging Face's pickle weights: one file, or shards listed by an index, or (without one) shards named like this.
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SHARDS = "pytorch_model-*.bin"
# The files a reader of Qwen's published folders uses besides the weights: remote code and its kernels, tokenizers
# (Qwen's tiktoken, tokenizer.json of other models, llama2.c's tok512.bin), generation settings and the licenses,
# which must travel with derived weights (copied, never imported).
SIDE_FILES = ("*.py", "*.cu", "*.cpp", "qwen.tiktoken", "tokenizer_config.json", "tokenizer.json", "tok512.bin",
              "generation_config.json", "LICENSE*", "NOTICE*")
# What a published name downloads: config, weights, model card and the side files.
HUB_FILES = ["*.json", "*.safetensors", "*.md", "*.txt", *SIDE_FILES]
HUBS = ("huggingface", "modelscope")
HUB_ENV = "QWEN_QUANT_HUB"  # where published names come from when no hub is passed


def resolve_model_path(name_or_path, hub: Optional[str] = None) -> Path:
    """A local folder as is; a published name (`Qwen-14B-Chat`, `Qwen/Qwen-1_8B-Chat`, ...) from the Hugging Face Hub
    cache, or from ModelScope's when `hub` (default: $QWEN_QUANT_HUB, else huggingface) is "modelscope"."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    hub = hub or os.environ.get(HUB_ENV) or "huggingface"
    if hub not in HUBS:
        raise ValueError(f"hub {hub!r} (from the hub option or ${HUB_ENV}) is not one of {HUBS}")
    published = find_published(str(name_or_path))
    if published is None:
        raise FileNotFoundError(f"{name_or_path!r} is neither a local folder nor a published Qwen model; "
                                f"pass a folder holding config.json, or one of: {', '.join(published_names())}")
    if hub == "modelscope":
        return modelscope_snapshot(published.repo_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(published.repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, no such revision, no network: one clear message for all
        raise RuntimeError(f"could not download {published.repo_id} from the Hugging Face Hub ({type(e).__name__}: "
                           f"{e}). Download it elsewhere (huggingface-cli download {published.repo_id} "
                           f"--local-dir DIR) and pass the local folder DIR instead.") from None


def modelscope_snapshot(repo_id: str) -> Path:
    """The folder of `repo_id` in ModelScope's cache ($MODELSCOPE_CACHE), downloaded by the `modelscope` library
    when it is not cached yet."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise RuntimeError(f"{repo_id} from ModelScope needs the modelscope library: pip install "
                           "'qwen_quant[modelscope]' (or choose --hub huggingface)") from None
    try:  # a cached copy first: offline, the library would otherwise retry the network for seconds
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # modelscope's CacheNotFound: not cached yet
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, no such model, no network: one clear message for all
        raise RuntimeError(f"could not download {repo_id} from ModelScope ({type(e).__name__}: {e}). Download it "
                           f"elsewhere (modelscope download --model {repo_id} --local_dir DIR) and pass the local "
                           "folder DIR instead.") from None


class WeightReader:
    """Named tensors of a checkpoint folder: one model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, folder, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}  # tensor name -> file
        self._pickled: dict[str, torch.Tensor] = {}
        self._headers: dict[Path, dict] = {}
        # When set (a hashlib object), every tensor get() gives goes into it as it is read: the resume key of quantize.
        self.digest = None
        index = self.folder / INDEX_NAME
        if index.is_file():
            self.files = self._index_map(index, ".safetensors")
            for name, file in self.files.items():
                if name not in self._header(file):
                    raise ValueError(f"{index} puts tensor {name} in {file.name}, whose header does not hold it")
        elif (self.folder / SINGLE_NAME).is_file():
            self._index_file(self.folder / SINGLE_NAME)
        else:
            self._load_pickles(allow_pickle)

    def _index_entry(self, index: Path, name, file, suffix: str = ".safetensors") -> Path:
        """The weight file an index entry names, which must end with `suffix` and lie inside the model folder. Only
        the file itself may be a link (the Hugging Face cache links every file of a snapshot to its blobs/); the
        folders on the way may not."""
        relative = PurePosixPath(file) if isinstance(file, str) else None
        if (not isinstance(name, str) or relative is None or relative.is_absolute() or ".." in relative.parts
                or "\\" in file or not relative.name.endswith(suffix)):
            raise ValueError(f"{index}: weight_map entry {reprlib.repr(name)}: {reprlib.repr(file)} is not the name "
                             f"of a {suffix} file inside the model folder")
        path = self.folder / relative
        inside = self.folder.resolve() / relative.parent
        if path.parent.exists() and path.parent.resolve() != inside:
            raise ValueError(f"{index}: weight_map entry {name}: {file} leads out of the model folder through a link")
        return path

    def _index_file(self, file: Path) -> None:
        for name in self._header(file):
            self.files[name] = file

    def _header(self, file: Path) -> dict:
        """The safetensors header (name -> dtype, shape, byte range), checked against the file's size."""
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(file)
        return self._headers[file]

    def _index_map(self, index: Path, suffix: str) -> dict[str, Path]:
        """tensor name -> weight file of an index's weight_map, each file checked by _index_entry and present."""
        try:
            weight_map = read_json(index)["weight_map"]
        except (KeyError, TypeError) as e:  # no weight_map, or the file is not a JSON object
            raise ValueError(f"{index} is not a valid {suffix.lstrip('.')} weight index: {type(e).__name__} {e}") \
                from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be an object of tensor name -> file name")
        files = {name: self._index_entry(index, name, file, suffix) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index} lists {file.relative_to(self.folder)}, which is missing")
        return files

    def _pickle_files(self) -> list[Path]:
        """The pickle weights, by Hugging Face's names: pytorch_model.bin, else the shards its index lists, else
        pytorch_model-*.bin shards in name order. Other .bin files of a folder are no weights (tok512.bin,
        training_args.bin). The index only lists the files: each tensor is read from the file that holds it."""
        if (self.folder / PICKLE_NAME).is_file():
            return [self.folder / PICKLE_NAME]
        if (self.folder / PICKLE_INDEX_NAME).is_file():
            return sorted(set(self._index_map(self.folder / PICKLE_INDEX_NAME, ".bin").values()))
        return sorted(path for path in self.folder.glob(PICKLE_SHARDS) if path.is_file())

    def _load_pickles(self, allow_pickle: bool) -> None:
        pickles = self._pickle_files()
        if not pickles:
            raise FileNotFoundError(f"no weights in {self.folder}: expected {SINGLE_NAME} or {INDEX_NAME} (or, with "
                                    f"allow_pickle, {PICKLE_NAME}, {PICKLE_INDEX_NAME} or {PICKLE_SHARDS} shards)")
        if not allow_pickle:
            raise ValueError(f"{self.folder} holds only pickle weights ({pickles[0].name}); they can execute code "
                             "when loaded. Convert them to safetensors, or pass allow_pickle=True to load them "
                             "with torch.load(weights_only=True).")
        for file in pickles:
            try:  # mmap needs torch's zip format; a legacy (pre-1.6) file is read whole
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
                raise ValueError(f"cannot load {file} with torch.load(weights_only=True): {type(e).__name__} "
                                 f"{reprlib.repr(str(e).splitlines()[0] if str(e) else '')}") from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{file} does not hold a dict of tensor name -> tensor")
            for name, tensor in state.items():
                if name in self.files:
                    raise ValueError(f"tensor {name} is in both {self.files[name].name} and {file.name}")
                self._pickled[name] = tensor
                self.files[name] = file

    def names(self) -> list[str]:
        return list(self.files)

    @property
    def reads_are_copies(self) -> bool:
        """Whether get() gives the caller a tensor of its own (safetensors are read into fresh memory; pickled
        tensors are the reader's, mapped from their files)."""
        return not self._pickled

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple:
        """A tensor's shape from its file's header, without reading it."""
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        return tuple(self._header(self.files[name])[name]["shape"])

    def fingerprint(self) -> str:
        """A hash of every tensor's name, file, dtype, shape and byte range: changes when the weights' layout does."""
        entries = {name: [str(self._pickled[name].dtype), list(self._pickled[name].shape)] if name in self._pickled
                   else [file.name, self._header(file)[name]] for name, file in self.files.items()}
        return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()

    def get(self, name: str) -> torch.Tensor:
        if name in self._pickled:
            return self._hashed(name, self._pickled[name])
        if name not in self.files:
            raise KeyError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        file = self.files[name]
        info = self._header(file).get(name)
        if info is None:
            raise KeyError(f"tensor {name} is not in {file}, where the index says it is")
        # Plain reads into fresh memory rather than a memory map: mapped file pages would count in the process's
        # resident memory on top of the copy, doubling the peak of a load.
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        with open(file, "rb") as f:
            f.seek(info["data_start"] + begin)
            if tensor.numel() and f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"cannot read tensor {name} from {file}: the file ends early (truncated?)")
        return self._hashed(name, tensor)

    def _hashed(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """tensor, its name, dtype, shape and bytes added to self.digest when one is set."""
        if self.digest is not None:
            self.digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
            self.digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())
        return tensor


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def read_safetensors_header(file: Path) -> dict:
    """name -> {dtype, shape, data_offsets, data_start} of a .safetensors file, checked as the safetensors library
    checks it before anything is allocated: every size matches its shape, and the byte ranges tile the data exactly.
    Errors never quote the file's bytes (the file may not be a safetensors file at all)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if length is None or length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"cannot read {file}: not a valid safetensors file (its header length is missing or "
                             "larger than the file; is it truncated or corrupt?)")
        raw = f.read(length)
    try:
        header = parse_json(raw, "its header")
    except ValueError as e:  # not UTF-8, not JSON or nested too deeply: the reason, never the bytes
        raise ValueError(f"cannot read {file}: not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"cannot read {file}: not a valid safetensors file (its header is not a JSON object; is it "
                         "truncated or corrupt?)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{file}: __metadata__ must map names to strings")
    data_start, data_bytes = 8 + length, size - 8 - length
    for name, info in header.items():
        check_tensor_entry(file, name, info, data_bytes)
        info["data_start"] = data_start
    end = 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin = info["data_offsets"][0]
        if begin != end:
            raise ValueError(f"{file}: tensor {name} starts at byte {begin} of the data, where the tensor before it "
                             f"ends at {end} ({'overlap' if begin < end else 'gap'}; not a valid safetensors file)")
        end = info["data_offsets"][1]
    if end != data_bytes:
        raise ValueError(f"{file}: {data_bytes - end} bytes follow the last tensor (not a valid safetensors file)")
    return header


def check_tensor_entry(file: Path, name: str, info, data_bytes: int) -> None:
    def index(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
        raise ValueError(f"{file}: tensor {name} has unsupported dtype "
                         f"{reprlib.repr(info.get('dtype') if isinstance(info, dict) else info)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(index(d) for d in shape):
        raise ValueError(f"{file}: tensor {name} has shape {reprlib.repr(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(index(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ValueError(f"{file}: tensor {name} has data_offsets {reprlib.repr(offsets)}, not two non-negative "
                         "integers [begin, end] with begin <= end")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{file}: tensor {name} of shape {reprlib.repr(shape)} needs {nbytes} bytes of "
                         f"{info['dtype']}, but its data_offsets span {offsets[1] - offsets[0]}")
    if offsets[1] > data_bytes:
        raise ValueError(f"cannot read {file}: tensor {name} lies past the end of the file (is it truncated?)")


def write_shards(tensors: Iterable, folder, max_shard_bytes: int = 4 * 10**9, metadata: Optional[dict] = None) -> int:
    """Stream (name, tensor) pairs into model.safetensors, or model-0000i-of-0000n.safetensors plus the index,
    starting a new shard when the next tensor would pass max_shard_bytes. Returns the total bytes of tensors.

    Each tensor goes to disk as it arrives (the shard's header, which must come first, is written once the shard is
    complete), so only one tensor is in memory at a time."""
    folder = Path(folder)
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[list[str]] = []
    entries: dict[str, dict] = {}
    data = None
    total = 0

    def finish_shard():
        header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keeps the data 8-byte aligned, as safetensors writes it
        with open(folder / f"shard-{len(shards):05d}.tmp", "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            data.seek(0)
            shutil.copyfileobj(data, out, 16 * 2**20)
        data.close()
        shards.append(list(entries))
        entries.clear()

    try:
        for name, tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            if entries and data.tell() + size > max_shard_bytes:
                finish_shard()
            if not entries:
                data = tempfile.TemporaryFile(dir=folder)
            begin = data.tell()
            if size:
                data.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
            entries[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [begin, begin + size]}
            total += size
        if entries or not shards:
            if data is None:
                data = tempfile.TemporaryFile(dir=folder)
            finish_shard()
    finally:
        if data is not None:
            data.close()
    if len(shards) == 1:
        os.replace(folder / "shard-00000.tmp", folder / SINGLE_NAME)
        return total
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f"shard-{i:05d}.tmp", folder / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


def link_root(folder: Path) -> Path:
    """Where a link in `folder` may lead: inside the folder itself, or, for a snapshot of the Hugging Face cache
    (models--ORG--NAME/snapshots/REV, whose files are links to ../../blobs), inside its repository's cache."""
    root = folder.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def copy_side_files(src, dst) -> list[str]:
    """Copy the side files of src (SIDE_FILES) byte for byte into dst; returns their names.

    Never the weights, folders, or a link that leads outside the source folder; a file is copied, never imported
    or run."""
    src, dst = Path(src), Path(dst)
    root = link_root(src)
    copied = []
    for path in sorted(src.iterdir()):
        if not any(fnmatch.fnmatchcase(path.name, pattern) for pattern in SIDE_FILES):
            continue
        target = path.resolve()
        if target != root and root not in target.parents:
            log.warning("not copying %s: it is a link to %s, outside the model folder", path.name, target)
            continue
        if target.is_file():
            shutil.copyfile(target, dst / path.name)
            copied.append(path.name)
    return copied
