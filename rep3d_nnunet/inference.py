"""``rep3d-nnunet predict``: nnU-Net's predictor for model folders whose plans use this package's preprocessing.

For plans written by nnU-Net or by ``rep3d-nnunet plan`` without a preset, ``nnUNetv2_predict`` and
``nnUNetv2_predict_from_modelfolder`` work as they are. Plans of a paper preset name ``Rep3DPaperPreprocessor``, which
nnU-Net cannot look up (it searches its own package only); this command is nnU-Net's predictor with the configuration
manager swapped for one that also knows our preprocessors, and otherwise nnU-Net's defaults (Gaussian sliding window,
step 0.5, mirroring).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def predict_from_model_folder(input_folder: str | Path, output_folder: str | Path, model_folder: str | Path,
                              folds: tuple = (0, 1, 2, 3, 4), checkpoint: str = "checkpoint_final.pth",
                              device: str = "cuda", save_probabilities: bool = False, use_mirroring: bool = True,
                              num_processes_preprocessing: int = 2, num_processes_export: int = 2) -> None:
    """Predicts every case of ``input_folder`` (nnU-Net raw naming, ``CASE_0000.nii.gz``) with a trained or exported
    model folder, writing nnU-Net's outputs to ``output_folder``.

    Raises:
        FileNotFoundError: the model folder or a requested fold's checkpoint is missing, or the input folder is.
        ModelFolderError: a checkpoint is unreadable or does not belong to the folder's plans.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from . import eval_cache
    from .model_folder import ModelFolder
    from .preprocessing import Rep3DConfigurationManager

    folder = ModelFolder.open(model_folder)
    folder.check_folds(folds, checkpoint)
    for fold in folds:  # each readable and belonging to these plans, before nnU-Net's predictor loads them
        folder.load_checkpoint(folder.checkpoint_path(fold, checkpoint))
    input_folder = Path(input_folder)
    if not input_folder.is_dir():
        raise FileNotFoundError(f"Input folder {input_folder} does not exist.")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=True, device=torch.device(device), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), tuple(folds), checkpoint)
    predictor.configuration_manager = Rep3DConfigurationManager(predictor.configuration_manager.configuration)
    try:
        predictor.predict_from_files(str(input_folder), str(output_folder), save_probabilities=save_probabilities,
                                     overwrite=True, num_processes_preprocessing=num_processes_preprocessing,
                                     num_processes_segmentation_export=num_processes_export)
    finally:
        eval_cache.release(predictor.network)  # the masks and kernel spectra of the model are done with


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, help="folder of images in nnU-Net raw naming")
    parser.add_argument("-o", "--output", required=True, help="folder for the segmentations")
    parser.add_argument("-m", "--model-folder", required=True, help="trained or exported nnU-Net model folder")
    parser.add_argument("-f", "--folds", nargs="+", default=["0", "1", "2", "3", "4"], help="folds to ensemble")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("-device", "--device", default="cuda", choices=["cuda", "cpu", "mps"])
    parser.add_argument("--save_probabilities", action="store_true")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    parser.add_argument("-npp", type=int, default=2, help="preprocessing processes")
    parser.add_argument("-nps", type=int, default=2, help="segmentation export processes")


def run_from_args(args: argparse.Namespace) -> None:
    folds = tuple(f if f == "all" else int(f) for f in args.folds)
    predict_from_model_folder(args.input, args.output, args.model_folder, folds, args.checkpoint, args.device,
                              args.save_probabilities, not args.disable_tta, args.npp, args.nps)
