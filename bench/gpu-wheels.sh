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
for n in 2_28 2_27 2_17 2014 1; do
  case $n in 2014|1) platforms+=(--platform "manylinux${n}_x86_64") ;; *) platforms+=(--platform "manylinux_${n}_x86_64") ;; esac
done
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${specs[@]}"
ls .whl
du -sh .whl
