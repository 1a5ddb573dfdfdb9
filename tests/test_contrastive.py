"""contrastive_loss and info_nce against the fp64 reference, on every backend under test."""

import pytest
import torch

import mmkernels
from compare_to_reference import gradcheck_fp64
from loss_cases import (CONTRASTIVE, HALF, INFO_NCE, SHAPES, largest_logit, noncontiguous_pair, spread_rows,
                        square_pair)
from tolerances import fp32_logit_rtol


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_contrastive_shapes(backend, small_tiles, shape, normalize):
    CONTRASTIVE.compare(backend, square_pair(shape), torch.float32, scale=torch.tensor(2.5),
                        what=f"{backend} {shape}", normalize=normalize)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_contrastive_reductions_and_smoothing(backend, small_tiles, reduction, label_smoothing):
    a, b = torch.randn(19, 12), torch.randn(19, 12)
    CONTRASTIVE.compare(backend, [a, b], torch.float32, scale=torch.tensor(7.0),
                        what=f"{backend} {reduction} ls={label_smoothing}",
                        normalize=True, label_smoothing=label_smoothing, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, *HALF])
@pytest.mark.parametrize("normalize", [False, True])
def test_contrastive_dtypes(backend, small_tiles, dtype, normalize):
    a, b = torch.randn(21, 24), torch.randn(21, 24)
    CONTRASTIVE.compare(backend, [a, b], dtype, scale=torch.tensor(10.0), what=f"{backend} {dtype}",
                        normalize=normalize)


def test_contrastive_large_scale_unnormalized(backend, small_tiles):
    """Logits in the hundreds with widely different row and column maxima:
    only an online running maximum gets this right."""
    a, b = spread_rows(24, 24, 16, row_scales=(0.1, 4), b_scale=3)
    largest = largest_logit(a, b)
    assert largest > 1000  # far past any fixed shift that assumes |cos| <= 1
    CONTRASTIVE.compare(backend, [a, b], torch.float32, scale=torch.tensor(100.0),
                        what=f"{backend} scale 100", rtol=fp32_logit_rtol(largest))


def test_contrastive_noncontiguous(backend, small_tiles):
    CONTRASTIVE.compare(backend, noncontiguous_pair(), torch.float32, scale=torch.tensor(3.0),
                        what=f"{backend} non-contiguous", normalize=True)


def test_contrastive_number_scale(backend):
    a, b = torch.randn(11, 5), torch.randn(11, 5)
    CONTRASTIVE.compare(backend, [a, b], torch.float32, scale=4.0, what=f"{backend} python-number scale")


def test_contrastive_zero_scale_gradient(backend):
    """scale = 0: S is all zero, the loss is log N, and the scale still gets its gradient."""
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    CONTRASTIVE.compare(backend, [a, b], torch.float32, scale=torch.tensor(0.0), what=f"{backend} zero scale")


def test_contrastive_gradcheck(backend, small_tiles):
    gradcheck_fp64(lambda a, b, s, normalize: mmkernels.contrastive_loss(
        a, b, s, normalize=normalize, label_smoothing=0.1, reduction="none", backend=backend),
        10, 10, 6, 2.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_contrastive_nonfinite_input_gives_nonfinite_output(backend, value):
    a, b = torch.randn(9, 4), torch.randn(9, 4)
    a[3, 1] = value
    loss = mmkernels.contrastive_loss(a, b, 2.0, backend=backend)
    assert not torch.isfinite(loss)


# --- info_nce ---------------------------------------------------------------------

@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (5, 9, 4), (17, 33, 10), (9, 40, 17)])
@pytest.mark.parametrize("normalize", [False, True])
def test_info_nce_rectangular_default_labels(backend, small_tiles, n, m, d, normalize):
    INFO_NCE.compare(backend, [torch.randn(n, d), torch.randn(m, d)], torch.float32,
                     scale=torch.tensor(5.0), what=f"{backend} info_nce {n}x{m}", normalize=normalize)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_info_nce_labels(backend, small_tiles, reduction, label_smoothing):
    q, k = torch.randn(23, 8), torch.randn(11, 8)   # more queries than keys: labels repeat
    labels = torch.randint(0, 11, (23,))
    INFO_NCE.compare(backend, [q, k], torch.float32, scale=torch.tensor(3.0),
                     what=f"{backend} info_nce labels", labels=labels, reduction=reduction,
                     label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", [torch.float64, *HALF])
def test_info_nce_dtypes(backend, small_tiles, dtype):
    q, k = torch.randn(13, 20), torch.randn(29, 20)
    INFO_NCE.compare(backend, [q, k], dtype, scale=torch.tensor(20.0), what=f"{backend} info_nce {dtype}",
                     normalize=True)


# --- a locked tower: one side's features are constants ------------------------------

def _products_computed(backend):
    """{"S", "pb", "pa"} so far, on the backends whose kernels count them (else None)."""
    from mmkernels.ops import masked_logsumexp
    if backend == "cpu":
        from mmkernels import compiled
        return dict(zip(("S", "pb", "pa"), compiled.products_computed()))
    if backend in masked_logsumexp.KERNELS and backend != "naive":
        return {k: masked_logsumexp.PRODUCTS_COMPUTED[k] for k in ("S", "pb", "pa")}
    return None


@pytest.mark.parametrize("frozen", ["image", "text"])
@pytest.mark.parametrize("loss", ["contrastive_loss", "ClipLoss"])
def test_locked_tower(backend, small_tiles, frozen, loss):
    """Locked-image (or locked-text) tuning: the trainable tower's and the scale's
    gradients equal the full backward's, and the frozen side costs no product."""
    a0, b0 = torch.randn(21, 10), torch.randn(21, 10)
    compute = (mmkernels.ClipLoss(backend=backend) if loss == "ClipLoss" else
               lambda a, b, s: mmkernels.contrastive_loss(a, b, s, normalize=True, backend=backend))

    def grads(frozen_side):
        a = a0.clone().requires_grad_(frozen_side != "image")
        b = b0.clone().requires_grad_(frozen_side != "text")
        s = torch.tensor(4.0, requires_grad=True)
        leaves = [x for x in (a, b, s) if x.requires_grad]
        return torch.autograd.grad(compute(a, b, s), leaves)

    full = grads(None)
    before = _products_computed(backend)
    got = grads(frozen)
    after = _products_computed(backend)
    want = [full[1], full[2]] if frozen == "image" else [full[0], full[2]]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    if before is not None:
        counts = {k: after[k] - before[k] for k in before}
        assert counts == {"S": 1, "pb": int(frozen == "text"), "pa": int(frozen == "image")}
