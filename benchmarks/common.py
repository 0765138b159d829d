"""Shared helpers of the benchmark scripts: the machine, peak memory of one job in a fresh process, tables, --json.

    from common import GIB, add_common_args, isolated, machine, machine_line, shared_data_dir, table, write_json

`smollm2_dir(data_dir)` builds (once, cached outside the checkout) the Qwen v1 folder of SmolLM2-135M-Instruct from its
GGUF; tests/conftest.py uses the same function.

`isolated(fn, *args, **kwargs)` runs `fn` (a module-level function; arguments and result picklable) in a freshly
spawned Python process, so the memory it reports belongs to that job alone. The child records its RSS before the
job (torch and the script already imported) and its high-water mark after it (VmHWM, see peak_rss_bytes); on CUDA
also `torch.cuda.max_memory_allocated` (reset before the job). Also its wall and CPU seconds.
"""
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from qwen_quant.plan import peak_rss_bytes  # noqa: F401 (the scripts' high-water mark, VmHWM)

GIB = 2**30
MIB = 2**20


def machine() -> dict:
    """CPU model, cores, memory, torch version and threads, GPU name when there is one."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # The kind of CPU decides our arithmetic routes (qwen_quant.cpu): AVX-512 with bf16 matmuls, or AVX2 only.
    from qwen_quant.cpu import detected_fast_bf16_matmul

    isa = torch.backends.cpu.get_cpu_capability() + (" with bf16 matmuls" if detected_fast_bf16_matmul() else "")
    info = {"cpu": cpu, "isa": isa, "cores": cores, "memory_gib": round(memory / GIB, 1), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict = None) -> str:
    info = info or machine()
    gpu = f", GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else ""
    line = (f"machine: {info['cpu']} ({info.get('isa', 'instruction set not recorded')}), {info['cores']} cores, {info['memory_gib']} GiB, torch {info['torch']} "
            f"({info['torch_threads']} threads), Python {info['python']}{gpu}; load average {info['load_avg_1min']}")
    if info["load_avg_1min"] > 0.5 * info["cores"]:
        line += "\nWARNING: other processes are using the CPUs: wall times are inflated (cpu s is steadier)"
    return line


def revision() -> str:
    """The checkout's commit, with "+dirty" when tracked files differ from it (read-only git calls)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def rss_bytes() -> int:
    """Current resident set size (anonymous + file-backed pages) of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict:
    """Current RssAnon / RssFile / RssShmem of this process in bytes (Linux)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon", "RssFile", "RssShmem")):
                key, value = line.split(":")
                parts[key.strip()] = int(value.split()[0]) * 1024
    return parts


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_child(fn, args, kwargs) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline, baseline_peak = rss_bytes(), peak_rss_bytes()
    cpu, start = cpu_seconds(), time.perf_counter()
    result = fn(*args, **kwargs)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    peak = peak_rss_bytes()
    return {"result": result, "seconds": seconds, "cpu_seconds": cpu, "baseline_rss_bytes": baseline,
            "baseline_peak_rss_bytes": baseline_peak, "peak_rss_bytes": peak,
            "peak_rss_above_baseline_bytes": peak - baseline,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda and torch.cuda.is_initialized() else 0}


def isolated(fn, *args, **kwargs) -> dict:
    """Run fn(*args, **kwargs) in a fresh spawned process. Returns {"result", "seconds", "cpu_seconds" (user + system,
    all threads), "baseline_rss_bytes", "peak_rss_bytes", "peak_rss_above_baseline_bytes", "peak_cuda_bytes"}; an
    exception in the child is raised here with the child's traceback."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_child, fn, args, kwargs).result()


def table(rows: list, columns: list) -> str:
    """Rows (dicts) as a text table; columns are (key, header, format) with format like '.2f' or '' ."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else format(row[key], fmt) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def shared_data_dir() -> Path:
    """The team's real data: $QWEN_QUANT_DATA, else ../shared/data beside the checkout (the tests read it through
    this too). Missing data stops the run (SystemExit), never skips."""
    root = Path(os.environ.get("QWEN_QUANT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (root / "stories260k_qwen" / "config.json").is_file():
        raise SystemExit(f"shared data not found at {root}: set QWEN_QUANT_DATA to the folder holding "
                         "stories260k_qwen/, qwen_tiktoken/, wikitext2/")
    return root


SMOLLM2_GGUF = "smollm2_135m/SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_dir(data_dir: Path, layout: str = "qwen") -> Path:
    """The folder of SmolLM2-135M-Instruct in a checkpoint layout ("qwen": Qwen v1's; "qwen2": transformers'
    Qwen2ForCausalLM), built from data_dir's GGUF by the shared converter (data_dir/../tools/gguf_to_qwen.py, run
    with this Python) the first time and cached in $QWEN_QUANT_CACHE (default ~/.cache/qwen_quant) under the GGUF's
    sha256, so a changed GGUF builds afresh.
    The build goes to a temporary folder renamed into place when complete: a killed build never looks finished.
    Raises FileNotFoundError when the GGUF or the converter is missing, RuntimeError when the converter fails."""
    data_dir = Path(data_dir)
    gguf_path = data_dir / SMOLLM2_GGUF
    converter = data_dir.parent / "tools" / "gguf_to_qwen.py"
    for needed in (gguf_path, converter):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found: SmolLM2-135M is built from the shared data's GGUF by the "
                                    "shared converter")
    cache = Path(os.environ.get("QWEN_QUANT_CACHE", Path.home() / ".cache" / "qwen_quant"))
    # The v1 folder keeps its name from before layouts had one, so existing caches stay valid.
    suffix = "" if layout == "qwen" else f"-{layout}"
    folder = cache / f"smollm2_135m-{_sha256(gguf_path)[:16]}{suffix}"
    if (folder / "config.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=folder.name + ".building-", dir=cache))
    try:
        done = subprocess.run([sys.executable, str(converter), str(gguf_path), str(building), "--layout", layout],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{converter} failed on {gguf_path} (exit {done.returncode}):\n{done.stderr[-2000:]}")
        try:
            building.rename(folder)
        except OSError:  # another process finished the same build first
            if not (folder / "config.json").is_file():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building)
    return folder


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI-sized run (a minute or two on 2 cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the results and the machine to this JSON file")


def write_json(path, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"results written to {path}")
