"""The quantization method's options as one value, QuantizeSettings, checked once, where it is made.

The command line (cli.quantize_settings) and the Python API (quantize(**options), plan_report(**options)) build it;
quantize(), the plan, the report, the model card and the resume key read it. What does not change the output (the
device, resume, overwrite, progress, on_block, hub, the output folder) stays an argument of quantize(); the model's
family is its checkpoint's (layout.layout_of), not an option.
"""
import math
import os
import reprlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from .calibration import SEED_RANGE, array_kind
from .config import QuantConfig, is_int, is_number
from .gptq import DEFAULT_ASYM_ALPHA, DEFAULT_REFINE_PASSES, check_group_act_order
from .packing import check_bits, valid_group_size

# Arguments by kind: whole numbers with their range (least, most), or None where a later rule knows the values;
# finite numbers with theirs; flags. tp and group_act_order may also be None. (damp_percent, desc_act, static_groups
# and sym are QuantConfig's fields: its own rules check them; the calibration source is the calibration module's.)
WHOLE_ARGUMENTS = {"bits": None, "group_size": None, "tp": None, "nsamples": (1, math.inf), "seqlen": (1, math.inf),
                   "seed": (SEED_RANGE[0], SEED_RANGE[1] - 1), "refine_passes": (0, math.inf)}
NUMBER_ARGUMENTS = {"asym_calibration": (0, 1), "max_shard_bytes": (1, math.inf)}
FLAG_ARGUMENTS = ("mse", "resume", "overwrite", "input_scaling", "progress", "group_act_order")
OPTIONAL_ARGUMENTS = ("tp", "group_act_order")
CHECKED_ARGUMENTS = (*WHOLE_ARGUMENTS, *NUMBER_ARGUMENTS, *FLAG_ARGUMENTS)
METHODS = ("gptq", "rtn")


def check_arguments(**arguments) -> None:
    """Each argument's type, then its range, by its name's kind (True is not 1, 2.0 is not 2, "2" is not 2), as a
    ValueError naming the argument: QuantizeSettings' options and quantize()'s run-time flags."""
    for name, value in arguments.items():
        if value is None and name in OPTIONAL_ARGUMENTS:
            continue
        if name in FLAG_ARGUMENTS:
            valid, wanted = isinstance(value, bool), "True or False"
        else:
            whole = name in WHOLE_ARGUMENTS
            least, most = (WHOLE_ARGUMENTS if whole else NUMBER_ARGUMENTS)[name] or (-math.inf, math.inf)
            typed = is_int(value) if whole else is_number(value)  # config's rules: True is not 1, NaN no number
            valid = typed and least <= value <= most
            wanted = ("a whole number" if whole else "a finite number") + (
                "" if least == -math.inf else f" >= {least}" if most == math.inf else f" in [{least}, {most}]")
        if not valid:
            raise ValueError(f"{name} must be {wanted}{' or None' * (name in OPTIONAL_ARGUMENTS)}, "
                             f"got {reprlib.repr(value)}")


