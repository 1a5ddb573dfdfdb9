#!/usr/bin/env bash
# CI lane: the Triton kernels on the lowest and the highest Triton of the supported
# range (mmkernels/backends.py TRITON_SUPPORTED), each in its own venv:
#   1. every kernel and every autotune candidate compiled for sm_80 and sm_90
#      (tests/triton_aot.py --all-configs; no GPU needed), 0 failures, spills listed;
#   2. the interpreter lane (tests/test_triton_lane.py, TRITON_INTERPRET=1), unless
#      MMKERNELS_CI_LANE_DONE names this version: .ci/run sets it to the Triton of the
#      main venv, whose `make test` runs the same lane, and sets
#      MMKERNELS_CI_MAIN_PYTHON to that venv's python, which then compiles that
#      version's kernels itself (no second venv for the same Triton).
# The venvs are kept under $MMKERNELS_CI_CACHE (default ~/.cache/mmkernels-ci), one per
# Triton version, reused from one run to the next; the compile logs land there too.
#   .ci/triton_versions.sh [3.6.0 3.9.0]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=("${@:-3.6.0 3.9.0}")
read -r -a VERSIONS <<< "${VERSIONS[*]}"
CACHE="${MMKERNELS_CI_CACHE:-$HOME/.cache/mmkernels-ci}"
JOBS="${MAX_JOBS:-2}"
# torch 2.13.0: a small CPU wheel; which torch sits beside Triton does not change
# the kernels (torch only launches them), see README "Supported torch".
TORCH="${MMKERNELS_CI_TORCH:-torch==2.13.0}"
# What the lane's test files import besides torch and triton (pillow: the
# trainer's data loading, which tests/test_autocast.py imports).
LANE_REQUIREMENTS="numpy pytest pytest-timeout pillow"
mkdir -p "$CACHE"
status=0
for v in "${VERSIONS[@]}"; do
    venv="$CACHE/venv-triton-$v"
    t0=$(date +%s)
    python="$venv/bin/python"
    if [ "${MMKERNELS_CI_LANE_DONE:-}" = "$v" ] && [ -n "${MMKERNELS_CI_MAIN_PYTHON:-}" ]; then
        python="$MMKERNELS_CI_MAIN_PYTHON"
    elif [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$TORCH triton==$v $LANE_REQUIREMENTS" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        # shellcheck disable=SC2086
        "$venv/bin/pip" install -q "$TORCH" "triton==$v" $LANE_REQUIREMENTS
        echo "$TORCH triton==$v $LANE_REQUIREMENTS" > "$venv/.requirements"
    fi
    t1=$(date +%s)
    echo "== triton $v: venv ready in $((t1 - t0)) s ($python)"
    # The extension is optional here (built for another torch): pure-Python + Triton.
    if ! env -u TRITON_INTERPRET MMKERNELS_REQUIRE_EXT=0 MMKERNELS_NO_EXT=1 PYTHONPATH="$PWD" \
            "$python" tests/triton_aot.py --all-configs --jobs "$JOBS" > "$CACHE/aot-$v.txt" 2>&1; then
        status=1
    fi
    t2=$(date +%s)
    grep -E "^triton |^  spill|rror" "$CACHE/aot-$v.txt" | head -40
    echo "== triton $v: AOT compile in $((t2 - t1)) s (full log: $CACHE/aot-$v.txt)"
    if [ "${MMKERNELS_CI_LANE_DONE:-}" = "$v" ]; then
        echo "== triton $v: interpreter lane already run by make test (the main venv's Triton)"
        continue
    fi
    if ! MMKERNELS_REQUIRE_EXT=0 MMKERNELS_NO_EXT=1 PYTHONPATH="$PWD" "$python" -m pytest -x -q \
            -p no:cacheprovider tests/test_triton_lane.py; then
        status=1
    fi
    echo "== triton $v: interpreter lane in $(( $(date +%s) - t2 )) s"
done
exit $status
