"""GPTQModel beside qwen_quant on the same Qwen2 checkpoint and the same calibration tokens (issue 24): perplexity and
quantization time of each with its defaults, and the interop of the two formats (transformers + GPTQModel reading our
export, our runtime reading GPTQModel's).

    python benchmarks/bench_peer.py [--nsamples 128] [--seqlen 512] [--eval-windows 12]
        [--peer-python /work/peer-venv/bin/python] [--work DIR] [--json PATH]

The model: SmolLM2-135M-Instruct built in transformers' Qwen2 layout (common.smollm2_dir), which GPTQModel supports
natively. Calibration: --nsamples windows of --seqlen tokens drawn once by our calibration module (seed 0) from
calib_wikitext2_valid_ids.npy (WikiText-2 validation: the train split is not in the shared data), saved as token ids
and given to both quantizers: to ours as the [nsamples, seqlen] .npy, to GPTQModel as its list of input_ids /
attention_mask. Each quantizer runs with its own defaults at 4-bit group 128 (GPTQModel's QuantizeConfig() is printed
so its defaults are on record), timed end to end (load + quantize + save) in a fresh process of its own with 2 CPU
workers; RTN (ours, method="rtn") gives the scale. Perplexity: the GPTQ protocol on the first --eval-windows windows of
2048 of eval_wikitext2_test_ids.npy in fp32, every quantized folder read by OUR loader and decoded into the fp32 model
(model.load_dequantized), as bench_smollm2.py measures. share = (ppl - fp) / (rtn - fp): the part of RTN's loss a
quantizer keeps.

Interop, on a fixed ChatML prompt: transformers (GPTQModel as its GPTQ backend, through optimum) loads our export and
GPTQModel's, no file edited, and runs one fp32 forward each in the peer's process, once with GPTQModel's own kernel
choice ("auto") and once with its torch kernel; our runtime runs the same folders, fp32 activations, through each CPU
backend of qwen_quant.qlinear (triton is skipped with its reason: on the CPU it runs only in Triton's interpreter) and
its dequantized fp32 reference. Printed: the max abs difference of the logits against transformers' (also relative to
the largest logit) and the share of positions whose argmax agrees; a transformers backend that fails is reported.

GPTQModel is not a dependency of qwen_quant (its pins clash with ours: it downgrades numpy): it lives in its own venv,
run through --peer-python, made once with
    python3 -m venv /work/peer-venv &&
        /work/peer-venv/bin/pip install torch==2.13.0 gptqmodel==7.6.0 transformers optimum
(measured with transformers 5.25.0 and optimum 2.3.0; GPTQModel downgrades numpy there to 2.2.6).
This file is also the peer's entry point (`PEER_PYTHON bench_peer.py peer-quantize|peer-logits ...`), so its top
level imports only what both venvs have; qwen_quant is imported inside the functions that run in ours.
"""
import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_PEER_PYTHON = "/work/peer-venv/bin/python"
PEER_INSTALL = ("python3 -m venv /work/peer-venv && /work/peer-venv/bin/pip install torch==2.13.0 gptqmodel==7.6.0 "
                "transformers optimum")
CPU_WORKERS = 2  # GPTQMODEL_CPU_WORKERS: the machine's 2 cores, as our quantizer's torch threads
QUESTION = "What is the capital of France?"
BITS, GROUP_SIZE = 4, 128  # GPTQModel's defaults, and the setting ours is compared at
EVAL_SEQLEN = 2048
# How transformers runs a GPTQ folder on the CPU: GPTQModel's own choice, and its plain torch kernel (which
# dequantizes into the scales' fp16 even in an fp32 model, so its logits carry fp16 rounding of the weights).
TRANSFORMERS_BACKENDS = ("auto", "gptq_torch")


# ---- the peer's side: runs under --peer-python (GPTQModel's venv, without qwen_quant) ----

