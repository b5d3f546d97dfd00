"""Where nnU-Net finds our trainers, and a plain-words check of a user's setup (``rep3d-nnunet env`` / ``doctor``).

nnU-Net 2.8 and later search the folders listed in ``nnUNet_extTrainer``; ``rep3d-nnunet env`` prints the line that
lists ours. Before 2.8 nnU-Net searches only its own trainer package (it imports every module there and asks each for
the class by name), so ``rep3d-nnunet env`` also writes one small module into that package
(``EXTERNAL_TRAINER_MODULE``): it answers nnU-Net's lookup from the ``nnUNet_extTrainer`` folders, i.e. gives the old
nnU-Net the 2.8 behaviour, and answers nothing once rep3d_nnunet is uninstalled. ``rep3d-nnunet env --undo`` removes
it; the README's setup stays ``eval "$(rep3d-nnunet env)"`` on every version.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .nnunet_compat import external_trainer_folders, has_external_trainer_folders, nnunet_version, trainer_folder

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# In nnunetv2/training/nnUNetTrainer/variants/: searched after nnU-Net's base trainer and before its variant packages.
EXTERNAL_TRAINER_MODULE = "rep3d_nnunet_ext_trainers.py"
_MODULE_MARKER = "Written by `rep3d-nnunet env`"
EXTERNAL_TRAINER_MODULE_SOURCE = f'''"""{_MODULE_MARKER} (rep3d-nnunet): nnU-Net before 2.8 looks up trainers only inside this
package. This module answers that lookup from the folders listed in nnUNet_extTrainer, as nnU-Net 2.8 does itself.
Without rep3d_nnunet installed it answers nothing. Remove it with `rep3d-nnunet env --undo` (or delete this file).
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        from rep3d_nnunet.nnunet_compat import find_in_external_folders
    except ImportError:
        raise AttributeError(name) from None
    found = find_in_external_folders(name)
    if found is None:
        raise AttributeError(name)
    return found
