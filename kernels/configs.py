"""Launch configurations of the GPTQ matmul (qwen_quant.kernels.gptq_matmul): the M buckets, the heuristic, and the
per-GPU table that the GPU check's autotune writes (tuned_configs.json beside this file, shipped with the package).

A layer's call runs the config of its shape class: (bits, rows per group, K, N, M bucket). On a GPU the table's entry
for this GPU's name (torch.cuda.get_device_name) is used when there is one; the heuristic is the fallback for GPUs
without a table and for the CPU (the Triton interpreter). Nothing here imports Triton.

The table is performance data, never needed for a correct result: a damaged or unreadable table warns once, naming
the file and what is wrong with it, and the heuristic runs instead. A model that loads and computes the right thing
a little slower is what a user expects when a shipped data file is off; a traceback at model load would be worse.
"""
import dataclasses
import functools
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qwen_quant.config import is_int, shown
from qwen_quant.json_files import read_json

TABLE_PATH = Path(__file__).with_name("tuned_configs.json")
TABLE_FORMAT = 1

# Rows of x handled by each bucket, by its largest M; a bucket's config must run every M in it. Buckets up to
# SPLIT_K_MAX_M are decode (split-K allowed); the last one is any prompt longer than the one before.
M_BUCKETS = (1, 16, 64, None)
SPLIT_K_MAX_M = 16  # the split-K workspace holds this many rows of partial sums
WORKSPACE_MIN_N = 32768  # wider than every Qwen linear: in practice one split-K workspace per device, 2.1 MiB
# The M at which autotune times each bucket (and the GPU check's kernels section measures).
BUCKET_SAMPLE_M = {1: 1, 16: 16, 64: 64, None: 2048}

# "kernel": _gptq_matmul_kernel (a GEMV at block_m 1, tl.dot tiles above it); "dense": dequantize the layer into a
# reusable scratch of the activation dtype, then torch's dense matmul (cuBLAS on a GPU).
ROUTES = ("kernel", "dense")
DOT_MIN = 16  # the smallest tl.dot dimension a GPU accepts (the interpreter takes smaller ones: never rely on it)
MAX_BLOCK = 1024
NUM_WARPS = (1, 2, 4, 8, 16)
MAX_STAGES = 8
MAX_SPLIT_K = 64


def split_k_workspace_sizes(N: int) -> tuple:
    """Elements of the split-K workspace serving layers up to N outputs wide: fp32 partial sums for SPLIT_K_MAX_M rows,
    and int32 arrival counters, one per output tile of at least 16 columns."""
    width = max(N, WORKSPACE_MIN_N)
    return SPLIT_K_MAX_M * width, SPLIT_K_MAX_M * -(-width // 16)


@dataclass(frozen=True)
class MatmulConfig:
    """How one call runs. route "kernel": _gptq_matmul_kernel with these block shapes (block_m 1: the GEMV; above:
    tl.dot tiles), split_k > 1 splitting K across programs (decode buckets only). route "dense": block_n / block_k /
    num_warps shape the dequantize kernel, the other fields are unused."""
    route: str = "kernel"
    block_m: int = 1
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(MatmulConfig))


def per_word(bits: int) -> int:
    return 32 // bits


def _pow2(n) -> bool:
    return is_int(n) and n > 0 and n & (n - 1) == 0


def config_problems(config: MatmulConfig, bits: int) -> list:
    """What is wrong with `config` for `bits`-bit weights, one line per field; empty when it can run on a GPU. The
    same rule for the table's entries and for configs a caller passes (tests, benchmarks, autotune)."""
    problems = []
    if config.route not in ROUTES:
        problems.append(f"route={shown(config.route)} must be one of {ROUTES}")
    for name in ("block_m", "block_n", "block_k"):
        value = getattr(config, name)
        if not _pow2(value) or value > MAX_BLOCK:
            problems.append(f"{name}={shown(value)} must be a power of two up to {MAX_BLOCK}")
    if not problems:
        if config.block_k % per_word(bits):
            problems.append(f"block_k={config.block_k} must be a multiple of {per_word(bits)} (codes per word at "
                            f"{bits} bits)")
        if config.block_n < DOT_MIN:
            problems.append(f"block_n={config.block_n} must be at least {DOT_MIN}")
        dot = config.route == "kernel" and config.block_m > 1
        if dot and min(config.block_m, config.block_k) < DOT_MIN:
            problems.append(f"block_m > 1 runs tl.dot, which needs block_m and block_k of at least {DOT_MIN}")
    if not is_int(config.split_k) or not 1 <= config.split_k <= MAX_SPLIT_K:
        problems.append(f"split_k={shown(config.split_k)} must be an integer from 1 to {MAX_SPLIT_K}")
    elif config.split_k > 1 and (config.route != "kernel" or not _pow2(config.block_m)
                                 or config.block_m > SPLIT_K_MAX_M):
        problems.append(f"split_k={config.split_k} needs route 'kernel' and block_m <= {SPLIT_K_MAX_M}")
    if config.num_warps not in NUM_WARPS or not is_int(config.num_warps):
        problems.append(f"num_warps={shown(config.num_warps)} must be one of {NUM_WARPS}")
    for name, top in (("num_stages", MAX_STAGES), ("group_m", 64)):
        value = getattr(config, name)
        if not is_int(value) or not 1 <= value <= top:
            problems.append(f"{name}={shown(value)} must be an integer from 1 to {top}")
    return problems