def peer_quantize(model: str, calibration: str, out: str) -> dict:
    """GPTQModel with its defaults on the calibration windows (an [nsamples, seqlen] .npy of token ids): load,
    quantize and save timed together."""
    from gptqmodel import GPTQModel, QuantizeConfig

    windows = np.load(calibration).astype(np.int64)
    samples = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in windows]
    config = QuantizeConfig(bits=BITS, group_size=GROUP_SIZE)
    defaults = str(config)  # before the run fills in its meta and device
    start, cpu = time.perf_counter(), cpu_seconds()
    peer = GPTQModel.load(model, config)
    peer.quantize(samples)
    peer.save(out)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu, "quantize_config": defaults}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its finished children: GPTQModel's workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peer_logits(folder: str, prompt: str, out: str) -> dict:
    """transformers' fp32 logits [T, vocab] of the prompt's ids (a JSON list) on a GPTQ folder, through GPTQModel's
    kernel choice ("auto") and its torch kernel, each saved to OUT with the backend in its name. Per backend: the
    quantized linears' class, or the error that stopped it (GPTQModel's auto choice on the CPU is known to fail on
    group sizes that do not divide in_features)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    ids = torch.tensor([json.loads(Path(prompt).read_text())])
    found = {}
    for backend in TRANSFORMERS_BACKENDS:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32,
                                                         quantization_config=GPTQConfig(bits=BITS, backend=backend))
            with torch.no_grad():
                np.save(backend_file(out, backend), model(ids).logits[0].float().numpy())
        except Exception as error:  # reported beside the backends that ran, not fatal
            found[backend] = {"error": f"{type(error).__name__}: {error}"}
            continue
        found[backend] = {"quant_linear": sorted({type(m).__name__ for m in model.modules()
                                                  if "BaseQuantLinear" in {c.__name__ for c in type(m).__mro__}})}
    return found


def backend_file(out: str, backend: str) -> Path:
    return Path(out).with_name(f"{Path(out).stem}-{backend}.npy")


def peer_main(argv: list) -> None:
    parser = argparse.ArgumentParser(description="the peer's jobs (run under --peer-python)")
    parser.add_argument("job", choices=("peer-quantize", "peer-logits"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, help="calibration .npy (quantize) or prompt ids .json (logits)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True, help="JSON file for the job's figures")
    args = parser.parse_args(argv)
    job = peer_quantize if args.job == "peer-quantize" else peer_logits
    Path(args.result).write_text(json.dumps(job(args.model, args.input, args.out)))


# ---- our side ----

def run_peer(peer_python: str, job: str, model, job_input, out, work: Path) -> dict:
    """One peer job in a fresh process of the peer's Python; its output (progress bars by the thousand) goes to a
    log beside the results, whose tail is shown when it fails; its figures come back."""
    name = f"{job}-{Path(out).stem}"
    result, log = work / f"{name}.json", work / f"{name}.log"
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=str(CPU_WORKERS))
    command = [peer_python, str(Path(__file__).resolve()), job, "--model", str(model), "--input", str(job_input),
               "--out", str(out), "--result", str(result)]
    with open(log, "w") as output:
        done = subprocess.run(command, env=env, cwd=work, stdout=output, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"the peer's {job} on {model} failed (exit {done.returncode}); the end of {log}:\n"
                           + "\n".join(tail))
    return {**json.loads(result.read_text()), "log": str(log)}


def peer_python_problem(path: str):
    if not Path(path).is_file():
        return f"--peer-python {path} not found: GPTQModel runs in a venv of its own, made with\n    {PEER_INSTALL}"
    return None


def our_quantize_job(model: str, out: str, calibration: str, nsamples: int, seqlen: int, method: str) -> None:
    """Our quantizer with its defaults (common.isolated runs and times it in a fresh process): load + quantize +
    save, as GPTQModel's is timed."""
    from qwen_quant.quantize import quantize

    quantize(model, out, bits=BITS, group_size=GROUP_SIZE, method=method, calibration=calibration, nsamples=nsamples,
             seqlen=seqlen, seed=0, progress=False, overwrite=True)


def calibration_windows(data: Path, nsamples: int, seqlen: int, path: Path) -> Path:
    """The windows both quantizers see, drawn once (seed 0) and saved as an [nsamples, seqlen] .npy of token ids."""
    from qwen_quant.calibration import get_calibration_data

    windows = get_calibration_data(str(data / "smollm2_135m" / "calib_wikitext2_valid_ids.npy"), nsamples=nsamples,
                                   seqlen=seqlen, seed=0)
    np.save(path, windows.numpy())
    return path


