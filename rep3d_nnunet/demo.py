"""The end-to-end demo: synthetic dataset -> nnU-Net planning -> Rep3D training -> folded export -> predict -> Dice.

Every step is the command a user would type (printed before it runs), so the demo doubles as a walkthrough.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .environment import export_lines


@dataclass
class DemoSettings:
    """What the demo runs; the defaults finish in minutes on 2 CPU cores."""

    workdir: Path
    dataset_id: int = 990
    trainer: str = "nnUNetTrainerRep3D_quick"
    configuration: str = "3d_fullres"
    base_features: int = 8
    num_training: int = 20
    num_test: int = 4
    size: tuple[int, int, int] = (32, 32, 32)
    device: str = "auto"
    seed: int = 0


def _bin(name: str) -> str:
    """A console script installed beside the running interpreter (the same environment as this package)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _run(command: list[str], env: dict) -> None:
    print("\n$ " + " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, env=env, check=True)
    print(f"  ({time.time() - started:.0f} s)", flush=True)


def demo_environment(workdir: Path, device: str) -> dict:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(workdir / name)
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    env["nnUNet_extTrainer"] = export_lines(env)[0].split("=", 1)[1]
    if device == "cpu":
        # two cores: augmentation workers would compete with the training step for them
        env.setdefault("nnUNet_n_proc_DA", "1")
    return env


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def mean_dice(summary_file: Path) -> dict[str, float]:
    """Dice per label from nnU-Net's evaluation summary.json."""
    summary = json.loads(summary_file.read_text())
    return {label: values["Dice"] for label, values in summary["mean"].items()}


def run_demo(settings: DemoSettings) -> dict[str, float]:
    """Runs the whole pipeline and returns the Dice per label of the exported model on held-out cases."""
    from .datasets.synthetic import generate_synthetic_dataset

    started = time.time()
    workdir = settings.workdir.resolve()
    device = resolve_device(settings.device)
    env = demo_environment(workdir, device)
    print(f"Working in {workdir} on {device}. nnU-Net paths for this shell:")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        print(f"  export {name}={env[name]}")

    print("\n# 1. convert: a synthetic dataset in nnU-Net's raw format")
    dataset = generate_synthetic_dataset(
        Path(env["nnUNet_raw"]), settings.dataset_id, task="local", num_training=settings.num_training,
        num_test=settings.num_test, size=settings.size, seed=settings.seed, overwrite=True,
    )
    print(f"  wrote {dataset}")
    d, c = str(settings.dataset_id), settings.configuration

    print("\n# 2. plan and preprocess (nnU-Net), then the Rep3D-aware plan on top")
    _run([_bin("nnUNetv2_plan_and_preprocess"), "-d", d, "-c", c, "-np", "2", "--verify_dataset_integrity"], env)
    _run([_bin("rep3d-nnunet"), "plan", "-d", d, "-c", c, "--base-features", str(settings.base_features)], env)

    print("\n# 3. train fold 0")
    _run([_bin("nnUNetv2_train"), d, c, "0", "-tr", settings.trainer, "-p", "Rep3DPlans", "-device", device], env)
    trained = Path(env["nnUNet_results"]) / dataset.name / f"{settings.trainer}__Rep3DPlans__{c}"

    print("\n# 4. export with the generator folded away")
    exported = trained.with_name(f"{settings.trainer}__Rep3DPlans_folded__{c}")
    if exported.exists():
        import shutil

        shutil.rmtree(exported)
    _run([_bin("rep3d-nnunet"), "export", str(trained), "-o", str(exported)], env)

    print("\n# 5. predict held-out cases with the exported model")
    predictions = workdir / "predictions"
    _run([_bin("nnUNetv2_predict_from_modelfolder"), "-i", str(dataset / "imagesTs"), "-o", str(predictions),
          "-m", str(exported), "-f", "0", "-device", device, "-npp", "1", "-nps", "1"], env)

    print("\n# 6. evaluate with nnU-Net's evaluation")
    summary = predictions / "summary.json"
    _run([_bin("nnUNetv2_evaluate_folder"), str(dataset / "labelsTs"), str(predictions),
          "-djfile", str(exported / "dataset.json"), "-pfile", str(exported / "plans.json"),
          "-o", str(summary), "-np", "1"], env)
    dice = mean_dice(summary)
    print("\nDice per class on held-out cases (exported, folded model):")
    for label, value in dice.items():
        print(f"  class {label}: {value:.3f}")
    print(f"Total wall time: {time.time() - started:.0f} s")
    return dice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet demo``."""
    parser.add_argument("--workdir", default="rep3d_demo")
    parser.add_argument("--dataset-id", type=int, default=DemoSettings.dataset_id)
    parser.add_argument("--trainer", default=DemoSettings.trainer)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def run_from_args(args: argparse.Namespace) -> None:
    """Runs the demo described by parsed :func:`add_arguments` flags (it prints as it goes)."""
    run_demo(DemoSettings(workdir=Path(args.workdir), dataset_id=args.dataset_id, trainer=args.trainer,
                          device=args.device))
