#!/usr/bin/env bash
# Ships this checkout to every worker of a TPU slice and installs it with `pip install -e .[tpu]`.
#
# usage: launch/tpu/setup.sh --zone ZONE [--name NAME] [--project PROJECT] [--print]
#
#   Files shipped: what git tracks plus untracked files that .gitignore does not exclude.
#   --print         print the commands instead of running them
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_ship
tpu_install
