"""The one table of tolerances, and the comparisons that use it.

fp32 and fp64 results are compared with the fp64 reference directly. For
fp16/bf16 inputs the bar is relative to PyTorch itself: the error of our
result against fp64 must be no worse than twice the error of PyTorch's own
materialized computation in that dtype (plus a small floor, for results that
both get exactly right).
"""

import torch

# dtype -> (rtol, atol) against the fp64 reference, relative to the reference's largest value.
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 5e-6),
}

# For fp16/bf16: allowed factor over PyTorch's own same-dtype error, and a floor.
HALF_FACTOR = 2.0
HALF_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def fp32_logit_rtol(max_abs_logit: float) -> float:
    """fp32 rtol for results derived from logits as large as ``max_abs_logit``.

    fp32 holds a logit (and a logsumexp) of magnitude L only to within about
    L * 2^-24, and exp turns that absolute error into a relative error of the
    softmax, hence of the gradients, whatever the algorithm. It matters only
    far beyond CLIP's |S| <= 100 (unnormalized inputs at scale 100).
    """
    return TOLERANCE[torch.float32][0] + 4 * max_abs_logit * 2.0 ** -24


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in fp64.

    A reference below 1e-6 everywhere is a zero blurred by rounding (N = 1,
    D = 1 with normalization: the exact gradient is 0): there the absolute
    error is returned instead, as relative errors of rounding noise mean nothing.
    """
    got, ref = got.detach().double(), ref.detach().double()
    largest = ref.abs().max().item()
    return (got - ref).abs().max().item() / (largest if largest > 1e-6 else 1.0)


def assert_matches(got, ref, dtype, what="", torch_same_dtype=None, rtol=None):
    """Assert ``got`` (from inputs of ``dtype``) matches the fp64 ``ref``.

    For fp16/bf16, ``torch_same_dtype`` is PyTorch's materialized result in
    that dtype, whose error sets the bar. ``rtol`` overrides the table's (fp32/fp64).
    """
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if dtype in TOLERANCE:
        table_rtol, atol = TOLERANCE[dtype]
        rtol = table_rtol if rtol is None else rtol
        torch.testing.assert_close(got.detach().double(), ref.detach().double(), rtol=rtol,
                                   atol=atol + rtol * ref.abs().max().item(), msg=what or None)
        return
    assert torch_same_dtype is not None, "half-precision checks need PyTorch's same-dtype result"
    ours = relative_error(got, ref)
    theirs = relative_error(torch_same_dtype, ref)
    bar = HALF_FACTOR * theirs + HALF_FLOOR[dtype]
    assert ours <= bar, f"{what}: error {ours:.3g} > {HALF_FACTOR} x PyTorch's {theirs:.3g} + floor"
