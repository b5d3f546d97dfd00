"""Where nnU-Net finds our trainers, and a plain-words check of a user's setup (``rep3d-nnunet env`` / ``doctor``)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def trainer_folder() -> Path:
    """The installed ``nnUNet_trainers`` folder that ``nnUNet_extTrainer`` must list."""
    import nnUNet_trainers

    return Path(nnUNet_trainers.__file__).resolve().parent


def trainer_folder_registered(environ: dict | None = None) -> bool:
    environ = os.environ if environ is None else environ
    listed = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    return any(Path(p).resolve() == trainer_folder() for p in listed)


def export_lines(environ: dict | None = None) -> list[str]:
    """Shell lines that register our trainers with nnU-Net, keeping any folders already listed."""
    environ = os.environ if environ is None else environ
    folder = str(trainer_folder())
    existing = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip() and p != folder]
    return [f"export nnUNet_extTrainer={os.pathsep.join([folder, *existing])}"]


@dataclass
class Finding:
    ok: bool
    what: str
    fix: str = ""
    blocking: bool = True


def _check_paths(environ) -> list[Finding]:
    findings = []
    for name in NNUNET_PATH_VARIABLES:
        value = environ.get(name)
        if not value:
            findings.append(Finding(False, f"{name} is not set.",
                                    f"export {name}=/path/to/{name} (nnU-Net needs it for planning, training, inference)"))
        elif not Path(value).is_dir():
            findings.append(Finding(False, f"{name}={value} does not exist.", f"mkdir -p {value}"))
        else:
            findings.append(Finding(True, f"{name}={value}"))
    return findings


def _check_trainer_folder(environ) -> Finding:
    if trainer_folder_registered(environ):
        return Finding(True, f"nnUNet_extTrainer lists the Rep3D trainers ({trainer_folder()}).")
    return Finding(False, "nnUNet_extTrainer does not list the Rep3D trainer folder, so nnUNetv2_train -tr "
                          "nnUNetTrainerRep3D and nnUNetv2_predict on Rep3D models will not find the trainers.",
                   f"eval \"$(rep3d-nnunet env)\"   # or: {export_lines(environ)[0]}")


def _check_torchvision() -> Finding:
    import torch

    try:
        import torchvision  # noqa: F401  nnU-Net's trainer lookup imports timm, which imports torchvision
        from torchvision.ops import nms  # noqa: F401
    except ModuleNotFoundError:
        return Finding(False, "torchvision is not installed; nnU-Net's trainer lookup imports it (through timm).",
                       "pip install torch torchvision  (as a matching pair from the package index)")
    except (RuntimeError, ImportError) as error:
        return Finding(False, f"torchvision does not match torch {torch.__version__} ({error}). nnU-Net's trainer "
                              f"lookup crashes with 'operator torchvision::nms does not exist'.",
                       "pip install --force-reinstall torch torchvision  (a matching pair; CPU-only torch wheels "
                       "have no matching torchvision)")
    return Finding(True, f"torch {torch.__version__} and torchvision {torchvision.__version__} match.")


def _check_trainer_lookup(environ) -> Finding:
    if not trainer_folder_registered(environ):
        return Finding(False, "Skipped the trainer lookup: nnUNet_extTrainer is not set up (see above).")
    # A fresh interpreter with the user's environment: exactly what nnUNetv2_train and nnUNetv2_predict do.
    probe = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; "
             "find('nnUNetTrainerRep3D')")
    result = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **environ}, capture_output=True,
                            text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Finding(False, f"nnU-Net could not load nnUNetTrainerRep3D: {last_line}",
                       "fix the problems above, then run rep3d-nnunet doctor again")
    return Finding(True, "nnU-Net finds nnUNetTrainerRep3D.")


def _check_gpu() -> Finding:
    import torch

    if torch.cuda.is_available():
        return Finding(True, f"GPU: {torch.cuda.get_device_name(0)}.")
    return Finding(False, "No CUDA GPU is visible: training runs on the CPU only (nnUNetv2_train ... -device cpu), "
                          "which is fine for the demo and far too slow for real datasets.",
                   "check nvidia-smi and that torch was installed with CUDA support", blocking=False)


def check_worker_processes(environ, cores: int | None = None) -> Finding:
    """nnU-Net's worker pools (preprocessing, validation export, prediction) have nnUNet_def_n_proc processes, 8
    when unset, whatever the machine has. Each imports torch and nnU-Net when it starts: on 2 CPU cores the first
    validation case of a small model took 38 s instead of 1 s (8 workers starting) and validation waited 33 s more
    for the pool (measured with nnunetv2 2.8.1)."""
    cores = cores or os.cpu_count() or 1
    value = environ.get("nnUNet_def_n_proc")
    workers = int(value) if value and value.isdigit() else 8
    if workers <= cores:
        return Finding(True, f"nnUNet_def_n_proc={workers}: nnU-Net's worker pools fit the {cores} CPU cores.")
    what = f"nnUNet_def_n_proc={value}" if value else "nnUNet_def_n_proc is not set (nnU-Net then uses 8)"
    return Finding(False, f"{what}: nnU-Net's preprocessing, validation export and prediction start {workers} "
                          f"worker processes on {cores} CPU cores; starting them stalls the first cases for tens of "
                          f"seconds.", f"export nnUNet_def_n_proc={cores}", blocking=False)


def diagnose(environ: dict | None = None) -> list[Finding]:
    environ = dict(os.environ if environ is None else environ)
    return [*_check_paths(environ), _check_trainer_folder(environ), _check_torchvision(),
            _check_trainer_lookup(environ), _check_gpu(), check_worker_processes(environ)]


def report(findings: list[Finding]) -> tuple[str, int]:
    """Human-readable lines and the exit status (1 if any blocking problem)."""
    lines = []
    for f in findings:
        mark = "ok  " if f.ok else ("FAIL" if f.blocking else "warn")
        lines.append(f"[{mark}] {f.what}")
        if not f.ok and f.fix:
            lines.append(f"       fix: {f.fix}")
    status = int(any(not f.ok and f.blocking for f in findings))
    lines.append("All checks passed." if status == 0 else "Some checks failed; see the fixes above.")
    return "\n".join(lines), status
