"""Run the CUDA tests and benchmarks, then train both Hippocampus models with the DynUNet recipe, on one GPU.

One prepared command for a session that has a GPU (H100/H200) for a few minutes; everything it makes goes to
``--out`` (weights, logs, timings, test and benchmark output), and calibration, evaluation and shipping then
happen on CPU from those weights. The defaults (1.5 minutes of checks, 7 of training) fit the device's 10-minute
command limit with the wheels' installation; ``tools/prepare_device_run.py`` prepares and prints the whole call::

    python tools/gpu_hippocampus.py --out $OUT --data ../shared/data/hippocampus

Steps:

1. ``nvidia-smi`` and torch facts.
2. Within ``--test-minutes`` in all (first, so a slow step cannot eat the training time): the CUDA tests,
   ``bench_loss`` and ``bench_metrics`` on CUDA, ``prior_cache_memory --device cuda`` (τ of a batch on the GPU).
3. Within ``--minutes`` in all: a 2-epoch probe of each model, then both models (NACL and CE+Dice, same seed)
   trained at the same time with ``train.json + [train_dice_ce.json] + dynunet.json + train_dynunet.json``
   (+ ``device_data.json`` on CUDA: volumes cached and augmented on the GPU, dropped if its probe fails), with
   ``max_epochs`` planned from the probe's epoch, validation and start-up times to fill what is left.

Every step has a timeout and is logged; a failed step does not stop the next one, and the exit status is non-zero
when any failed. ``--device cpu --epochs 1 --cases 4 --skip-tests`` runs the same plumbing on CPU in about a minute
(what ``tests/test_bundles.py`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "hippocampus_mri_nacl_segmentation"
MODELS = {"nacl": [], "dice_ce": ["train_dice_ce.json"]}


def log(out: Path, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(out / "gpu_hippocampus.log", "a") as f:
        f.write(line + "\n")


def model_configs(model: str, args: argparse.Namespace) -> list[str]:
    """The bundle config files a model trains with, in merge order."""
    configs = ["train.json", *MODELS[model], "dynunet.json", "train_dynunet.json"]
    return configs + ["device_data.json"] if args.device_data else configs


def bundle_command(model: str, run_dir: Path, args: argparse.Namespace, epochs: int, datalist: Path | None) -> list:
    files = "[" + ",".join(f"'{BUNDLE / 'configs' / c}'" for c in model_configs(model, args)) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(BUNDLE)]
    cmd += ["--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--dataset_dir", str(args.data)]
    cmd += ["--ckpt_dir", str(run_dir / "models"), "--resume_dir", str(run_dir / "checkpoints")]
    cmd += ["--output_dir", str(run_dir / "eval"), "--train#trainer#max_epochs", str(epochs)]
    cmd += ["--device", f"$torch.device('{args.device}')"]
    cmd += ["--train#dataloader#num_workers", str(args.workers), "--validate#dataloader#num_workers", "2"]
    if datalist is not None:
        cmd += ["--datalist#datalist_file", str(datalist)]
    if args.val_interval:
        cmd += ["--val_interval", str(args.val_interval)]
    return cmd


def run_step(out: Path, name: str, cmd: list, timeout: float, env: dict | None = None) -> bool:
    log(out, f"{name}: {' '.join(map(str, cmd))[:400]}")
    start = time.time()
    with open(out / f"{name}.log", "w") as f:
        try:
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    log(out, f"{name}: exit {code} after {time.time() - start:.0f} s (log {out / (name + '.log')})")
    return code == 0


def train_both(out: Path, tag: str, args: argparse.Namespace, epochs: int, datalist: Path | None, timeout: float):
    """Train the two models at the same time; return {model: seconds} (None where it failed)."""
    procs = {}
    for model in MODELS:
        run_dir = out / tag / model
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = bundle_command(model, run_dir, args, epochs, datalist)
        log(out, f"{tag}/{model}: {epochs} epochs, {', '.join(model_configs(model, args))}")
        procs[model] = (subprocess.Popen(cmd, stdout=open(run_dir / "train.log", "w"), stderr=subprocess.STDOUT,
                                         cwd=ROOT), time.time())  # fmt: skip
    times = {}
    for model, (proc, start) in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        ok = code == 0 and (out / tag / model / "models" / "model.pt").is_file()
        times[model] = time.time() - start if ok else None
        log(out, f"{tag}/{model}: exit {code}, {times[model] and round(times[model])} s")
    return times


_TIME_TAKEN = re.compile(
    r"(SupervisedTrainer|SupervisedEvaluator) - INFO - (Epoch\[\d+\] Complete|Engine run finished)\. "
    r"Time taken: (\d+):(\d+):([\d.]+)"
)


def planned_epochs(train_log: Path, probe_seconds: float, budget: float, epochs_probed: int = 2) -> int:
    """How many epochs of a model fit in ``budget`` seconds, from its probe run: the first training epoch's time
    (no validation in it), one validation's time every ``val_interval`` epochs and once at the end, and the start-up
    (caching the volumes, building the network: the probe's wall time less its epochs) once. Falls back to the
    probe's wall time per probed epoch (an overestimate: start-up included) when the log has no epoch times.
    Clipped to [10, 1000]."""
    train_epochs, validations = [], []
    text = train_log.read_text(errors="replace") if train_log.is_file() else ""
    for engine, what, h, m, sec in _TIME_TAKEN.findall(text):
        seconds = int(h) * 3600 + int(m) * 60 + float(sec)
        if engine == "SupervisedTrainer" and what.startswith("Epoch"):
            train_epochs.append(seconds)
        elif engine == "SupervisedEvaluator" and what.startswith("Engine"):
            validations.append(seconds)
    if len(train_epochs) < epochs_probed:
        estimate = (budget - probe_seconds) / (probe_seconds / epochs_probed)
    else:
        interval = json.loads((BUNDLE / "configs" / "train_dynunet.json").read_text()).get("val_interval", 1)
        validation = max(validations, default=0.0)
        startup = max(0.0, probe_seconds - sum(train_epochs))
        per_epoch = train_epochs[0] + validation / max(1, int(interval))
        estimate = (budget - startup - validation) / per_epoch
    return int(max(10, min(1000, estimate)))


def cuda_checks(out: Path, budget: float) -> list[str]:
    """The CUDA tests, ``bench_loss``, ``bench_metrics`` and ``prior_cache_memory --device cuda``, one after the
    other within ``budget`` seconds in all (a step gets what is left; once nothing is, the rest are skipped). Returns
    the names of the steps that failed, timed out or were skipped."""
    py = sys.executable
    steps = {
        "cuda_tests": [py, "-m", "pytest", "tests/test_nacl_loss.py", "tests/test_transforms.py", "-k", "cuda"]
        + ["-p", "no:xdist", "-q"],
        "bench_loss": [py, "benchmarks/bench_loss.py"],
        "bench_metrics": [py, "benchmarks/bench_metrics.py"],
        "prior_cache_memory": [py, "benchmarks/prior_cache_memory.py", "--device", "cuda"],
    }
    failed, deadline = [], time.time() + budget
    for name, cmd in steps.items():
        left = deadline - time.time()
        if left < 5:
            log(out, f"{name}: skipped, the checks' {budget:.0f} s are spent")
            failed.append(name)
        elif not run_step(out, name, cmd, left):
            failed.append(name)
    return failed


PART_BYTES = 15 * 2**20  # a device call brings back files of at most 16 MiB


MANIFEST = "weights_manifest.json"


def pack(out: Path, dest: Path) -> list[Path]:
    """What a device call can bring back (at most 8 files, 16 MiB each, two folders deep): the final weights of each
    model as ``model_<model>.pt`` (in parts ``model_<model>.pt.part0``, ``.part1``... when larger than 15 MiB) and one
    ``gpu_run.tar.gz`` of everything else under ``out`` but weights and checkpoints (logs, timings, facts, calibration
    records, TensorBoard events, benchmark output), with a manifest of each model's files, size and sha256 so that
    :func:`unpack` can tell a lost part from a whole file."""
    import hashlib
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    written, manifest = [], {}
    for model in MODELS:
        weights = out / "final" / model / "models" / "model.pt"
        if not weights.is_file():
            continue
        data = weights.read_bytes()
        if len(data) <= PART_BYTES:
            files = [Path(shutil.copyfile(weights, dest / f"model_{model}.pt"))]
        else:
            files = []
            for i in range(0, len(data), PART_BYTES):
                part = dest / f"model_{model}.pt.part{i // PART_BYTES}"
                part.write_bytes(data[i : i + PART_BYTES])
                files.append(part)
        written += files
        manifest[model] = {
            "files": [f.name for f in files],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    written.append(Path(shutil.copyfile(out / MANIFEST, dest / MANIFEST)))  # also beside the parts: see unpack
    archive = dest / "gpu_run.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            if f.is_file() and f.suffix != ".pt" and dest not in f.parents:
                tar.add(f, arcname=str(f.relative_to(out)))
    written.append(archive)
    log(out, f"packed into {dest}: {', '.join(f'{w.name} ({w.stat().st_size / 2**20:.1f} MiB)' for w in written)}")
    return written


def unpack(src: Path, out: Path) -> list[Path]:
    """The files a device call brought back (``src``, written by :func:`pack`) as the run's folder ``out``: every
    model's weights joined from their files and checked against the archive's manifest (size and sha256) first,
    then the archive extracted and the weights written at ``final/<model>/models/model.pt``, beside the calibration
    record the archive holds. Returns the weights written; a model the run did not finish is reported.

    Raises:
        SystemExit: ``src`` holds no readable manifest or ``gpu_run.tar.gz``; a model's files are missing or do not
            add up to its size and sha256; the archive holds records of a model the manifest does not list; ``out``
            already holds files. Nothing is written then.
    """
    import hashlib
    import tarfile

    archive = src / "gpu_run.tar.gz"
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} already holds files: unpack into a new folder (--out), not over another run")
    if not (src / MANIFEST).is_file():
        raise SystemExit(f"{src}: no {MANIFEST} (not a packed GPU run, or the call left it out)")
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{src / MANIFEST} cannot be read: {e}") from None
    entries_ok = isinstance(manifest, dict) and all(
        model in MODELS
        and isinstance(entry, dict)
        and isinstance(entry.get("files"), list)
        and all(isinstance(n, str) and n == Path(n).name for n in entry["files"])
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
        for model, entry in manifest.items()
    )
    if not entries_ok:
        raise SystemExit(f"{src / MANIFEST}: not a manifest of models {sorted(MODELS)} written by --pack")
    joined = {}
    for model, entry in manifest.items():
        missing = [name for name in entry["files"] if not (src / name).is_file()]
        if missing:
            raise SystemExit(f"{src}: model {model}'s weights are incomplete, missing {missing} of {entry['files']}")
        data = b"".join((src / name).read_bytes() for name in entry["files"])
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SystemExit(
                f"{src}: model {model}'s files {entry['files']} join to {len(data)} bytes that do not match the "
                f"manifest ({entry['bytes']} bytes, sha256 {entry['sha256'][:12]}...)"
            )
        joined[model] = data
    if not archive.is_file():
        raise SystemExit(
            f"{src}: no gpu_run.tar.gz (logs and calibration records); the weights in it check out against "
            f"{MANIFEST}, but they cannot be used without their records"
        )
    try:
        with tarfile.open(archive) as tar:  # read once: its member list, then its contents
            names = tar.getnames()
            models = {n.split("/")[1] for n in names if n.startswith("final/") and n.count("/") >= 2}
            orphans = sorted(models - set(joined))
            if orphans:
                raise SystemExit(
                    f"{archive} holds records of models {orphans} whose weights are not in {MANIFEST}: the pack is "
                    "incomplete"
                )
            for model in MODELS:
                if model not in manifest:
                    print(f"{src}: no weights of model {model} (the run did not finish it; see gpu_hippocampus.log)")
            out.mkdir(parents=True, exist_ok=True)
            tar.extractall(out, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SystemExit(f"{archive} cannot be read: {e}") from None
    weights = []
    for model, data in joined.items():
        target = out / "final" / model / "models" / "model.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        weights.append(target)
    return weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu")))
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    ap.add_argument(
        "--minutes", type=float, default=7.0, help="wall-clock budget for training both models, timing probe included"
    )
    ap.add_argument(
        "--test-minutes",
        type=float,
        default=1.5,
        help="wall-clock budget for the CUDA tests and benchmarks (run first)",
    )
    ap.add_argument("--epochs", type=int, default=None, help="fixed epochs (skips the timing probe)")
    ap.add_argument("--cases", type=int, default=None, help="use only this many training cases (plumbing checks)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--val-interval", type=int, default=None)
    ap.add_argument("--skip-tests", action="store_true", help="skip the CUDA tests and benchmarks")
    ap.add_argument(
        "--unpack",
        type=Path,
        default=None,
        help="put a device call's files (from --pack) back together under --out, and exit",
    )
    ap.add_argument(
        "--pack",
        type=Path,
        default=None,
        help="also write what a device call brings back into this folder (its $OUT): the final weights and one "
        "archive of the rest (tools/prepare_device_run.py prints the whole call)",
    )
    ap.add_argument(
        "--device-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cache the training volumes on the device and augment there (device_data.json); default: on for cuda. "
        "If the timing probe fails with it, the script retries without it.",
    )
    args = ap.parse_args(argv)
    if args.unpack is not None:
        for weights in unpack(args.unpack, args.out.resolve()):
            print(f"wrote {weights}")
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (args.data / "dataset.json").is_file():
        ap.error(f"--data {args.data} holds no MSD Task04 dataset.json")
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    (out / "facts.json").write_text(json.dumps(facts, indent=4))
    log(out, f"facts: {facts}")
    if args.device.startswith("cuda"):
        run_step(out, "nvidia_smi", ["nvidia-smi"], 60)

    datalist = None
    if args.cases:
        full = json.loads((BUNDLE / "configs" / "datalist.json").read_text())
        full["training"] = full["training"][: args.cases]
        full["validation"] = full["validation"][: max(1, args.cases // 4)]
        datalist = out / "datalist_subset.json"
        datalist.write_text(json.dumps(full, indent=4))

    failed = []
    if not args.skip_tests:  # first, and within their own budget: training gets the rest of the command's time
        failed += cuda_checks(out, args.test_minutes * 60)

    budget = args.minutes * 60  # the probe and the final training together
    started = time.time()
    epochs = args.epochs
    if args.device_data is None:
        args.device_data = args.device.startswith("cuda")
    if epochs is None:
        tag = "probe"
        probe = train_both(out, tag, args, 2, datalist, timeout=budget / 2)
        if None in probe.values() and args.device_data:
            log(out, "probe failed with device_data.json; probing again with the volumes on the CPU")
            args.device_data, tag = False, "probe_cpu_data"
            probe = train_both(out, tag, args, 2, datalist, timeout=budget / 2)
        if None in probe.values():
            failed.append("probe")
            epochs = 0
        else:
            left = budget - (time.time() - started)
            epochs = min(planned_epochs(out / tag / m / "train.log", probe[m], left) for m in MODELS)
            log(out, f"probe: {epochs} epochs fit in the {left:.0f} s left for the slower model")
    if epochs:
        left = budget - (time.time() - started) if args.epochs is None else budget
        times = train_both(out, "final", args, epochs, datalist, timeout=max(60.0, left) + 30)
        failed += [f"final/{m}" for m, t in times.items() if t is None]
        (out / "train_times.json").write_text(
            json.dumps({"epochs": epochs, "seconds": times, "device_data": args.device_data}, indent=4)
        )
    log(out, f"done; failed steps: {failed or 'none'}")
    if args.pack is not None:
        pack(out, args.pack)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