'''


def trainer_folder_registered(environ: dict | None = None) -> bool:
    return any(Path(p).resolve() == trainer_folder() for p in external_trainer_folders(environ))


def export_lines(environ: dict | None = None) -> list[str]:
    """Shell lines that register our trainers with nnU-Net, keeping any folders already listed."""
    folder = str(trainer_folder())
    existing = [p for p in external_trainer_folders(environ) if p != folder]
    return [f"export nnUNet_extTrainer={os.pathsep.join([folder, *existing])}"]


def undo_lines(environ: dict | None = None) -> list[str]:
    """Shell lines that take our trainer folder out of ``nnUNet_extTrainer`` again (others stay listed)."""
    others = [p for p in external_trainer_folders(environ) if Path(p).resolve() != trainer_folder()]
    return [f"export nnUNet_extTrainer={os.pathsep.join(others)}" if others else "unset nnUNet_extTrainer"]


def _nnunet_release() -> str:
    return ".".join(map(str, nnunet_version()))


def external_trainer_module_path() -> Path:
    """Where the lookup module for nnU-Net < 2.8 goes: nnU-Net's ``training/nnUNetTrainer/variants`` folder."""
    # found without importing nnunetv2 (a submodule's find_spec would import its parents): env must stay quick
    package = Path(importlib.util.find_spec("nnunetv2").submodule_search_locations[0])
    return package / "training" / "nnUNetTrainer" / "variants" / EXTERNAL_TRAINER_MODULE


def external_trainer_module_state() -> str:
    """``installed``, ``missing`` or ``stale`` (another text, e.g. written by another rep3d-nnunet version) where nnU-Net
    needs the module; ``not needed`` or ``leftover`` (present although not needed) from nnU-Net 2.8 on."""
    path = external_trainer_module_path()
    present = path.is_file()
    if has_external_trainer_folders():
        return "leftover" if present else "not needed"
    if not present:
        return "missing"
    return "installed" if path.read_text() == EXTERNAL_TRAINER_MODULE_SOURCE else "stale"


def sync_external_trainer_module() -> str | None:
    """Writes the lookup module where this nnU-Net needs it (and removes a leftover one where it does not); idempotent.

    Returns:
        What was done, in one line, or None when nothing had to change.

    Raises:
        PermissionError: nnU-Net's package folder is not writable; the message names it and the fix.
        FileExistsError: a file of that name that we did not write is in the way.
    """
    state, path = external_trainer_module_state(), external_trainer_module_path()
    if state in ("installed", "not needed"):
        return None
    if state == "leftover":
        remove_external_trainer_module()
        return (f"removed {path}: nnU-Net {_nnunet_release()} searches nnUNet_extTrainer itself, the lookup module "
                f"left from an older nnU-Net is not needed.")
    if state == "stale" and _MODULE_MARKER not in path.read_text():
        raise FileExistsError(f"{path} exists and was not written by rep3d-nnunet; move it away, then run "
                              f"rep3d-nnunet env again.")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(EXTERNAL_TRAINER_MODULE_SOURCE)
        os.replace(temporary, path)
    except PermissionError as error:
        temporary.unlink(missing_ok=True)
        raise PermissionError(
            f"cannot write {path} ({error.strerror}): nnU-Net {_nnunet_release()} looks up trainers only inside its "
            f"own package, where rep3d-nnunet env places one small module. Fix: run rep3d-nnunet env once as the "
            f"owner of that folder, or install nnU-Net and rep3d-nnunet into a virtual environment you own.") from None
    return (f"wrote {path}: nnU-Net {_nnunet_release()} has no nnUNet_extTrainer lookup of its own, this module gives "
            f"it one (undo: rep3d-nnunet env --undo).")


def remove_external_trainer_module() -> bool:
    """Removes the lookup module if we wrote it; True when a file was removed.

    Raises:
        PermissionError: nnU-Net's package folder is not writable.
    """
    path = external_trainer_module_path()
    if not path.is_file() or _MODULE_MARKER not in path.read_text():
        return False
    try:
        path.unlink()
    except PermissionError as error:
        raise PermissionError(f"cannot remove {path} ({error.strerror}): run rep3d-nnunet env --undo as the owner "
                              f"of that folder.") from None
    return True


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


def _check_external_trainer_module() -> Finding:
    path, release = external_trainer_module_path(), _nnunet_release()
    state = external_trainer_module_state()
    if state == "not needed":
        return Finding(True, f"nnU-Net {release} searches nnUNet_extTrainer itself: no lookup module needed.")
    if state == "installed":
        return Finding(True, f"nnU-Net {release} has no nnUNet_extTrainer lookup of its own; the lookup module that "
                             f"gives it one is installed ({path}).")
    if state == "leftover":
        return Finding(False, f"{path} is left from an older nnU-Net; nnU-Net {release} does not need it.",
                       "rep3d-nnunet env --undo   (or eval \"$(rep3d-nnunet env)\", which removes it too)",
                       blocking=False)
    what = "missing" if state == "missing" else "stale (written by another rep3d-nnunet version)"
    return Finding(False, f"nnU-Net {release} looks up trainers only inside its own package, and the lookup module "
                          f"that lets it search nnUNet_extTrainer is {what} ({path}).", "eval \"$(rep3d-nnunet env)\"")


def _lookup_probe(trainer_name: str) -> str:
    """Python source that looks the trainer up exactly as this nnU-Net's nnUNetv2_train and nnUNetv2_predict do."""
    if has_external_trainer_folders():
        return (f"from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; "
                f"find({trainer_name!r})")
    return ("import os, nnunetv2; from nnunetv2.utilities.find_class_by_name import recursive_find_python_class as "
            f"find; assert find(os.path.join(nnunetv2.__path__[0], 'training', 'nnUNetTrainer'), {trainer_name!r}, "
            f"'nnunetv2.training.nnUNetTrainer') is not None, 'not found'")


def _check_trainer_lookup(environ) -> Finding:
    if not trainer_folder_registered(environ) or external_trainer_module_state() in ("missing", "stale"):
        return Finding(False, "Skipped the trainer lookup: nnU-Net cannot find the Rep3D trainers yet (see above).")
    # A fresh interpreter with the user's environment: exactly what nnUNetv2_train and nnUNetv2_predict do.
    result = subprocess.run([sys.executable, "-c", _lookup_probe("nnUNetTrainerRep3D")],
                            env={**os.environ, **environ}, capture_output=True, text=True)
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
    return [*_check_paths(environ), _check_trainer_folder(environ), _check_external_trainer_module(),
            _check_torchvision(), _check_trainer_lookup(environ), _check_gpu(), check_worker_processes(environ)]


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
