"""The autocast policy: every public op ignores torch.autocast.

Inside ``torch.autocast`` the features reach the kernels in their own dtype
and every O(N*D) term (the positive logit, label smoothing's row sums, the
norms) is computed in the kernels' precision, so the result equals the one
without autocast bit for bit, and a cross-entropy is never negative beyond
fp32 round-off. Compared with the fp64 reference and with open_clip's own
loss under the same autocast, in the same process.
"""

import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mmkernels
import mmkernels.distributed
from mmkernels.train.step import contrastive_step, encode_pair
from mmkernels.models import create_clip
from reference import contrastive, info_nce, logsumexp
from siglip_reference import siglip
from tolerances import TOLERANCE, relative_error

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _features(n, d, device, dtype=torch.float32, scale=1.0):
    a = torch.randn(n, d, device=device, dtype=torch.float64)
    b = a + 0.5 * torch.randn(n, d, device=device, dtype=torch.float64)
    return (F.normalize(a, dim=1) * scale).to(dtype), (F.normalize(b, dim=1) * scale).to(dtype)


def _ops(backend):
    """(name, our op, fp64 reference) with a learnable log-scale and bias."""
    labels = torch.tensor([2, 0, 5, 5, 1, 3, 4, 6, 7, 0, 9])
    return {
        "contrastive_loss": (
            lambda a, b, s, t: mmkernels.contrastive_loss(a, b, s, label_smoothing=0.1,
                                                          backend=backend),
            lambda a, b, s, t: contrastive(a, b, s, label_smoothing=0.1)),
        "info_nce": (
            lambda a, b, s, t: mmkernels.info_nce(a, b, labels.to(a.device), s, normalize=True,
                                                  backend=backend),
            lambda a, b, s, t: info_nce(a, b, labels.to(a.device), s, normalize=True)),
        "similarity_logsumexp": (
            lambda a, b, s, t: sum(x.sum() for x in mmkernels.similarity_logsumexp(
                a, b, s, backend=backend)),
            lambda a, b, s, t: sum(x.sum() for x in logsumexp(a, b, s))),
        "siglip_loss": (
            lambda a, b, s, t: mmkernels.siglip_loss(a, b, s, t, backend=backend),
            lambda a, b, s, t: siglip(a, b, s, t)),
        "ClipLoss": (
            lambda a, b, s, t: mmkernels.ClipLoss(backend=backend)(a, b, s),
            lambda a, b, s, t: contrastive(a, b, s)),
        "SigLipLoss": (
            lambda a, b, s, t: mmkernels.SigLipLoss(backend=backend)(a, b, s, t),
            lambda a, b, s, t: siglip(a, b, s, t)),
    }


def _run(op, a, b, dtype_cast=None, autocast=None):
    """Value and gradients of (a, b, log-scale Parameter, bias Parameter)."""
    a, b = (x.detach().clone().requires_grad_() for x in (a, b))
    log_scale = torch.nn.Parameter(torch.tensor(2.3, device=a.device))
    bias = torch.nn.Parameter(torch.tensor(-2.0, device=a.device))
    if autocast is None:
        value = op(a, b, log_scale.exp(), bias)
    else:
        with torch.autocast(a.device.type, dtype=autocast):
            value = op(a, b, log_scale.exp(), bias)
    value.backward()
    grads = [a.grad, b.grad, log_scale.grad, bias.grad]
    return value.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", AUTOCAST_DTYPES)