def m_bucket(M: int) -> Optional[int]:
    """The bucket of M rows: the first of M_BUCKETS that holds it (None: longer than every bounded one)."""
    for bucket in M_BUCKETS[:-1]:  # a plain loop: torch.compile traces this in every layer's call
        if M <= bucket:
            return bucket
    return None


def bucket_name(bucket: Optional[int]) -> str:
    index = M_BUCKETS.index(bucket)
    low = 1 if index == 0 else M_BUCKETS[index - 1] + 1
    return f"{low}+" if bucket is None else str(low) if low == bucket else f"{low}-{bucket}"


def shape_key(bits: int, group: int, K: int, N: int, bucket: Optional[int]) -> str:
    """The table's key of a shape class: group is the rows per group (K for one group per channel)."""
    return f"int{bits} g{group} k{K} n{N} m{bucket_name(bucket)}"


def _block_k_for_groups(group: int, K: int, cap: int, floor: int) -> int:
    """The largest power of two in [floor, cap] dividing group, so that no K tile straddles two groups; cap when
    there is none (the kernel then scales each element by its own group)."""
    if group >= K:
        return cap
    aligned = group & -group  # the largest power of two dividing group
    return min(aligned, cap) if aligned >= floor else cap


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def fused_prefill_config(K: int, group: int, bits: int) -> MatmulConfig:
    """tl.dot tiles of 64 rows: the GPU heuristic's short prompts, and the dense route's stand-in inside a CUDA graph
    capture (where its scratch cannot be made)."""
    block_k = _block_k_for_groups(group, K, 64, max(DOT_MIN, per_word(bits)))
    return MatmulConfig(block_m=64, block_n=128, block_k=block_k, num_warps=4, num_stages=3)


def heuristic_config(bucket: Optional[int], N: int, K: int, group: int, bits: int,
                     sm_count: Optional[int]) -> MatmulConfig:
    """A config from a few rules, for GPUs without a table (sm_count: the GPU's SMs) and for the interpreter
    (sm_count None)."""
    words = per_word(bits)
    if bucket is None:
        # Long prompts: dequantize once and let cuBLAS run the product (as vLLM's exllama path does above ~50 rows).
        return MatmulConfig(route="dense", block_n=64, block_k=_block_k_for_groups(group, K, 128, words),
                            num_warps=4)
    if sm_count is None:
        # Triton's CPU interpreter runs each program as numpy calls: few, large programs are fastest.
        return MatmulConfig(block_m=bucket if bucket == 1 else max(DOT_MIN, min(64, _pow2_at_least(bucket))),
                            block_n=max(DOT_MIN, min(256, _pow2_at_least(N))),
                            block_k=_block_k_for_groups(group, K, 256, max(words, DOT_MIN)))
    if bucket > SPLIT_K_MAX_M:
        return fused_prefill_config(K, group, bits)
    # Decode is memory bound: tiles 16 packed words deep (8 KiB of words per 128 columns), K split so that every
    # SM has a few programs.
    block_m, block_n = (1, 128) if bucket == 1 else (16, 64)
    block_k = _block_k_for_groups(group, K, 16 * words, max(words, DOT_MIN))
    return MatmulConfig(block_m=block_m, block_n=block_n, block_k=block_k,
                        split_k=decode_split_k(N, K, block_n, block_k, sm_count, programs_per_sm=4), num_warps=4)


