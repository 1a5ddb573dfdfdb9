"""Hand mutations of csrc/cuda/kernels.cu, each run through the emulation lane.

Not a test (each mutant is a fresh build, minutes in all); it shows which check
catches which kind of bug. Run from the repo root:

    CUDA_HOME=/usr/local/cuda-13.0 python tests/cuda_emulation/hand_mutants.py plain asan

Per mutant it prints whether the lane failed (a sanitizer report, a crash) or the
values differ from the fp64 reference (CAUGHT by values), or NOT CAUGHT.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_cuda_emulated as t  # noqa: E402 (after the path)
from cuda_emulation import lane  # noqa: E402

SOURCE = lane.KERNELS.read_text()
# name: (text in kernels.cu, its mutation); each text occurs exactly once.
MUTANTS = {
    "load mask off by one (gr < rows -> gr <= rows)":
        ("(gr < rows && gk < d)", "(gr <= rows && gk < d)"),
    "load K mask off by one (gk < d -> gk <= d)":
        ("(gr < rows && gk < d)", "(gr < rows && gk <= d)"),
    "column edge off by one in the forward row max (j < cols -> j <= cols)":
        ("for (int j = 0; j < cols; ++j) tile_max", "for (int j = 0; j <= cols; ++j) tile_max"),
    "similarity bound (gi >= n -> gi > n)":
        ("if (gi >= n || gj >= m) continue;", "if (gi > n || gj >= m) continue;"),
    "fragment layout swapped (matrix_b col_major -> row_major)":
        ("wmma::matrix_b, 16, 16, 16, T, wmma::col_major>",
         "wmma::matrix_b, 16, 16, 16, T, wmma::row_major>"),
}
# The masked primitive's, run on masked cases.
MASKED_MUTANTS = {
    "masked: the positive excluded from its row by a threshold (exemption dropped)":
        ("(r.row_threshold != nullptr && s > row_threshold[i])) && gj != positive[i]",
         "(r.row_threshold != nullptr && s > row_threshold[i]))"),
    "masked: column staging past the edge (c0 + j >= m -> c0 + j > m)":
        ("if (j < 0 || j >= BN || c0 + j >= m) return;", "if (j < 0 || j >= BN || c0 + j > m) return;"),
    "masked: forward row sum ignores the mask":
        ("if (stays<kMasked>(kept, j)) sum +=", "sum +="),
    "masked: backward column term takes the row's mask":
        ("mask.out_of_col(rules, i, j, gi, gj, s) ? A(0)", "mask.out_of_row(rules, i, j, gi, gj, s) ? A(0)"),
    "masked: groups compare the row's group with itself":
        ("row_group[i] == col_group[j]", "row_group[i] == row_group[i]"),
}


def cases(masked):
    if masked:
        return [c for dtype in (torch.float16, torch.float32) for c in t.masked_cases(dtype, [(65, 63, 17)])]
    return [c for dtype in (torch.float16, torch.float32)
            for c in t.cases_for(dtype, [(65, 63, 33), (1, 1, 15)], bands=(64,))]


def verdict(variant, index, old, new, masked):
    try:
        exe = lane.build(variant, SOURCE.replace(old, new), tag=f"-hand{index}")
    except Exception as error:  # a mutant that does not compile is caught too
        return f"BUILD FAILED: {str(error)[-300:]}"
    cases_run = cases(masked)
    done, inputs = t.run_lane(variant, cases_run, Path(tempfile.mkdtemp(prefix="mmk-mutant-")), exe)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else ""
        return f"lane FAILED (status {done.returncode}): {last}"
    wrong = []
    for case, x in zip(cases_run, inputs):
        try:
            t.check(case, x)
        except AssertionError:
            wrong.append(case.name)
    if not wrong:
        return "NOT CAUGHT"
    return f"CAUGHT by values in {len(wrong)}/{len(cases_run)} cases, e.g. {', '.join(wrong[:3])}"


for variant in sys.argv[1:] or ["plain"]:
    every = [(m, False) for m in MUTANTS.items()] + [(m, True) for m in MASKED_MUTANTS.items()]
    for index, ((name, (old, new)), masked) in enumerate(every):
        assert SOURCE.count(old) == 1, f"{name}: the text to mutate is not unique in kernels.cu"
        print(f"[{variant}] {name}: {verdict(variant, index, old, new, masked)}", flush=True)