@dataclass(frozen=True)
class QuantizeSettings:
    """The method's options. Made, they are valid: types and ranges (check_arguments), the published format's rules
    (QuantConfig), and the rules between options; group_act_order None becomes its default, and refine_passes 0 for
    RTN (refine needs GPTQ's Hessian).

    bits, group_size, desc_act, sym, damp_percent, static_groups: GPTQ's, as the output's quantization_config
    records them. method: "gptq", or "rtn" (round-to-nearest, no calibration).
    calibration, nsamples, seqlen, seed: nsamples windows of seqlen tokens drawn from the calibration source.
    mse: the clipped grid searched per group (False: the textbook min/max grid).
    tp: pad the MLP width so that vLLM can split the output over tp GPUs (tensor_parallel.padded_ffn).
    asym_calibration: alpha of GPTQ's asymmetric calibration (gptq_quantize's asym_cross), 0 for none: the
    full-precision model's activations are carried beside the quantized model's (twice the activation memory and
    forwards).
    group_act_order: act-order of whole groups (gptq_quantize's), which keeps the checkpoint free of act-order's
    run-time cost; None (the default): on for GPTQ with groups and without desc_act / static_groups (measured in
    benchmarks/RESULTS.md, "Quality ablation").
    input_scaling: scale the inputs of the linears after the block's two norms per channel (gptq.input_scales), folded
    into the norms' weights.
    refine_passes: rounds of gptq.refine after GPTQ's sweep (least-squares scales, then each code re-chosen), 0
    for none; they change only the values written.
    max_shard_bytes: the output's safetensors shards' size.
    """
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    static_groups: bool = False
    method: str = "gptq"
    calibration: Any = "c4"  # a calibration source (calibration.get_calibration_data); RTN reads none
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    mse: bool = True
    tp: Optional[int] = None
    asym_calibration: float = DEFAULT_ASYM_ALPHA
    group_act_order: Optional[bool] = None
    input_scaling: bool = False
    refine_passes: int = DEFAULT_REFINE_PASSES
    max_shard_bytes: int = 4 * 10**9

    def __post_init__(self):
        check_arguments(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in CHECKED_ARGUMENTS})
        check_bits(self.bits)
        if not valid_group_size(self.group_size):
            raise ValueError(f"group size {self.group_size} must be positive or -1 (per channel)")
        if self.method not in METHODS:
            raise ValueError(f"method {reprlib.repr(self.method)} is not one of {METHODS}")
        self.quant_config()  # its own rules: damp_percent, desc_act, static_groups, sym
        if self.group_act_order is None:
            object.__setattr__(self, "group_act_order", self.method == "gptq" and self.group_size != -1
                               and not (self.desc_act or self.static_groups))
        if self.method != "gptq":
            object.__setattr__(self, "refine_passes", 0)
        check_group_act_order(self.group_act_order, self.desc_act, self.static_groups, self.group_size)

    def quant_config(self) -> QuantConfig:
        """The published format's settings. Qwen's files are v1 ("gptq"), which stores zero - 1 and so cannot hold the
        zero point 0 of an asymmetric grid: an asymmetric one is written as gptq_v2."""
        return QuantConfig(bits=self.bits, group_size=self.group_size, damp_percent=self.damp_percent,
                           desc_act=self.desc_act, static_groups=self.static_groups, sym=self.sym,
                           checkpoint_format="gptq" if self.sym else "gptq_v2")

    def key(self) -> dict:
        """The settings a finished block depends on, as JSON values, for the resume key (a resumed run's must be
        equal): the published format's, then the other options. Left out: the calibration source (a run is keyed by
        its tokens) and the shard size (which splits the same tensors otherwise)."""
        return {"quant": asdict(self.quant_config()), "method": self.method, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, "mse": self.mse, "tp": self.tp,
                "asym_calibration": self.asym_calibration, "group_act_order": self.group_act_order,
                "input_scaling": self.input_scaling, "refine_passes": self.refine_passes}

    def calibration_name(self) -> str:
        """The calibration source as the report names it: the dataset name or path, else the container of ids."""
        if isinstance(self.calibration, (str, os.PathLike)):
            return str(self.calibration)
        if isinstance(self.calibration, (list, tuple)):
            return f"a list of {len(self.calibration)} items"
        return f"a {array_kind(self.calibration)} of token ids"

    def description(self) -> str:
        """One line for logs and the summary: the method and every option that is on."""
        words = [f"method {self.method}", f"{self.bits}-bit", f"group {self.group_size}", "sym" if self.sym else "asym"]
        words += ["desc_act"] * self.desc_act + ["static groups"] * self.static_groups + ["clipped grid"] * self.mse
        words += ["group act-order"] * self.group_act_order + ["input scaling"] * self.input_scaling
        if self.asym_calibration:
            words.append(f"asymmetric calibration {self.asym_calibration:g}")
        if self.refine_passes:
            words.append(f"{self.refine_passes} refine passes")
        if self.method == "gptq":  # RTN reads no calibration
            words.append(f"calibration {self.calibration_name()} ({self.nsamples} x {self.seqlen} tokens, seed "
                         f"{self.seed})")
        return ", ".join(words)


def settings_of(settings: Optional[QuantizeSettings], options: dict) -> QuantizeSettings:
    """The settings of a call that takes either a QuantizeSettings or its options by name (quantize, plan), not both."""
    if settings is None:
        return QuantizeSettings(**options)
    if not isinstance(settings, QuantizeSettings):
        raise TypeError(f"settings must be a QuantizeSettings, got {type(settings).__name__} {reprlib.repr(settings)} "
                        "(give the method's options by name, e.g. bits=4)")
    if options:
        raise TypeError(f"options {', '.join(sorted(options))} given beside settings: give them in the "
                        "QuantizeSettings, or give no settings")
    return settings