def decode_split_k(N: int, K: int, block_n: int, block_k: int, sm_count: int, programs_per_sm: int) -> int:
    """The power-of-two split of K that gives every SM about programs_per_sm programs, keeping at least 2 K tiles
    per program."""
    tiles_n, tiles_k = -(-N // block_n), -(-K // block_k)
    split_k = 1
    while (tiles_n * split_k < programs_per_sm * sm_count and tiles_k >= 4 * split_k
           and 2 * split_k <= MAX_SPLIT_K):
        split_k *= 2
    return split_k


def _key_bits(key) -> Optional[int]:
    """The bits of a shape key written by shape_key, or None when `key` is not one."""
    match = _KEY.fullmatch(key) if isinstance(key, str) else None
    return int(match.group(1)) if match else None


_KEY = re.compile(r"int(\d+) g\d+ k\d+ n\d+ m[0-9+-]+")


def _entry_config(key, entry, source: str) -> tuple:
    """(MatmulConfig, None) from the table's entry at `key`, or (None, why it cannot be used)."""
    bits = _key_bits(key)
    if bits not in (4, 8):
        return None, f"{source}: the key is no shape key of 4 or 8 bits (like {shape_key(4, 128, 4096, 4096, 1)!r})"
    if not isinstance(entry, dict):
        return None, f"{source} must be an object of {', '.join(FIELDS)}"
    unknown = sorted(map(str, set(entry) - set(FIELDS)))
    if unknown:
        return None, f"{source} has unknown fields {unknown[:4]}; known: {', '.join(FIELDS)}"
    config = MatmulConfig(**entry)
    problems = config_problems(config, bits)
    return (None, f"{source}: " + "; ".join(problems)) if problems else (config, None)


def _warn(message: str) -> None:
    warnings.warn(f"{message}; the heuristic's configs run instead", TableWarning, stacklevel=3)


class TableWarning(UserWarning):
    """A tuned-config table that cannot be used (fully or in part)."""


def parse_table(data, path) -> dict:
    """{gpu name: {shape key: MatmulConfig}} from a table's JSON value; each unusable part warns (naming `path`,
    the GPU and the key) and is left out."""
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("gpus"), dict):
        _warn(f"{path} is not a tuned-config table (a JSON object with \"format\": {TABLE_FORMAT} and \"gpus\")")
        return {}
    table = {}
    for gpu, entries in data["gpus"].items():
        if not isinstance(entries, dict):
            _warn(f"{path}: gpus[{shown(gpu)}] must be an object of shape keys")
            continue
        table[gpu] = {}
        for key, entry in entries.items():
            config, problem = _entry_config(key, entry, f"{path}: gpus[{shown(gpu)}][{shown(key)}]")
            if problem:
                _warn(problem)
            else:
                table[gpu][key] = config
    return table


def read_table(path: Optional[Path] = None) -> dict:
    """The table at `path` (default TABLE_PATH; parse_table), read once; a missing file is an empty table, an
    unreadable one warns."""
    return _read_table(Path(path or TABLE_PATH))


@functools.lru_cache(maxsize=None)
def _read_table(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = read_json(path)
    except OSError as e:
        _warn(f"cannot read the tuned-config table {path}: {e.strerror or e}")
        return {}
    except ValueError as e:  # read_json's messages start with the file's path
        _warn(f"the tuned-config table {e}")
        return {}
    return parse_table(data, path)


def tuned_config(gpu: str, key: str, path: Optional[Path] = None) -> Optional[MatmulConfig]:
    return read_table(path).get(gpu, {}).get(key)


def choose_config(bucket: Optional[int], N: int, K: int, group: int, bits: int, gpu: Optional[str] = None,
                  sm_count: Optional[int] = None, path: Optional[Path] = None) -> MatmulConfig:
    """The config of an M bucket (m_bucket): the table's for this GPU (gpu: its name, sm_count: its SMs) when it
    has the shape class, else the heuristic's. gpu None: the interpreter."""
    found = tuned_config(gpu, shape_key(bits, group, K, N, bucket), path) if gpu is not None else None
    return found or heuristic_config(bucket, N, K, group, bits, sm_count if gpu is not None else None)


def write_table(gpu: str, entries: dict, path: Optional[Path] = None) -> dict:
    """Put `entries` ({shape key: MatmulConfig}) under `gpu` in the table at `path`, keeping other GPUs' entries
    and this GPU's other keys, atomically (a temporary file renamed over it). Returns the JSON value written."""
    kept = {g: {k: c.as_json() for k, c in tuned.items()} for g, tuned in read_table(path).items()}
    kept.setdefault(gpu, {}).update({key: config.as_json() for key, config in entries.items()})
    data = {"format": TABLE_FORMAT,
            "about": "GPTQ matmul launch configs per GPU (torch.cuda.get_device_name) and shape class, written by "
                     "the autotune section of benchmarks/gpu_check.py; keys: int<bits> g<rows per group> k<K> n<N> "
                     "m<rows of x>",
            "gpus": {g: dict(sorted(kept[g].items())) for g in sorted(kept)}}
    path = Path(path or TABLE_PATH)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False,
                                     encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(f.name, path)
    _read_table.cache_clear()
    return data
