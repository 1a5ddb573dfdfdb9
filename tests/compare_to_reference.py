"""Run an op and its reference on the same inputs and compare values and every gradient."""

import torch

from reference import leaves
from tolerances import assert_matches


def compare(ours, reference, inputs, dtype, *, scale=None, what="", rtol=None):
    """Check ``ours(*features, scale)`` against ``reference`` (fp64) in value and gradients.

    ``inputs``: the feature tensors (any dtype; cast to ``dtype``). ``scale``: a
    number (no gradient) or a float tensor (a leaf whose gradient is checked too).
    Outputs may be a tensor or a tuple of tensors; a random upstream gradient
    weighs every output element, so "none" reductions are checked element-wise.
    ``rtol`` overrides the tolerance table (fp32/fp64 only).
    """
    features = [x.to(dtype) for x in inputs]
    feats_ours = leaves(*features)
    feats_ref = leaves(*features, dtype=torch.float64)
    feats_same = leaves(*features)
    scale_is_leaf = isinstance(scale, torch.Tensor)
    if scale_is_leaf:
        if dtype == torch.float64:  # fp64 runs are for exactness: keep the scale fp64 too
            scale = scale.double()
        scale_ours, scale_ref, scale_same = leaves(scale, scale.double(), scale)
    else:
        scale_ours = scale_ref = scale_same = scale

    out_ours = _as_tuple(ours(*feats_ours, scale_ours))
    out_ref = _as_tuple(reference(*feats_ref, scale_ref))
    out_same = _as_tuple(reference(*feats_same, scale_same))
    weights = [torch.randn(o.shape, dtype=torch.float64) for o in out_ref]

    ours_leaves = feats_ours + ([scale_ours] if scale_is_leaf else [])
    ref_leaves = feats_ref + ([scale_ref] if scale_is_leaf else [])
    same_leaves = feats_same + ([scale_same] if scale_is_leaf else [])
    grads_ours = _grads(out_ours, weights, ours_leaves)
    grads_ref = _grads(out_ref, weights, ref_leaves)
    grads_same = _grads(out_same, weights, same_leaves)

    expected_out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for k, (o, r, s) in enumerate(zip(out_ours, out_ref, out_same)):
        assert o.dtype == expected_out_dtype, f"{what} output {k}: dtype {o.dtype}"
        assert_matches(o, r, dtype, f"{what} output {k}", s, rtol)
    names = [f"grad of input {k}" for k in range(len(inputs))] + (["grad of scale"] if scale_is_leaf else [])
    for name, leaf, g, r, s in zip(names, ours_leaves, grads_ours, grads_ref, grads_same):
        assert g is not None, f"{what} {name}: no gradient"
        assert g.dtype == leaf.dtype, f"{what} {name}: dtype {g.dtype}, input dtype {leaf.dtype}"
        assert_matches(g, r, dtype, f"{what} {name}", s, rtol)


def gradcheck_fp64(op, n, m, d, *scalars):
    """torch.autograd.gradcheck of ``op(a, b, *scalars, normalize=...)`` in fp64, for
    normalize False and True, w.r.t. a (n, d), b (m, d) and every scalar (numbers)."""
    a = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    leaves = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in scalars]
    for normalize in (False, True):
        assert torch.autograd.gradcheck(lambda *xs: op(*xs, normalize=normalize), (a, b, *leaves))


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _grads(outputs, weights, wrt):
    total = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(total, wrt, allow_unused=True)
