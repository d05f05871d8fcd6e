"""Real-server check of the ``monailabel_nacl`` MONAI Label app with the Hippocampus bundle (manual; minutes).

Starts ``monailabel start_server`` with ``apps/monailabel_nacl`` on 127.0.0.1 (a free port) in its own process
group, with a copy of ``bundles/hippocampus_mri_nacl_segmentation`` as the app's only bundle and three MSD Task04
test-split cases as studies (their labels as the datastore's final labels), then over HTTP:

    (a) the MONAI Label environment: monailabel 0.8.5, torch, torchvision or the app's stand-in, monai_nacl
    (b) the bundle copied into a temporary app model folder
    (c) three cases as studies, their labels as final labels (``labels/final/<same name>``)
    (d) the server answers ``GET /info/`` and lists the bundle for inference and training
    (e) ``POST /infer/<model>?image=<id>``: segmentation in the input geometry, labels {0,1,2}, Dice printed
    (f) calibrated outputs: ``output_kind`` entropy (finite, in [0, log 3]), probabilities (``.seg.nrrd``,
        sums to 1, argmax = segmentation) and the per-structure summary in the result JSON
    (g) ``POST /train/<model>`` (2 epochs, CPU) until ``GET /train/`` says DONE; ``models/model.pt`` rewritten,
        ``models/model.calibration.json`` whose ``weights_fingerprint`` matches the weights in ``model.pt``;
        the server reloads and serves the new weights
    (h) the server's process group is stopped

One PASS/FAIL line per step; exit status 1 if any failed, 2 if the environment is missing. Every wait is bounded.
Run it with any Python 3: it re-runs itself with the MONAI Label environment's interpreter, with this repository
first on ``PYTHONPATH`` (so the server and the checks use this checkout's ``monai_nacl``)::

    python3 tools/monailabel_server_check.py [--venv /work/mlvenv] [--data ../shared/data/hippocampus]
"""

from __future__ import annotations

import argparse
import email
import email.policy
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "monailabel_nacl"
BUNDLE = "hippocampus_mri_nacl_segmentation"
DEFAULT_VENV = os.environ.get("MONAI_LABEL_VENV", "/work/mlvenv")
DEFAULT_DATA = os.environ.get("MONAI_NACL_HIPPOCAMPUS", str(REPO.parent / "shared" / "data" / "hippocampus"))
LOG3 = math.log(3.0)
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Steps:
    def __init__(self):
        self.failed: list[str] = []

    def passed(self, step: str, msg: str) -> None:
        print(f"PASS ({step}) {msg}", flush=True)

    def fail(self, step: str, msg: str) -> None:
        print(f"FAIL ({step}) {msg}", flush=True)
        self.failed.append(step)


class CheckError(Exception):
    pass


def check(cond, msg: str) -> None:
    if not cond:
        raise CheckError(msg)


# ----------------------------------------------------------------------------------------------- environment


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def reexec_in_venv(args) -> None:
    """Run this script again with the MONAI Label environment's interpreter (once)."""
    venv = Path(args.venv)
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    py = venv_python(venv)
    if not py.is_file():
        print(f"FAIL (a) MONAI Label environment: {py} not found (see docs/monai_label.md)", flush=True)
        sys.exit(2)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]], env)


