#!/usr/bin/env bash
# nnU-Net's own integration protocol (nnunetv2/tests/integration_tests: 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres
# x 5 folds, find_best_configuration with ensembling, prediction, postprocessing) with any trainer; see
# benchmarks/integration.py for the steps. Example (CPU smoke run, about ... on 2 cores):
#   benchmarks/integration.sh nnUNetTrainerRep3D_1epoch_5iterations --max-features 32 --jobs 2
# PYTHON selects the interpreter (default: python3 on PATH, e.g. the activated .venv).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/integration.py" "$@"