def eval_perplexity(model, data: Path, windows: int) -> float:
    from qwen_quant.evaluate import perplexity

    ids = np.load(data / "smollm2_135m" / "eval_wikitext2_test_ids.npy").astype(np.int64)
    return perplexity(model, torch.from_numpy(ids[: windows * EVAL_SEQLEN]), seqlen=EVAL_SEQLEN,
                      progress=False).perplexity


def chat_prompt(model: Path, path: Path) -> list:
    """The fixed ChatML prompt's ids (no system turn), written for the peer's process."""
    from qwen_quant.tokenizer import build_chat_input, load_tokenizer

    ids = build_chat_input(load_tokenizer(model), QUESTION, system=None)
    path.write_text(json.dumps(ids))
    return ids


def logits_difference(ours: torch.Tensor, reference: np.ndarray) -> dict:
    """The max abs difference, also relative to the largest reference logit, and the share of positions whose argmax
    agrees."""
    reference = torch.from_numpy(reference)
    diff = float((ours.float() - reference).abs().max())
    return {"max_abs_diff": diff, "relative_diff": diff / float(reference.abs().max()),
            "argmax_agreement": float((ours.argmax(-1) == reference.argmax(-1)).float().mean())}


def our_logits(folder: Path, ids: list, backend: str) -> torch.Tensor:
    """Our runtime's logits [T, vocab] on a quantized folder, fp32 activations as transformers' run: a QuantLinear
    backend (the cpu one feeds its int4pack kernel bf16 copies), or "dequantized" (the reference: every weight
    decoded into the dense fp32 model)."""
    from qwen_quant.model import load_dequantized, load_model

    model = load_dequantized(folder) if backend == "dequantized" else load_model(folder, torch.float32, backend=backend)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def cpu_backends() -> tuple:
    """(backends run here, {backend: why not}) of qwen_quant.qlinear's CPU backends."""
    from qwen_quant.qlinear import BACKENDS

    skipped = {"triton": "its kernels run on the CPU only under TRITON_INTERPRET=1 (the interpreter, not the kernels "
                         "as compiled for a GPU): not a CPU backend"}
    return [b for b in BACKENDS if b not in ("auto", *skipped)], skipped


def interop(peer_python: str, folders: dict, ids: list, prompt: Path, work: Path) -> list:
    """transformers + GPTQModel against our runtime on each quantized folder ({label: path})."""
    backends, skipped = cpu_backends()
    for backend, reason in skipped.items():
        print(f"  interop: our backend {backend} skipped: {reason}", flush=True)
    rows = []
    for label, folder in folders.items():
        out = work / f"transformers-logits-{label}.npy"
        peer = run_peer(peer_python, "peer-logits", folder, prompt, out, work)
        ours = {backend: our_logits(folder, ids, backend) for backend in ["dequantized", *backends]}
        for theirs in TRANSFORMERS_BACKENDS:
            found = peer[theirs]
            if "error" in found:
                print(f"  interop {label} folder: transformers with GPTQModel backend {theirs} failed: "
                      f"{found['error']}", flush=True)
                rows.append({"folder": label, "transformers": theirs, "error": found["error"]})
                continue
            reference = np.load(backend_file(out, theirs))
            for backend, logits in ours.items():
                row = {"folder": label, "transformers": theirs, "quant_linear": found["quant_linear"],
                       "ours": backend, **logits_difference(logits, reference)}
                print(f"  interop {label} folder: our {backend} vs transformers + GPTQModel {theirs} "
                      f"({'/'.join(found['quant_linear'])}, fp32): max |diff| {row['max_abs_diff']:.4g} "
                      f"({row['relative_diff']:.2g} of the largest logit), argmax agreement "
                      f"{row['argmax_agreement']:.3f}", flush=True)
                rows.append(row)
    return rows


