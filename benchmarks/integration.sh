#!/usr/bin/env bash
# nnU-Net's own integration protocol (nnunetv2/tests/integration_tests: 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres
# x 5 folds, find_best_configuration with ensembling, prediction, postprocessing) with any trainer; see
# benchmarks/integration.py for the steps and options. Examples: the shared 200 cases (or, without them, the 25 that
# ship with the package), and a CPU smoke run on 7 of the shipped cases with CPU-sized networks:
#   benchmarks/integration.sh nnUNetTrainerRep3D_1epoch_5iterations
#   benchmarks/integration.sh nnUNetTrainerRep3D_1epoch_5iterations --data rep3d_nnunet/data/Task04_Hippocampus \
#       --every 4 --max-features 16 --jobs 5
# PYTHON selects the interpreter (default: python3 on PATH, e.g. the activated .venv).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/integration.py" "$@"