def check_environment(args, steps: Steps) -> bool:
    probe = (
        "import json, importlib.metadata as md, torch, monai, monai_nacl\n"
        "try:\n"
        "    import torchvision.utils\n"
        "    tv = 'installed ' + md.version('torchvision')\n"
        "except Exception as e:\n"
        "    tv = 'not importable (' + type(e).__name__ + '); the app uses its stand-in'\n"
        "print(json.dumps({'monailabel': md.version('monailabel'), 'torch': torch.__version__,\n"
        "    'cuda': torch.cuda.is_available(), 'monai': monai.__version__, 'torchvision': tv,\n"
        "    'pydicom': md.version('pydicom'), 'monai_nacl': monai_nacl.__file__}))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=180,
            env=server_env(),
        )
        check(out.returncode == 0, out.stderr.strip()[-800:])
        info = json.loads(out.stdout.strip().splitlines()[-1])
        check(info["monailabel"] == "0.8.5", f"monailabel {info['monailabel']}, expected 0.8.5")
        check(
            Path(info["monai_nacl"]).resolve().is_relative_to(REPO), f"monai_nacl from {info['monai_nacl']}, not {REPO}"
        )
        steps.passed("a", f"environment {args.venv}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        return True
    except Exception as e:
        steps.fail("a", f"environment {args.venv}: {type(e).__name__}: {e}")
        return False


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")
    return env


# ----------------------------------------------------------------------------------------------- HTTP


def http(method: str, url: str, *, fields: dict | None = None, body: dict | None = None, timeout: float = 60):
    """(status, headers, bytes); ``fields`` are sent as multipart/form-data, ``body`` as JSON."""
    data, headers = None, {}
    if fields is not None:
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        ]
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def infer(base: str, image_id: str, params: dict, work: Path, tag: str, timeout: float) -> tuple[dict, Path]:
    """POST /infer/<model>?image=<id>&output=all; returns (result JSON, saved result file)."""
    query = urllib.parse.urlencode({"image": image_id, "output": "all"})
    t = time.monotonic()
    status, headers, raw = http(
        "POST", f"{base}/infer/{BUNDLE}?{query}", fields={"params": json.dumps(params)}, timeout=timeout
    )
    check(status == 200, f"HTTP {status}: {raw[:500]!r}")
    ctype = next(v for k, v in headers.items() if k.lower() == "content-type")
    msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw, policy=email.policy.HTTP)
    result, path = None, None
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        if part.get_filename():
            name = part.get_filename()
            suffix = "".join(Path(name).suffixes[-2:]) if name.endswith((".nii.gz", ".seg.nrrd")) else Path(name).suffix
            path = work / f"result_{tag}{suffix}"
            path.write_bytes(payload)
        else:
            result = json.loads(payload)
    check(result is not None and path is not None, f"response without a result file or JSON ({ctype})")
    say(f"infer {image_id} {params}: {time.monotonic() - t:.1f}s, {path.name} ({path.stat().st_size} bytes)")
    return result, path


# ----------------------------------------------------------------------------------------------- images


def load_nifti(path: Path):
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def load_nrrd(path: Path):
    """Array (channels first as written by MONAI Label's seg.nrrd writer) and the RAS affine of the spatial axes."""
    import nrrd
    import numpy as np

    check(path.read_bytes()[:4] == b"NRRD", f"{path.name} is not an NRRD file")
    arr, header = nrrd.read(str(path))
    dirs = np.asarray(header["space directions"], dtype=float)
    dirs = dirs[~np.isnan(dirs).any(axis=1)]  # drop the 'list' (channel) axis
    check(header.get("space") == "left-posterior-superior", f"NRRD space {header.get('space')}")
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ dirs.T
    affine[:3, 3] = lps_to_ras @ np.asarray(header["space origin"], dtype=float)
    return arr, affine


def same_geometry(shape, affine, ref_shape, ref_affine) -> bool:
    import numpy as np

    return tuple(shape) == tuple(ref_shape) and np.allclose(affine, ref_affine, atol=1e-4)


def dice(a, b, c: int) -> float:
    x, y = a == c, b == c
    den = int(x.sum()) + int(y.sum())
    return float("nan") if den == 0 else 2.0 * int((x & y).sum()) / den


