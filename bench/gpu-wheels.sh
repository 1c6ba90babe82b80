#!/usr/bin/env bash
# Wheels of the packages bench/gpu.sh needs that the GPU machine's image lacks (its Python is 3.12
# and holds torch, numpy, scipy, scikit-learn, pandas, typer, pytest), at constraints.txt's
# versions, into .whl/ (ignored by git): run here, then carry .whl with bench/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
NEED="optuna optuna-dashboard sqlalchemy alembic mako colorlog bottle pydantic pydantic-core
annotated-types typing-inspection tomli-w"
specs=()
for name in $NEED; do
  line=$(grep -i -E "^${name//-/[-_]}==" constraints.txt) || { echo "$name: not in constraints.txt" >&2; exit 2; }
  specs+=("$line")
done
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${specs[@]}"
ls .whl
du -sh .whl
