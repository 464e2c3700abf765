#!/bin/bash
# Every GPU path of the template in one run, as one table (see scripts/gpu_check.py): under 8 minutes on one GPU.
#   scripts/gpu_check.sh [--out gpu_check.md]        # on a GPU machine, in the environment the project runs in
#   scripts/gpu_check.sh --accelerator cpu           # a dry run of the script on a CPU
# It installs nothing: the machine it is meant for may have no network.
cd "$(dirname "$0")/.." && exec python scripts/gpu_check.py "$@"