def quantize_all(peer_python: str, model: Path, calibration: Path, folders: dict, nsamples: int, seqlen: int,
                 work: Path) -> tuple:
    """(GPTQModel's QuantizeConfig as text, {name: wall and CPU seconds}) of GPTQModel, ours and RTN, each quantizing
    into folders[name] in a fresh process."""
    from common import isolated

    peer = run_peer(peer_python, "peer-quantize", model, calibration, folders["gptqmodel"], work)
    print(f"GPTQModel's QuantizeConfig: {peer['quantize_config']}", flush=True)
    timings = {"gptqmodel": {"seconds": peer["seconds"], "cpu_seconds": peer["cpu_seconds"]}}
    print(f"  gptqmodel quantized in {peer['seconds']:.1f} s (log: {peer['log']}); "
          f"{peer_calibration(folders['gptqmodel'])}", flush=True)
    for name, method in (("ours", "gptq"), ("rtn", "rtn")):
        job = isolated(our_quantize_job, str(model), str(folders[name]), str(calibration), nsamples, seqlen, method)
        timings[name] = {"seconds": job["seconds"], "cpu_seconds": job["cpu_seconds"]}
        print(f"  {name} quantized in {job['seconds']:.1f} s", flush=True)
    return peer["quantize_config"], timings


def peer_calibration(folder: Path) -> str:
    """What GPTQModel's quant_log.csv says each module saw: GPTQModel once fell back to round-to-nearest silently when
    a module saw no calibration tokens (../shared/docs/REFERENCE.md section 5)."""
    with open(folder / "quant_log.csv", newline="") as f:
        samples = [int(row["samples"]) for row in csv.DictReader(f)]
    return f"{len(samples)} modules quantized, each on at least {min(samples)} calibration tokens"


def perplexity_rows(model: Path, folders: dict, timings: dict, data: Path, windows: int) -> list:
    """Perplexity of full precision and of each folder read by our loader, with the quantizers' times and shares."""
    from qwen_quant import QwenForCausalLM
    from qwen_quant.model import load_dequantized

    fp = eval_perplexity(QwenForCausalLM.from_pretrained(model), data, windows)
    rows = [{"name": "fp", "perplexity": fp}]
    for name in ("rtn", "gptqmodel", "ours"):
        rows.append({"name": name, "perplexity": eval_perplexity(load_dequantized(folders[name]), data, windows),
                     **timings[name]})
    rtn = rows[1]["perplexity"]
    for row in rows[1:]:
        row["share"] = (row["perplexity"] - fp) / (rtn - fp) if rtn > fp else float("nan")
    return rows


COLUMNS = [("name", "quantizer", ""), ("perplexity", "perplexity", ".4f"), ("share", "share of RTN's loss", ".3f"),
           ("seconds", "quantize s (load+quantize+save)", ".1f"), ("cpu_seconds", "cpu s", ".1f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    parser.add_argument("--eval-windows", type=int, default=12, help="evaluation windows of 2048 (default 12)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="the Python of GPTQModel's venv")
    parser.add_argument("--work", default=None, help="keep the folders here (default: a temporary folder)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args()
    if peer_python_problem(args.peer_python):
        parser.error(peer_python_problem(args.peer_python))
    from common import machine, machine_line, shared_data_dir, smollm2_dir, table, write_json

    info = machine()
    print(machine_line(info), flush=True)
    data = shared_data_dir()
    model = smollm2_dir(data, layout="qwen2")
    results = {"machine": info, "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
               "model": str(model)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        calibration = calibration_windows(data, args.nsamples, args.seqlen, work / "calibration_ids.npy")
        folders = {name: work / f"{name}-int4-g128" for name in ("gptqmodel", "ours", "rtn")}
        results["gptqmodel_quantize_config"], timings = quantize_all(args.peer_python, model, calibration, folders,
                                                                    args.nsamples, args.seqlen, work)
        results["rows"] = perplexity_rows(model, folders, timings, data, args.eval_windows)
        print(table(results["rows"], COLUMNS))
        for key in ("seconds", "cpu_seconds"):
            results[f"ours_over_gptqmodel_{key}"] = timings["ours"][key] / timings["gptqmodel"][key]
        print(f"our time / GPTQModel's: {results['ours_over_gptqmodel_seconds']:.2f} wall, "
              f"{results['ours_over_gptqmodel_cpu_seconds']:.2f} cpu")
        ids = chat_prompt(model, work / "prompt_ids.json")
        results["interop"] = interop(args.peer_python, {"ours": folders["ours"], "gptqmodel": folders["gptqmodel"]},
                                     ids, work / "prompt_ids.json", work)
    print(machine_line(machine()))
    print(json.dumps(results, default=str))
    write_json(args.json, results)


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1].startswith("peer-"):
        peer_main(sys.argv[1:])
    else:
        main()