def check_segmentation(path: Path, image: Path, truth: Path) -> str:
    import numpy as np

    seg, aff = load_nifti(path)
    img, img_aff = load_nifti(image)
    gt, _ = load_nifti(truth)
    seg = np.squeeze(seg)
    check(same_geometry(seg.shape, aff, img.shape, img_aff), f"shape {seg.shape} / affine differ from the input's")
    values = sorted(int(v) for v in np.unique(seg))
    check(np.allclose(seg, np.round(seg)), "non-integer labels")
    check(set(values) <= {0, 1, 2} and {1, 2} <= set(values), f"labels {values}, expected {{0, 1, 2}}")
    d1, d2 = dice(seg, gt, 1), dice(seg, gt, 2)
    return f"shape {seg.shape}, dtype {seg.dtype}, labels {values}, input geometry; Dice anterior {d1:.3f}, posterior {d2:.3f}"


def check_summary(result: dict) -> str:
    structures = result.get("structures")
    check(isinstance(structures, dict), f"no 'structures' in the result JSON (keys {sorted(result)})")
    check({"anterior", "posterior"} <= set(structures), f"structures {sorted(structures)}")
    parts = []
    for name in ("anterior", "posterior"):
        s = structures[name]
        for key in ("volume_ml", "mean_entropy", "mean_max_probability"):
            check(key in s and math.isfinite(float(s[key])), f"{name}.{key} missing or not finite: {s.get(key)}")
        check(s["volume_ml"] > 0, f"{name} volume {s['volume_ml']}")
        check(0 <= s["mean_entropy"] <= LOG3 + 1e-5, f"{name} mean entropy {s['mean_entropy']}")
        check(1 / 3 - 1e-5 <= s["mean_max_probability"] <= 1 + 1e-5, f"{name} mean max p {s['mean_max_probability']}")
        parts.append(
            f"{name} {s['volume_ml']:.3f} ml, mean entropy {s['mean_entropy']:.3f}, "
            f"mean max p {s['mean_max_probability']:.3f}"
        )
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- weights


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def as_int(value) -> int:
    """A fingerprint as an int, from an int or a hex string (the record's form)."""
    return int(value) if isinstance(value, int) else int(str(value).lower().removeprefix("0x"), 16)


def fingerprint_of(bundle: Path) -> tuple[int, int | None]:
    """``weights_fingerprint`` of the bundle's inference network with ``models/model.pt`` loaded strictly, and the
    checkpoint's ``calibrated_for`` entry (the weights its temperature was fitted for) if it has one."""
    import torch
    from monai.bundle import ConfigParser

    from monai_nacl.temperature import weights_fingerprint

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network_def")
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    net.load_state_dict(state, strict=True)
    calibrated_for = state.get("calibrated_for")
    return as_int(weights_fingerprint(net)), None if calibrated_for is None else int(calibrated_for)


# ----------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_for_info(base: str, proc: subprocess.Popen, log: Path, timeout: float) -> dict:
    deadline, attempts = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and attempts < int(timeout) + 1:
        attempts += 1
        check(proc.poll() is None, f"server exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            status, _, raw = http("GET", f"{base}/info/", timeout=5)
            if status == 200:
                say(f"server up after {attempts} attempts")
                return json.loads(raw)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1)
    raise CheckError(f"no answer from {base}/info/ within {timeout:.0f}s ({attempts} attempts):\n{log_tail(log)}")


def stop_server(proc: subprocess.Popen) -> str:
    if proc.poll() is not None:
        return f"server had already exited ({proc.returncode})"
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # the group may outlive its leader (a training subprocess)
        os.killpg(proc.pid, 0)
        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1)
    except ProcessLookupError:
        pass
    try:
        os.killpg(proc.pid, 0)
        raise CheckError(f"process group {proc.pid} still alive")
    except ProcessLookupError:
        return f"process group {proc.pid} stopped (server exit status {proc.returncode})"


