"""Hostile files and unlucky faults on the file-system side: the model folder is a boundary, headers are checked before
anything is allocated, --overwrite deletes only our own outputs, resume is keyed by content and survives a kill at
any point, and file-system failures are clear errors."""
import errno
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen_quant import QwenForCausalLM
from qwen_quant.checkpoint import INDEX_NAME, WeightReader, read_safetensors_header, write_shards
from qwen_quant.cli import main
from qwen_quant.output_folder import WorkFolder
from qwen_quant.quantize import quantize
from qwen_quant.synthetic import random_tensors, save_random_checkpoint
from tiny_model import tiny_config

quantize_module = importlib.import_module("qwen_quant.quantize")
SECRET = "TOP-SECRET-CONTENT"
RTN = dict(method="rtn", group_size=32, progress=False)


@pytest.fixture
def tiny(tmp_path):
    return save_random_checkpoint(tmp_path / "fp", tiny_config())


def tree_digest(folder) -> str:
    """Names and bytes of everything under folder (links as their targets' names), to show nothing changed."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            digest.update(path.encode())
            if os.path.islink(path):
                digest.update(os.readlink(path).encode())
            elif os.path.isfile(path):
                digest.update(open(path, "rb").read())
    return digest.hexdigest()


# Rule 1: every file an index names lies inside the model folder; only a weight file itself may be a link.

def sharded(tmp_path):
    """A sharded checkpoint; returns its folder and the index's weight_map."""
    folder = tmp_path / "model"
    config = tiny_config(num_hidden_layers=1)
    save_random_checkpoint(folder, config, max_shard_bytes=150_000)
    index = json.loads((folder / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    return folder, index


def random_index_path(rng: random.Random, tmp_path, folder):
    """(path for the index, whether it stays inside the folder), drawn from the ways an entry can lead out or not."""
    outside = tmp_path / "outside"
    depth = rng.randint(0, 2)
    inner = "/".join(rng.choice(["sub", "deep", "x.y"]) for _ in range(depth))
    name = rng.choice(["w.safetensors", "model-00009.safetensors"])
    kind = rng.choice(["inside", "dot", "dotdot", "dotdot-deep", "absolute", "linked-folder", "linked-file",
                       "not-safetensors", "backslash"])
    rel = f"{inner}/{name}" if inner else name
    if kind == "inside":
        return rel, True
    if kind == "dot":
        return f"./{rel}", True
    if kind == "dotdot":
        return f"../outside/{name}", False
    if kind == "dotdot-deep":  # normalises to a path inside, but walks out on the way: refused all the same
        return f"{inner or 'sub'}/../{name}", False
    if kind == "absolute":
        return str(outside / name), False
    if kind == "linked-folder":  # a folder inside that is a link to one outside
        link = folder / f"link{rng.randint(0, 99)}"
        if not link.is_symlink():
            link.symlink_to(outside, target_is_directory=True)
        return f"{link.name}/{name}", False
    if kind == "linked-file":  # the weight file itself a link, as in the Hugging Face cache: allowed
        return f"{rel}", "link"
    if kind == "not-safetensors":
        return rng.choice(["config.json", "../../etc/passwd", "model.safetensors.index.json"]), False
    return f"sub\\{name}", False


def test_index_entries_must_stay_inside_the_model_folder(tmp_path):
    """Generated index entries: those leading out are refused naming the index and entry, and never read; those
    inside (or a weight file that is itself a link) load the very tensor."""
    folder, index = sharded(tmp_path)
    (tmp_path / "outside").mkdir()
    second = sorted(set(index["weight_map"].values()))[-1]
    moved = [n for n, f in index["weight_map"].items() if f == second]
    expected = {n: t for n, t in random_tensors(tiny_config(num_hidden_layers=1), torch.float32) if n in moved}
    rng = random.Random(8)
    kinds = set()
    for case in range(40):
        path, inside = random_index_path(rng, tmp_path, folder)
        # Put the real shard wherever the entry points, so that following a bad entry would succeed silently.
        for target in {folder / path.replace("\\", "/"), tmp_path / "outside" / path.rsplit("/", 1)[-1]}:
            if "etc/passwd" not in str(target) and not target.name.endswith(".json"):
                target.parent.mkdir(parents=True, exist_ok=True)
                if inside == "link":
                    stored = tmp_path / "blobs" / f"blob{case}"
                    stored.parent.mkdir(exist_ok=True)
                    stored.write_bytes((folder / second).read_bytes())
                    target.unlink(missing_ok=True)
                    target.symlink_to(stored)
                elif not target.is_symlink() and not target.parent.is_symlink():
                    target.write_bytes((folder / second).read_bytes())
        (tmp_path / "outside" / "secret.txt").write_text(SECRET)
        weight_map = {n: (path if n in moved else f) for n, f in index["weight_map"].items()}
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        kinds.add(inside)
        if inside:
            reader = WeightReader(folder)
            assert all(torch.equal(reader.get(n), expected[n]) for n in moved), path
        else:
            with pytest.raises(ValueError, match="weight_map entry") as e:
                WeightReader(folder)
            assert INDEX_NAME in str(e.value) and moved[0] in str(e.value) and SECRET not in str(e.value), path
    assert kinds == {True, False, "link"}


def test_errors_never_quote_a_file_that_is_not_safetensors(tmp_path):
    folder = save_random_checkpoint(tmp_path / "model", tiny_config())
    (folder / "model.safetensors").write_text(SECRET * 100)
    with pytest.raises(ValueError, match="not a valid safetensors file") as e:
        QwenForCausalLM.from_pretrained(folder)
    assert SECRET not in str(e.value) and str(len(SECRET * 100)) not in str(e.value)


# Rule 2 (headers): checked as the safetensors library checks them, before anything is allocated.

F32 = "F32"
HEADER_CASES = {
    "negative offset": ({"a": {"dtype": F32, "shape": [2], "data_offsets": [-8, 0]}}, 8, "data_offsets"),
    "begin after end": ({"a": {"dtype": F32, "shape": [0], "data_offsets": [8, 0]}}, 8, "data_offsets"),
    "overlap": ({"a": {"dtype": F32, "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": F32, "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
    "gap": ({"a": {"dtype": F32, "shape": [1], "data_offsets": [0, 4]},
             "b": {"dtype": F32, "shape": [1], "data_offsets": [8, 12]}}, 12, "gap"),
    "size not the shape's": ({"a": {"dtype": F32, "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12 bytes"),
    "4 TiB shape": ({"a": {"dtype": F32, "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}, 8,
                    "past the end of the file"),
    "negative dimension": ({"a": {"dtype": F32, "shape": [-2], "data_offsets": [0, 0]}}, 0, "shape"),
    "float dimension": ({"a": {"dtype": F32, "shape": [2.0], "data_offsets": [0, 8]}}, 8, "shape"),
    "bool offset": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1, "data_offsets"),
    "trailing bytes": ({"a": {"dtype": F32, "shape": [1], "data_offsets": [0, 4]}}, 12, "follow the last tensor"),
    "unknown dtype": ({"a": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}, 1, "dtype"),
    "not an object": ([1, 2], 0, "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_safetensors_headers_are_refused_like_the_library_does(tmp_path, case):
    entries, data_len, message = HEADER_CASES[case]
    file = tmp_path / "bad.safetensors"
    header = json.dumps(entries).encode()
    file.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_len))
    with pytest.raises(Exception):  # the reference library refuses the same file
        with safe_open(file, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(ValueError, match=message) as e:
        read_safetensors_header(file)
    assert str(file) in str(e.value)


def test_valid_headers_with_empty_tensors_and_metadata_are_read(tmp_path):
    tensors = {"a": torch.zeros(0), "b": torch.arange(6, dtype=torch.int16).view(2, 3), "c": torch.zeros(2, 0)}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "ok.safetensors")
    assert {n: info["shape"] for n, info in header.items()} == {"a": [0], "b": [2, 3], "c": [2, 0]}


def test_header_length_larger_than_the_file_is_refused(tmp_path):
    file = tmp_path / "huge.safetensors"
    file.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        read_safetensors_header(file)


# Rule 3 of the findings: the checkpoint's names and shapes against the config, before any long work.

def write_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_blocks_beyond_the_config_are_named(tmp_path):
    folder = save_random_checkpoint(tmp_path / "five", tiny_config(num_hidden_layers=5))
    write_config(folder, num_hidden_layers=3)
    for load in (lambda: QwenForCausalLM.from_pretrained(folder), lambda: quantize(folder, tmp_path / "q", **RTN)):
        with pytest.raises(ValueError, match=r"num_hidden_layers 3\): \['transformer\.h\.3\."):
            load()
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_vocabulary_larger_than_the_embedding_is_named(tiny, tmp_path):
    write_config(tiny, vocab_size=10**12)
    for load in (lambda: QwenForCausalLM.from_pretrained(tiny), lambda: quantize(tiny, tmp_path / "q", **RTN)):
        with pytest.raises(ValueError, match=r"transformer\.wte\.weight has shape \[512, 64\], the config needs "
                                             r"\[1000000000000, 64\]"):
            load()


def test_a_million_layers_fail_before_any_block_is_built(tiny, tmp_path, monkeypatch):
    write_config(tiny, num_hidden_layers=10**6)
    built = []
    real_init = quantize_module.Block.__init__

    def counting_init(self, config):
        built.append(self)
        real_init(self, config)

    monkeypatch.setattr(quantize_module.Block, "__init__", counting_init)
    for load in (lambda: QwenForCausalLM.from_pretrained(tiny), lambda: quantize(tiny, tmp_path / "q", **RTN)):
        with pytest.raises(KeyError, match=r"transformer\.h\.2\.ln_1\.weight is missing.*num_hidden_layers 1000000"):
            load()
    assert len(built) <= 2  # the one block the check builds per call, on the meta device


# Rule 4 of the findings: --overwrite replaces only a previous output of ours, never the input or a stranger's folder.

def arrangement(kind, tmp_path, model, previous):
    """An --output path of the given kind, and whether --overwrite may replace it."""
    if kind == "input":
        return model, False
    if kind == "parent of input":
        return model.parent, False
    if kind == "grandparent of input":
        return model.parent.parent, False
    if kind == "folder of other files":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text(SECRET)
        return tmp_path / "mine", False
    if kind == "previous output with a folder added":
        extra = tmp_path / "prev2"
        extra.mkdir()
        for f in previous.iterdir():
            (extra / f.name).write_bytes(f.read_bytes())
        (extra / "backup").mkdir()
        (extra / "backup" / "notes.txt").write_text(SECRET)
        return extra, False
    if kind == "file":
        (tmp_path / "file").write_text(SECRET)
        return tmp_path / "file", False
    if kind == "link to a previous output":
        (tmp_path / "link").symlink_to(previous, target_is_directory=True)
        return tmp_path / "link", False
    if kind == "stale work folder of another tool":
        (tmp_path / "new.partial").mkdir()
        (tmp_path / "new.partial" / "data.bin").write_text(SECRET)
        return tmp_path / "new", False
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", True
    if kind == "previous output":
        return previous, True
    return tmp_path / "new", True


KINDS = ["input", "parent of input", "grandparent of input", "folder of other files",
         "previous output with a folder added", "file", "link to a previous output",
         "stale work folder of another tool", "empty folder", "previous output", "new"]


def test_overwrite_replaces_only_our_own_outputs(tmp_path):
    """Every arrangement of --output against the input and other folders: refused ones change nothing on disk."""
    root = tmp_path / "root"
    model = save_random_checkpoint(root / "models" / "fp", tiny_config(num_hidden_layers=1))
    previous = root / "previous"
    quantize(model, previous, **RTN)
    rng = random.Random(4)
    for kind in rng.sample(KINDS, len(KINDS)):
        case_dir = tmp_path / kind.replace(" ", "_")
        case_dir.mkdir()
        output, allowed = arrangement(kind, case_dir, model, previous)
        before = tree_digest(tmp_path)
        if allowed:
            quantize(model, output, overwrite=True, **RTN)
            assert (output / "model.safetensors").is_file() and not output.with_name(output.name + ".partial").exists()
        else:
            with pytest.raises((ValueError, FileExistsError)) as e:
                quantize(model, output, overwrite=True, **RTN)
            assert str(output) in str(e.value), kind
            assert tree_digest(tmp_path) == before, kind


def test_output_dot_is_a_clear_error(tiny, tmp_path, monkeypatch, capsys):
    work = tmp_path / "here"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([str(tiny), "--method", "rtn", "--group-size", "32", "--output", ".", "--overwrite"]) == 2
    assert "output . is the current folder" in capsys.readouterr().err
    assert not list(work.iterdir()) and not (tmp_path / "here.partial").exists()


def hold_lock(path, locked, release):
    work = WorkFolder(path, resume=True)
    locked.set()
    release.wait(60)
    return work


def test_a_second_run_on_the_same_work_folder_is_refused(tiny, tmp_path):
    context = multiprocessing.get_context("fork")
    locked, release = context.Event(), context.Event()
    holder = context.Process(target=hold_lock, args=(tmp_path / "q.partial", locked, release))
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(RuntimeError, match=r"q\.partial is in use by another qwen-quantize run"):
            quantize(tiny, tmp_path / "q", **RTN)
    finally:
        release.set()
        holder.join(60)
    quantize(tiny, tmp_path / "q", **RTN)  # the lock goes with its run
    assert (tmp_path / "q" / "model.safetensors").is_file()


# Rule 5: resume keyed by content, surviving a kill at any point between files; damaged block files are redone.

@pytest.fixture(scope="module")
def gptq_setup(tmp_path_factory):
    """A 3-block bf16 checkpoint, tiny GPTQ settings, and the checkpoint of an uninterrupted run (made once)."""
    root = tmp_path_factory.mktemp("gptq")
    model = save_random_checkpoint(root / "fp", tiny_config(num_hidden_layers=3), dtype=torch.bfloat16)
    np.save(root / "calib.npy", torch.randint(0, 512, (2000,), generator=torch.Generator().manual_seed(0)).numpy())
    kwargs = dict(group_size=32, calibration=root / "calib.npy", nsamples=4, seqlen=16, mse=False, progress=False)
    straight = root / "straight"
    quantize(model, straight, **kwargs)
    return model, kwargs, straight


class Killed(BaseException):
    pass


def killed(*args, **kwargs):
    raise Killed


def same_checkpoint(a, b) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes()
               for n in ("model.safetensors", "config.json", "quantize_config.json"))


def test_a_kill_between_any_two_files_resumes_to_identical_bytes(gptq_setup, tmp_path, monkeypatch):
    """Kill before the first rename of a run and after each one (settings, each block, the shard, the output):
    those are all the states the disk can be in between files. Every one resumes to the uninterrupted bytes.
    (RTN for speed: resuming GPTQ's activations is checked by test_damaged_block_files_are_redone and test_quantize.)"""
    model = gptq_setup[0]
    kwargs = dict(method="rtn", group_size=32, mse=False, progress=False)
    straight = tmp_path / "straight"
    quantize(model, straight, **kwargs)
    real_replace = os.replace
    renames = ["settings", "block 0", "block 1", "block 2", "shard", "output"]
    for killed_after in range(-1, len(renames)):
        out = tmp_path / f"after{killed_after}"
        done = []

        def dies(src, dst, killed_after=killed_after, done=done):
            if killed_after == -1:
                raise Killed
            real_replace(src, dst)
            done.append(dst)
            if len(done) == killed_after + 1:
                raise Killed

        monkeypatch.setattr(os, "replace", dies)
        with pytest.raises(Killed):
            quantize(model, out, **kwargs)
        monkeypatch.setattr(os, "replace", real_replace)
        if killed_after >= 0:
            assert Path(done[-1]).name.startswith(("settings", "block", "model", "after"))
        if renames[killed_after] == "output" and killed_after >= 0:  # the output appeared whole; only its
            assert same_checkpoint(out, straight)                     # work folder is left to remove
            continue
        assert not out.exists()
        report = quantize(model, out, resume=True, **kwargs)
        assert same_checkpoint(out, straight), renames[killed_after]
        assert report.resumed_blocks == min(max(killed_after, 0), 3), renames[killed_after]
        assert not out.with_name(out.name + ".partial").exists()


def kill_before_block(monkeypatch, model, out, kwargs, index):
    real = quantize_module.quantize_block
    calls = []

    def dies(*args):
        calls.append(1)
        if len(calls) == index + 1:
            raise Killed
        return real(*args)

    monkeypatch.setattr(quantize_module, "quantize_block", dies)
    with pytest.raises(Killed):
        quantize(model, out, **kwargs)
    monkeypatch.setattr(quantize_module, "quantize_block", real)


def test_resume_refuses_changed_calibration_content_at_the_same_path(gptq_setup, tmp_path, monkeypatch):
    model, kwargs, _ = gptq_setup
    np.save(tmp_path / "calib.npy", np.load(kwargs["calibration"]))
    kwargs = {**kwargs, "calibration": tmp_path / "calib.npy"}
    kill_before_block(monkeypatch, model, tmp_path / "q", kwargs, 1)
    np.save(tmp_path / "calib.npy", np.arange(2000) % 512)
    with pytest.raises(ValueError, match=r"--resume: .*q\.partial was started with other settings or inputs "
                                         r"\(calibration_tokens_sha256 differ"):
        quantize(model, tmp_path / "q", resume=True, **kwargs)


def test_resume_refuses_changed_source_weights(gptq_setup, tmp_path, monkeypatch):
    _, kwargs, _ = gptq_setup
    model = save_random_checkpoint(tmp_path / "fp", tiny_config(num_hidden_layers=3), dtype=torch.bfloat16)
    kill_before_block(monkeypatch, model, tmp_path / "q", kwargs, 1)
    save_random_checkpoint(model, tiny_config(num_hidden_layers=3, vocab_size=520), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"(config, )?weights_sha256 differ"):
        quantize(model, tmp_path / "q", resume=True, **kwargs)


def test_damaged_block_files_are_redone(gptq_setup, tmp_path, monkeypatch, caplog):
    model, kwargs, straight = gptq_setup
    out = tmp_path / "q"
    monkeypatch.setattr(quantize_module, "write_shards", killed)
    with pytest.raises(Killed):  # every block done, killed in the export
        quantize(model, out, **kwargs)
    monkeypatch.setattr(quantize_module, "write_shards", write_shards)
    blocks = out.with_name("q.partial") / "blocks"
    data = (blocks / "block_00000.safetensors").read_bytes()
    (blocks / "block_00000.safetensors").write_bytes(data[: len(data) - 100])  # truncated
    data = (blocks / "block_00002.safetensors").read_bytes()
    (blocks / "block_00002.safetensors").write_bytes(data[:-10] + bytes([data[-10] ^ 0x40]) + data[-9:])  # a bit flip
    with caplog.at_level(logging.WARNING, logger="qwen_quant"):
        report = quantize(model, out, resume=True, **kwargs)
    for i in (0, 2):
        assert f"block_0000{i}.safetensors is damaged" in caplog.text and f"block {i} is quantized again" in caplog.text
    assert "block_00001" not in caplog.text and report.resumed_blocks == 1  # block 1 reused, its outputs recomputed
    assert same_checkpoint(out, straight)


# Rule 6: file-system failures are clear errors, before the run where possible; nothing that looks complete is left.

def test_read_only_output_location_fails_before_the_run(tiny, tmp_path, monkeypatch):
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setattr(quantize_module, "quantize_block", lambda *a: pytest.fail("the run started"))
    with pytest.raises(RuntimeError, match=r"cannot access .*ro/q\.partial: Read-only file system"):
        quantize(tiny, tmp_path / "ro" / "q", **RTN)


def test_disk_full_while_writing_keeps_the_blocks_for_resume(tiny, tmp_path, monkeypatch):
    real_write_bytes = Path.write_bytes

    def full_at_block_1(path, data):
        if path.name.startswith("block_00001"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write_bytes(path, data)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    blocks = tmp_path / "q.partial" / "blocks"
    monkeypatch.setattr(Path, "write_bytes", full_at_block_1)
    with pytest.raises(RuntimeError, match=r"no space left on the device writing .*block_00001.*--resume"):
        quantize(tiny, tmp_path / "q", **RTN)
    assert sorted(p.name for p in blocks.iterdir()) == ["block_00000.safetensors"]  # no partial file left
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    monkeypatch.setattr(quantize_module, "write_shards", full)
    with pytest.raises(RuntimeError, match="no space left on the device.*--resume"):
        quantize(tiny, tmp_path / "q", resume=True, **RTN)
    assert not (tmp_path / "q").exists()
    assert len(list(blocks.glob("*.safetensors"))) == 2
    monkeypatch.setattr(quantize_module, "write_shards", write_shards)
    report = quantize(tiny, tmp_path / "q", resume=True, **RTN)
    assert report.resumed_blocks == 2 and (tmp_path / "q" / "model.safetensors").is_file()


def test_cli_reports_output_that_is_a_file(tiny, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert main([str(tiny), "--method", "rtn", "--group-size", "32", "--output", str(tmp_path / "out"),
                 "--overwrite"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_legacy_pickle_checkpoint_loads_with_allow_pickle(tiny):
    state = load_file(tiny / "model.safetensors")
    (tiny / "model.safetensors").unlink()
    torch.save(state, tiny / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = QwenForCausalLM.from_pretrained(tiny, allow_pickle=True)
    assert torch.equal(model.transformer.h[1].mlp.w2.weight, state["transformer.h.1.mlp.w2.weight"])
