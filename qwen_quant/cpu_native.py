"""Our native CPU kernels, torch operators in the namespace qwen_quant: the prompt GEMM (cpu_prefill.cpp, see
qwen_quant.cpu_prefill) and one query's attention over the KV cache (cpu_attention.cpp, see qwen_quant.cpu_attention).

Built on first use by torch.utils.cpp_extension (a C++ compiler and ninja, which torch.compile on the CPU needs too)
into torch's extension cache (~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR), once per machine and version of
the sources: 10-30 s. Where they cannot be built, `ops()` is None, one warning says why, and the model runs
torch's own operations instead (slower, the same results within rounding).
"""
import functools
import logging
import platform
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger("qwen_quant")

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_prefill.cpp", "cpu_attention.cpp")]


@functools.lru_cache(maxsize=None)
def ops() -> Optional[object]:
    """torch.ops.qwen_quant with our operators loaded, or None where they cannot be built here (logged once)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # the kernels are written for x86-64
    try:
        from torch.utils.cpp_extension import load
        logger.info("cpu backend: loading its native kernels %s (built once per machine and version, 10-30 s)",
                    ", ".join(path.name for path in SOURCES))
        load("qwen_quant_cpu_native", [str(path) for path in SOURCES], extra_cflags=["-O3", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # a missing compiler or ninja, a failed build: torch's operations serve instead
        logger.warning("cpu backend: its native kernels could not be built (%s: %s); torch's own operations run "
                       "instead, slower", type(error).__name__, error)
        return None
    return torch.ops.qwen_quant


def checked(self_check: Callable, kernel: str, instead: str) -> Optional[object]:
    """ops(), where self_check(ops) finds nothing wrong with `kernel` on this CPU (it returns what is wrong, or None);
    else None and a warning that says what and that `instead` runs. An operator that raises counts as wrong: oneDNN
    refuses its bf16 microkernel where its ISA is capped (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU, say)."""
    built = ops()
    if built is None:
        return None
    try:
        error = self_check(built)
    except RuntimeError as raised:
        error = f"it raised {type(raised).__name__}: {raised}"
    if error is not None:
        logger.warning("cpu backend: its %s disagrees with torch's own results on this CPU (%s); %s", kernel, error,
                       instead)
        return None
    return built