def train(base: str, args, log: Path) -> dict:
    body = {"max_epochs": args.epochs, "device": "cpu", "multi_gpu": False, "pretrained": True}
    if args.val_split is not None:
        body["val_split"] = args.val_split
    status, _, raw = http("POST", f"{base}/train/{BUNDLE}", body=body, timeout=60)
    check(status == 200, f"POST /train/{BUNDLE}: HTTP {status}: {raw[:500]!r}")
    say(f"training started: {body}")
    deadline, polls, last, task = time.monotonic() + args.train_timeout, 0, None, {}
    while time.monotonic() < deadline and polls < int(args.train_timeout / 5) + 2:
        polls += 1
        time.sleep(5)
        status, _, raw = http("GET", f"{base}/train/", timeout=30)
        check(status == 200, f"GET /train/: HTTP {status}: {raw[:300]!r}")
        task = json.loads(raw)
        details = task.get("details") or []
        line = details[-1] if details else ""
        if line != last:
            say(f"train {task.get('status')}: {line[-160:]}")
            last = line
        if task.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
    else:
        http("DELETE", f"{base}/train/", timeout=30)
        raise CheckError(f"training not finished within {args.train_timeout}s ({polls} polls); stopped it")
    if task.get("status") != "DONE":
        details = "\n".join(task.get("details") or [])
        raise CheckError(f"training {task.get('status')}; last lines:\n{details}\n-- server log --\n{log_tail(log)}")
    return task


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=DEFAULT_VENV, help="MONAI Label virtual environment (default %(default)s)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="MSD Task04 Hippocampus folder (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--val-split", type=float, default=None, help="MONAI Label's val_split (default: its own)")
    ap.add_argument("--start-timeout", type=float, default=180)
    ap.add_argument("--infer-timeout", type=float, default=180)
    ap.add_argument("--train-timeout", type=float, default=420)
    ap.add_argument("--no-train", action="store_true", help="skip step (g)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    reexec_in_venv(args)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # this checkout's monai_nacl for the fingerprint

    steps = Steps()
    say(f"python {sys.executable}; repo {REPO}")
    if not check_environment(args, steps):
        return 2

    work = Path(tempfile.mkdtemp(prefix="monailabel_check_"))
    proc, log = None, work / "server.log"
    try:
        # (b) bundle
        try:
            model_dir = work / "model"
            bundle = model_dir / BUNDLE
            shutil.copytree(
                REPO / "bundles" / BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "checkpoints", "__pycache__")
            )
            check((bundle / "models" / "model.pt").is_file(), "no models/model.pt")
            steps.passed("b", f"bundle copied to {bundle}")
        except Exception as e:
            steps.fail("b", f"bundle: {type(e).__name__}: {e}")
            return 1

        # (c) studies and final labels
        try:
            data = Path(args.data)
            datalist = json.loads((bundle / "configs" / "datalist.json").read_text())
            cases = [Path(d["image"]).name for d in datalist["test"][:3]]
            studies = work / "studies"
            (studies / "labels" / "final").mkdir(parents=True)
            for name in cases:
                shutil.copy(data / "imagesTr" / name, studies / name)
                shutil.copy(data / "labelsTr" / name, studies / "labels" / "final" / name)
            ids = [n.removesuffix(".nii.gz") for n in cases]
            steps.passed("c", f"studies {ids} from {data} (test split), labels in labels/final/")
        except Exception as e:
            steps.fail("c", f"studies: {type(e).__name__}: {e}")
            return 1

        # (d) server
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies)]
        cmd += ["--conf", "bundles", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        say("starting: " + " ".join(cmd))
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=server_env()
            )
        try:
            info = wait_for_info(base, proc, log, args.start_timeout)
            check(BUNDLE in info.get("models", {}), f"models {sorted(info.get('models', {}))}")
            check(BUNDLE in info.get("trainers", {}), f"trainers {sorted(info.get('trainers', {}))}")
            options = info["models"][BUNDLE].get("config", {})
            check(info["datastore"].get("completed") == len(ids), f"datastore {info['datastore']}")
            steps.passed(
                "d", f"server on {base} (pid {proc.pid}); infer options {options}; datastore {info['datastore']}"
            )
        except Exception as e:
            steps.fail("d", f"server: {type(e).__name__}: {e}")
            return 1

        case = ids[0]
        image, truth = studies / f"{case}.nii.gz", studies / "labels" / "final" / f"{case}.nii.gz"

        # (e) segmentation, default options
        seg_path, summary_of = None, None
        try:
            result, seg_path = infer(base, case, {}, work, "seg", args.infer_timeout)
            steps.passed("e", f"infer {case} (default output): " + check_segmentation(seg_path, image, truth))
        except Exception as e:
            steps.fail("e", f"infer {case}: {type(e).__name__}: {e}")

        # (f) calibrated outputs
        try:
            import numpy as np

            result, path = infer(base, case, {"output_kind": "entropy"}, work, "entropy", args.infer_timeout)
            summary_of = result
            ent, aff = load_nifti(path)
            img, img_aff = load_nifti(image)
            ent = np.squeeze(ent)
            check(same_geometry(ent.shape, aff, img.shape, img_aff), f"entropy shape {ent.shape} / affine differ")
            check(ent.dtype == np.float32, f"entropy dtype {ent.dtype}")
            check(np.isfinite(ent).all(), "entropy has non-finite voxels")
            check(ent.min() >= -1e-6 and ent.max() <= LOG3 + 1e-5, f"entropy in [{ent.min()}, {ent.max()}]")
            steps.passed(
                "f",
                f"entropy: shape {ent.shape}, float32, finite, in [{ent.min():.4f}, {ent.max():.4f}] "
                f"within [0, log 3 = {LOG3:.4f}], mean {ent.mean():.4f}",
            )
        except Exception as e:
            steps.fail("f", f"entropy: {type(e).__name__}: {e}")
        try:
            import numpy as np

            params = {"output_kind": "probabilities", "result_extension": ".seg.nrrd"}
            result, path = infer(base, case, params, work, "prob", args.infer_timeout)
            prob, aff = load_nrrd(path)
            img, img_aff = load_nifti(image)
            check(prob.ndim == 4 and prob.shape[0] == 3, f"probabilities shape {prob.shape}, expected (3, ...)")
            check(same_geometry(prob.shape[1:], aff, img.shape, img_aff), "probabilities geometry differs")
            check(np.isfinite(prob).all() and prob.min() >= -1e-6 and prob.max() <= 1 + 1e-6, "values outside [0, 1]")
            err = float(np.abs(prob.sum(0) - 1).max())
            check(err < 1e-4, f"channels sum to 1 within {err}")
            agree = ""
            if seg_path is not None:
                seg = np.squeeze(load_nifti(seg_path)[0])
                frac = float((prob.argmax(0) == seg).mean())
                check(frac > 0.999, f"argmax agrees with the segmentation on {frac:.5f} of voxels")
                agree = f", argmax = segmentation on {frac:.5f} of voxels"
            steps.passed("f", f"probabilities (.seg.nrrd): shape {prob.shape}, sum to 1 within {err:.1e}{agree}")
        except Exception as e:
            steps.fail("f", f"probabilities: {type(e).__name__}: {e}")
        try:
            import numpy as np

            result, path = infer(base, case, {"output_kind": "outer_mask"}, work, "outer", args.infer_timeout)
            outer, aff = load_nifti(path)
            img, img_aff = load_nifti(image)
            outer = np.squeeze(outer)
            check(same_geometry(outer.shape, aff, img.shape, img_aff), "outer mask geometry differs")
            check(set(np.unique(outer).tolist()) <= {0, 1, 2}, f"outer mask values {np.unique(outer)}")
            covered = ""
            if seg_path is not None:
                seg = np.squeeze(load_nifti(seg_path)[0])
                frac = float(((outer > 0) | (seg == 0)).mean())
                check(frac > 0.99, f"outer mask misses {1 - frac:.4f} of the segmented voxels")
                covered = f", holds the segmentation's foreground on {frac:.4f} of voxels"
            intervals = (result or {}).get("volume_intervals", {}).get("structures", {})
            check(set(intervals) == {"anterior", "posterior"}, f"volume_intervals in the result JSON: {intervals}")
            for name, v in intervals.items():
                check(v["low_ml"] <= v["expected_volume_ml"] <= v["high_ml"], f"{name} interval {v}")
            widths = ", ".join(f"{k} {v['low_ml']:.2f}-{v['high_ml']:.2f} mL" for k, v in intervals.items())
            steps.passed("f", f"conformal outer mask: {int((outer > 0).sum())} voxels{covered}; intervals {widths}")
        except Exception as e:
            steps.fail("f", f"conformal outputs: {type(e).__name__}: {e}")
        try:
            check(summary_of is not None, "no result JSON (the entropy request failed)")
            steps.passed("f", f"summary in the result JSON of {case}: " + check_summary(summary_of))
        except Exception as e:
            steps.fail("f", f"summary: {type(e).__name__}: {e}")

        # (g) training
        if args.no_train:
            print("SKIP (g) training (--no-train)", flush=True)
        else:
            models = bundle / "models"
            record = models / "model.calibration.json"
            try:
                before_sha, before_mtime = sha256(models / "model.pt"), (models / "model.pt").stat().st_mtime
                record_before = record.read_bytes() if record.is_file() else None
                say(f"before training: model.pt sha256 {before_sha[:12]}, record present: {record.is_file()}")
                t = time.monotonic()
                train(base, args, log)
                say(f"training finished in {time.monotonic() - t:.0f}s")
                after_sha = sha256(models / "model.pt")
                check(after_sha != before_sha and (models / "model.pt").stat().st_mtime > before_mtime, "not rewritten")
                check(record.is_file(), f"{record.name} missing; models/: {sorted(p.name for p in models.iterdir())}")
                check(record.read_bytes() != record_before, f"{record.name} not rewritten")
                # conformal thresholds of the old weights must not survive next to the new ones
                conformal = models / "model.conformal.json"
                if conformal.is_file():
                    fingerprints = [json.loads(f.read_text())["weights_fingerprint"] for f in (record, conformal)]
                    check(fingerprints[0] == fingerprints[1], "a stale model.conformal.json was left beside model.pt")
                rec = json.loads(record.read_text())
                check("weights_fingerprint" in rec, f"no weights_fingerprint in {record.name}: {sorted(rec)}")
                fp, calibrated_for = fingerprint_of(bundle)
                check(
                    as_int(rec["weights_fingerprint"]) == fp,
                    f"record {rec['weights_fingerprint']} != weights {fp:016x}",
                )
                check(
                    calibrated_for in (None, fp), f"model.pt calibrated_for {calibrated_for:016x} != weights {fp:016x}"
                )
                steps.passed(
                    "g",
                    f"trained {args.epochs} epochs in {time.monotonic() - t:.0f}s: model.pt rewritten "
                    f"({before_sha[:12]} -> {after_sha[:12]}), {record.name} weights_fingerprint {fp:016x} matches the weights in model.pt"
                    + ("" if calibrated_for is None else " (and its calibrated_for)"),
                )
            except Exception as e:
                steps.fail("g", f"training: {type(e).__name__}: {e}")
            else:
                try:
                    _, path = infer(base, case, {}, work, "seg_trained", args.infer_timeout)
                    summary = check_segmentation(path, image, truth)
                    check("Reload model" in log.read_text(errors="replace"), "server did not reload model.pt")
                    steps.passed("g", f"served after training (model reloaded): {summary}")
                except Exception as e:
                    steps.fail("g", f"infer after training: {type(e).__name__}: {e}")
    finally:
        if proc is not None:
            try:
                steps.passed("h", stop_server(proc))
            except Exception as e:
                steps.fail("h", f"stop: {type(e).__name__}: {e}")
        if steps.failed or args.keep:
            say(f"kept {work} (server log: {log})")
            if steps.failed:
                print("-- server log (tail) --\n" + log_tail(log, 40), flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        say(f"{'FAIL' if steps.failed else 'PASS'}: {len(steps.failed)} failed step(s) {sorted(set(steps.failed))}")
    return 1 if steps.failed else 0


if __name__ == "__main__":
    sys.exit(main())