@pytest.mark.parametrize("features_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(_ops("torch")))
def test_public_ops_ignore_autocast(backend, name, features_dtype, autocast, device):
    """Under autocast: bit-identical to the same call without it (values and every gradient),
    and for fp32 features within the fp32 tolerance of the fp64 reference."""
    if device == "cuda":
        backend = "auto"
    elif backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU runs only in the interpreter lane")
    op, ref_op = _ops(backend)[name]
    a, b = _features(11, 24, device, features_dtype)
    plain_value, plain_grads = _run(op, a, b)
    value, grads = _run(op, a, b, autocast=autocast)
    assert value.dtype == plain_value.dtype
    assert torch.equal(value, plain_value), f"{name}: autocast changed the value"
    for what, got, want in zip(("a", "b", "log_scale", "bias"), grads, plain_grads):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype
        assert torch.equal(got, want), f"{name}: autocast changed the gradient of {what}"
    if features_dtype != torch.float32:
        return
    ref_value, ref_grads = _run(ref_op, a.double(), b.double())
    rtol = TOLERANCE[torch.float32][0] * 5
    assert relative_error(value, ref_value) < rtol
    for got, want in zip(grads, ref_grads):
        if want is not None and got is not None:
            assert relative_error(got, want) < rtol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", AUTOCAST_DTYPES)
def test_no_worse_than_open_clip_under_autocast(backend, autocast, device):
    """Error against fp64 at most twice open_clip's own under the same autocast (plus an
    fp32 floor), for the loss and the gradient of a log-scale Parameter."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    if device == "cuda":
        backend = "auto"
    elif backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU runs only in the interpreter lane")
    a, b = _features(64, 48, device)
    floor = TOLERANCE[torch.float32][0] * 5
    cases = [
        (lambda a, b, s, t: mmkernels.ClipLoss(backend=backend)(a, b, s),
         lambda a, b, s, t: open_clip_loss.ClipLoss()(a, b, s),
         lambda a, b, s, t: contrastive(a, b, s)),
        (lambda a, b, s, t: mmkernels.SigLipLoss(backend=backend)(a, b, s, t),
         lambda a, b, s, t: open_clip_loss.SigLipLoss()(a, b, s, t),
         lambda a, b, s, t: siglip(a, b, s, t)),
    ]
    for ours, theirs, ref_op in cases:
        ref_value, ref_grads = _run(ref_op, a.double(), b.double())
        our_value, our_grads = _run(ours, a, b, autocast=autocast)
        their_value, their_grads = _run(theirs, a, b, autocast=autocast)
        assert relative_error(our_value, ref_value) <= 2 * relative_error(their_value, ref_value) + floor
        for ours_g, theirs_g, ref_g in zip(our_grads, their_grads, ref_grads):
            if ref_g is None or ours_g is None or theirs_g is None:
                continue
            assert relative_error(ours_g, ref_g) <= 2 * relative_error(theirs_g, ref_g) + floor


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", AUTOCAST_DTYPES)
def test_confident_batch_loss_is_zero(backend, autocast, device):
    """Identical pairs at logit_scale 100: the true loss is ~1e-30. Under autocast the loss
    is 0 to within fp32 round-off of |S| = 100 (a few ulp), never negative beyond it."""
    if device == "cuda":
        backend = "auto"
    elif backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU runs only in the interpreter lane")
    a, _ = _features(64, 32, device)
    b = a.clone()
    ulp = torch.finfo(torch.float32).eps * 100
    with torch.autocast(device, dtype=autocast):
        losses = {
            "contrastive_loss": mmkernels.contrastive_loss(a, b, 100.0, backend=backend),
            "info_nce": mmkernels.info_nce(a, b, logit_scale=100.0, backend=backend),
            "ClipLoss": mmkernels.ClipLoss(backend=backend)(a, b, torch.tensor(100.0, device=device)),
            "per-pair": mmkernels.contrastive_loss(a, b, 100.0, reduction="none", backend=backend),
        }
    for name, loss in losses.items():
        assert loss.dtype == torch.float32
        assert loss.abs().max().item() <= 4 * ulp, f"{name}: {loss.abs().max().item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", AUTOCAST_DTYPES)
def test_normalized_similarity_ignores_autocast(autocast, device):
    """normalized_similarity returns the input dtype, as outside autocast (it is the fused
    normalize + matmul of the contract, not an ATen matmul autocast may lower)."""
    a, b = _features(9, 20, device)
    plain = mmkernels.normalized_similarity(a, b, 3.0)
    with torch.autocast(device, dtype=autocast):
        got = mmkernels.normalized_similarity(a, b, 3.0)
    assert got.dtype == torch.float32
    assert torch.equal(got, plain)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_rank_group():
    """A one-process gloo group, for the distributed losses' code path in this process."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("autocast", AUTOCAST_DTYPES)
def test_distributed_losses_ignore_autocast(single_rank_group, autocast):
    a, b = _features(16, 24, "cpu")
    cases = {
        "ring": lambda a, b, s, t: mmkernels.distributed.contrastive_loss(a, b, s, backend="torch"),
        "gather": lambda a, b, s, t: mmkernels.distributed.contrastive_loss(
            a, b, s, strategy="gather", backend="torch"),
        "clip_loss local": lambda a, b, s, t: mmkernels.distributed.clip_loss(
            a, b, s, local_loss=True, gather_with_grad=True, backend="torch"),
        "siglip": lambda a, b, s, t: mmkernels.SigLipLoss(rank=0, world_size=1, backend="torch")(
            a, b, s, t),
    }
    for name, op in cases.items():
        plain_value, plain_grads = _run(op, a, b)
        value, grads = _run(op, a, b, autocast=autocast)
        assert torch.equal(value, plain_value), name
        for got, want in zip(grads, plain_grads):
            assert (got is None) == (want is None) and (want is None or torch.equal(got, want)), name


def test_trainer_bf16_autocast_step_loss_is_fp32():
    """The trainer's bf16 autocast path: the encoders run in bf16, the loss is computed in
    fp32 from their (cast) features and equals the fp64 loss of those features."""
    model = create_clip("tiny", image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                        vision_heads=2, text_width=32, text_layers=1, text_heads=2, embed_dim=16,
                        context_length=8, vocab_size=64)
    images = torch.randn(12, 3, 16, 16)
    tokens = torch.randint(1, 64, (12, 8))
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        image_features, text_features = encode_pair(model, images, tokens, autocast)
        want = contrastive(image_features.double(), text_features.double(),
                           model.scale().double())
    for micro in (None, 5):
        model.zero_grad()
        loss = contrastive_step(model, images, tokens, mmkernels.contrastive_loss, micro, autocast)
        assert loss.dtype == torch.float32
        assert relative_error(loss, want) < TOLERANCE[torch.float32][0] * 5
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
