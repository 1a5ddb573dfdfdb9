"""contrastive_loss and info_nce against the fp64 reference, on every backend under test."""

import pytest
import torch

import mmkernels
import reference
from compare_to_reference import compare, gradcheck_fp64
from tolerances import fp32_logit_rtol

# (N, D): N = 1, D = 1, and sizes that straddle the 8 x 16 test tiles.
SHAPES = [(1, 1), (1, 7), (2, 1), (7, 3), (8, 16), (9, 17), (17, 33), (40, 70)]
HALF = [torch.float16, torch.bfloat16]


def _clip(backend, **kw):
    return lambda a, b, s: mmkernels.contrastive_loss(a, b, s, backend=backend, **kw)


def _clip_ref(**kw):
    return lambda a, b, s: reference.contrastive(a, b, s, **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_contrastive_shapes(backend, small_tiles, shape, normalize):
    n, d = shape
    a, b = torch.randn(n, d), torch.randn(n, d)
    compare(_clip(backend, normalize=normalize), _clip_ref(normalize=normalize), [a, b],
            torch.float32, scale=torch.tensor(2.5), what=f"{backend} {shape}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_contrastive_reductions_and_smoothing(backend, small_tiles, reduction, label_smoothing):
    a, b = torch.randn(19, 12), torch.randn(19, 12)
    kw = dict(normalize=True, label_smoothing=label_smoothing, reduction=reduction)
    compare(_clip(backend, **kw), _clip_ref(**kw), [a, b], torch.float32,
            scale=torch.tensor(7.0), what=f"{backend} {reduction} ls={label_smoothing}")


@pytest.mark.parametrize("dtype", [torch.float64, *HALF])
@pytest.mark.parametrize("normalize", [False, True])
def test_contrastive_dtypes(backend, small_tiles, dtype, normalize):
    a, b = torch.randn(21, 24), torch.randn(21, 24)
    compare(_clip(backend, normalize=normalize), _clip_ref(normalize=normalize), [a, b], dtype,
            scale=torch.tensor(10.0), what=f"{backend} {dtype}")


def test_contrastive_large_scale_unnormalized(backend, small_tiles):
    """Logits in the hundreds with widely different row and column maxima:
    only an online running maximum gets this right."""
    a = torch.randn(24, 16) * torch.linspace(0.1, 4, 24).unsqueeze(1)
    b = torch.randn(24, 16) * 3
    largest = (100 * a @ b.T).abs().max().item()
    assert largest > 1000  # far past any fixed shift that assumes |cos| <= 1
    compare(_clip(backend), _clip_ref(), [a, b], torch.float32, scale=torch.tensor(100.0),
            what=f"{backend} scale 100", rtol=fp32_logit_rtol(largest))


def test_contrastive_noncontiguous(backend, small_tiles):
    base_a, base_b = torch.randn(30, 40), torch.randn(40, 30)
    a = base_a[::2, 3:25]          # strided rows, offset columns
    b = base_b.T[1:31:2, :22]      # transposed storage
    assert not a.is_contiguous() and not b.is_contiguous()
    compare(_clip(backend, normalize=True), _clip_ref(normalize=True), [a, b], torch.float32,
            scale=torch.tensor(3.0), what=f"{backend} non-contiguous")


def test_contrastive_number_scale(backend):
    a, b = torch.randn(11, 5), torch.randn(11, 5)
    compare(_clip(backend), _clip_ref(), [a, b], torch.float32, scale=4.0,
            what=f"{backend} python-number scale")


def test_contrastive_zero_scale_gradient(backend):
    """scale = 0: S is all zero, the loss is log N, and the scale still gets its gradient."""
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    compare(_clip(backend), _clip_ref(), [a, b], torch.float32, scale=torch.tensor(0.0),
            what=f"{backend} zero scale")


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

def _nce(backend, labels=None, **kw):
    return lambda q, k, s: mmkernels.info_nce(q, k, labels, s, backend=backend, **kw)


def _nce_ref(labels=None, **kw):
    return lambda q, k, s: reference.info_nce(q, k, labels, s, **kw)


@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (5, 9, 4), (17, 33, 10), (9, 40, 17)])
@pytest.mark.parametrize("normalize", [False, True])
def test_info_nce_rectangular_default_labels(backend, small_tiles, n, m, d, normalize):
    q, k = torch.randn(n, d), torch.randn(m, d)
    compare(_nce(backend, normalize=normalize), _nce_ref(normalize=normalize), [q, k],
            torch.float32, scale=torch.tensor(5.0), what=f"{backend} info_nce {n}x{m}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_info_nce_labels(backend, small_tiles, reduction, label_smoothing):
    q, k = torch.randn(23, 8), torch.randn(11, 8)   # more queries than keys: labels repeat
    labels = torch.randint(0, 11, (23,))
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    compare(_nce(backend, labels, **kw), _nce_ref(labels, **kw), [q, k], torch.float32,
            scale=torch.tensor(3.0), what=f"{backend} info_nce labels")


@pytest.mark.parametrize("dtype", [torch.float64, *HALF])
def test_info_nce_dtypes(backend, small_tiles, dtype):
    q, k = torch.randn(13, 20), torch.randn(29, 20)
    compare(_nce(backend, normalize=True), _nce_ref(normalize=True), [q, k], dtype,
            scale=torch.tensor(20.0), what=f"{backend} info_nce {dtype}")


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
