#!/usr/bin/env bash
# nnU-Net's own integration protocol (nnunetv2/tests/integration_tests: 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres
# x 5 folds, find_best_configuration with ensembling, prediction, postprocessing) with any trainer; see
# benchmarks/integration.py for the steps and options. Examples: a download of the task (the MSD release folder), and
# a CPU smoke run on 7 of the 25 cases that ship with the package, with CPU-sized networks:
#   benchmarks/integration.sh nnUNetTrainerRep3D_1epoch_5iterations --data /data/Task04_Hippocampus
#   benchmarks/integration.sh nnUNetTrainerRep3D_1epoch_5iterations --every 4 --max-features 16 --jobs 5
# PYTHON selects the interpreter (default: python3 on PATH, e.g. the activated .venv).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/integration.py" "$@"
