"""The output folder and the work folder beside it (OUTPUT.partial): what a run may replace or delete, one run at a
time per work folder, and resume keyed by content.

A run deletes only what this tool wrote: an existing output folder is replaced only when it is empty or a previous
output (config.json and our model card, nothing but files), and a work folder is cleared only when it holds
our lock or settings, and a failed run removes the work folder it made unless it holds a finished block to resume.
Each finished block is one file (its tensors, its layer reports, the key of the source content it was made from and
their checksum, committed by one rename), so a kill at any point resumes cleanly, and a damaged block file, or one
made from other source weights, is quantized again.
"""
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from .json_files import read_json

log = logging.getLogger("qwen_quant")
MODEL_CARD_MARK = "made with qwen_quant"  # in the first lines of every model card we write
LOCK_NAME = ".lock"
SETTINGS_NAME = "settings.json"


def is_previous_output(folder: Path) -> bool:
    """Empty, or what quantize() writes: config.json, our model card, and files only (no folders, no links)."""
    entries = list(folder.iterdir())
    if not entries:
        return True
    if any(e.is_symlink() or not e.is_file() for e in entries) or not (folder / "config.json").is_file():
        return False
    card = folder / "README.md"
    if not card.is_file():
        return False
    with open(card, encoding="utf-8", errors="replace") as f:
        return MODEL_CARD_MARK in f.read(4096)


def is_work_folder(folder: Path) -> bool:
    return not any(folder.iterdir()) or (folder / LOCK_NAME).is_file() or (folder / SETTINGS_NAME).is_file()


def check_output(output: Path, model_folder: Path, overwrite: bool) -> Path:
    """Check before the run everything about the output path that can be: returns the work folder beside it.

    The output and its work folder are never the input folder, one holding it, or the current folder; neither may be
    a file or a link; an existing output folder needs --overwrite and must be a previous output of this tool."""
    absolute = Path(os.path.abspath(output))
    if absolute == Path(os.path.abspath(".")):
        raise ValueError(f"output {output} is the current folder: name a new folder for the checkpoint "
                         f"(e.g. ./{model_folder.name}-Int4)")
    work = absolute.with_name(absolute.name + ".partial")
    model, cwd = model_folder.resolve(), Path.cwd().resolve()
    for path, what in ((absolute, "output"), (work, "work folder")):
        real = path.resolve()
        if real == model or real in model.parents:
            raise ValueError(f"{what} {path} is the input model folder or holds it: choose another --output")
        if real == cwd or real in cwd.parents:
            raise ValueError(f"{what} {path} is or holds the current folder: choose another --output")
        if path.is_symlink():
            raise ValueError(f"{what} {path} is a symbolic link: name a folder (links are never replaced)")
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{what} {path} is a file, not a folder: choose another --output")
    if absolute.is_dir():
        if not overwrite:
            raise FileExistsError(f"output folder {output} already exists: pass --overwrite to replace it")
        if not is_previous_output(absolute):
            raise FileExistsError(f"output folder {output} is not a previous output of qwen-quantize (those hold "
                                  "config.json, our README.md and files only): --overwrite replaces only "
                                  "those; choose another --output, or move the folder away yourself")
    if work.is_dir() and not is_work_folder(work):
        raise FileExistsError(f"{work} exists and is not a qwen-quantize work folder (no {LOCK_NAME} or "
                              f"{SETTINGS_NAME}): move it away, or choose another --output")
    return work


def write_atomic(write, path: Path) -> None:
    """write(tmp) then one rename: a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def block_digest(tensors: dict, metadata: dict) -> str:
    """A block file's checksum: its metadata (layer reports, source key), then its tensors' names, dtypes, shapes and
    bytes."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def finished_block_bytes(work: Path) -> int:
    """The disk that the finished blocks of a work folder hold (0 when there is none): what --resume reuses."""
    blocks = work / "blocks"
    return sum(f.stat().st_size for f in blocks.glob("block_*.safetensors")) if blocks.is_dir() else 0


class WorkFolder:
    """OUTPUT.partial: settings.json, blocks/block_NNNNN.safetensors and the export, locked for one run at a time.

    Used as a context: a run that fails removes the folders it made (this one and any above it) unless they hold a
    finished block, for --resume; it never removes a folder that was there before."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.resume = path, resume
        self.made = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
        path.mkdir(parents=True, exist_ok=True)  # the run's first write: a read-only location fails here, at once
        self._lock = open(path / LOCK_NAME, "a")
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise RuntimeError(f"{path} is in use by another qwen-quantize run (it holds the lock {LOCK_NAME}): "
                               "wait for it to finish, or choose another --output") from None
        if not resume:
            for entry in path.iterdir():  # ours (checked before the run) and locked: start over
                if entry.name != LOCK_NAME:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        (path / "blocks").mkdir(exist_ok=True)

    def __enter__(self) -> "WorkFolder":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None and self.made and not any(self.path.glob("blocks/block_*.safetensors")):
            shutil.rmtree(self.path, ignore_errors=True)  # ours and locked: nothing in it to resume
            for folder in self.made[1:]:  # empty unless something else wrote there meanwhile: then it stays
                try:
                    folder.rmdir()
                except OSError:
                    break
        self._lock.close()

    def saved_settings(self) -> Optional[dict]:
        """The settings a previous run recorded, or None when there are none or they cannot be read (with a warning:
        its finished blocks are then quantized again)."""
        file = self.path / SETTINGS_NAME
        if not file.is_file():
            return None
        try:
            saved = read_json(file)
            if not isinstance(saved, dict):
                raise ValueError(f"{file} is not a JSON object")
            return saved
        except ValueError as e:
            log.warning(f"{e}: the finished blocks in {self.path} cannot be matched to their settings and are "
                        "quantized again")
            return None

    def start(self, settings: dict) -> None:
        """Record the run's settings; a resumed run must have the same ones (inputs are compared by content)."""
        file = self.path / SETTINGS_NAME
        saved = self.saved_settings() if self.resume else None
        if saved is not None:
            changed = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
            if changed:
                raise ValueError(f"--resume: {self.path} was started with other settings or inputs ({', '.join(changed)} "
                                 f"differ; see {file}): run without --resume to start over")
        elif any((self.path / "blocks").iterdir()):  # blocks without the settings they were made with: start over
            shutil.rmtree(self.path / "blocks")
            (self.path / "blocks").mkdir()
        write_atomic(lambda p: p.write_text(json.dumps(settings, indent=2), encoding="utf-8"), file)

    def block_file(self, i: int) -> Path:
        return self.path / "blocks" / f"block_{i:05d}.safetensors"

    def save_block(self, i: int, tensors: dict, layers: list, source_key: str) -> None:
        """source_key: the content the block was made from (quantize.read_keyed)."""
        metadata = {"layers": json.dumps(layers), "source_key": source_key}
        metadata["sha256"] = block_digest(tensors, metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)  # written by Python: a full disk is an OSError
        write_atomic(lambda p: p.write_bytes(data), self.block_file(i))

    def load_block(self, i: int, source_key: str) -> Optional[tuple]:
        """(tensors, layer reports) of a finished block, or None when it is not done, its file is damaged, or it was
        made from other source content than source_key: then it and every later block are quantized again."""
        file = self.block_file(i)
        if not file.is_file():
            return None
        try:
            with safe_open(file, "pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            checksum = metadata.pop("sha256", None)
            if checksum != block_digest(tensors, metadata):
                raise ValueError("its checksum does not match its contents")
            layers = json.loads(metadata["layers"])
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            log.warning(f"{file} is damaged ({type(e).__name__}: {e}); block {i} is quantized again")
            file.unlink()
            return None
        if metadata.get("source_key") != source_key:
            later = [f for f in self.path.glob("blocks/block_*.safetensors") if f.name >= file.name]
            log.warning(f"the source weights of block {i} or of those before it (or the embedding) changed since "
                        f"{file} was made: blocks {i} to the last are quantized again")
            for stale in later:
                stale.unlink()
            return None
        return tensors, layers

    def publish(self, checkpoint: Path, output: Path, overwrite: bool) -> None:
        """Move the finished checkpoint to output (replacing a previous output), then remove the work folder."""
        if output.is_symlink() or output.exists():  # checked before the run; again, as it may have changed since
            if not (overwrite and output.is_dir() and not output.is_symlink() and is_previous_output(output)):
                raise FileExistsError(f"{output} appeared during the run and is not replaced; the finished "
                                      f"checkpoint is in {checkpoint}")
            shutil.rmtree(output)
        os.replace(checkpoint, output)
        shutil.rmtree(self.path)
        self._lock.close()


def filesystem_errors(function):
    """A full disk, a read-only location or a denied permission as one clear error, not a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RuntimeError(f"no space left on the device{f' writing {e.filename}' if e.filename else ''}: "
                                   "free some space and rerun with --resume (finished blocks wait in the work folder "
                                   "OUTPUT.partial beside the output)") from None
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise RuntimeError(f"cannot access {e.filename or 'a file'}: {e.strerror} (for the output, choose "
                                   "an --output in a writable location)") from None
            raise

    return wrapper
