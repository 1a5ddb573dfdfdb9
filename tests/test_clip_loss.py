"""mmkernels.ClipLoss against open_clip's ClipLoss: value and every gradient."""

import pytest
import torch

import mmkernels

open_clip_loss = pytest.importorskip("open_clip.loss")


def _run(loss_module, a, b, s, **kw):
    a, b, s = (x.detach().clone().requires_grad_() for x in (a, b, s))
    loss = loss_module(a, b, s, **kw)
    value = loss["contrastive_loss"] if isinstance(loss, dict) else loss
    value.backward()
    return value.detach(), a.grad, b.grad, s.grad


@pytest.mark.parametrize("n,d", [(1, 4), (17, 8), (64, 32)])
@pytest.mark.parametrize("output_dict", [False, True])
def test_matches_open_clip(backend, n, d, output_dict):
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    s = torch.tensor(14.3)
    theirs = _run(open_clip_loss.ClipLoss(), a, b, s, output_dict=output_dict)
    ours = _run(mmkernels.ClipLoss(backend=backend), a, b, s, output_dict=output_dict)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=5e-6)


def test_logit_bias_has_zero_gradient_like_open_clip(backend):
    a, b = torch.randn(9, 5), torch.randn(9, 5)
    bias = torch.tensor(-3.0, requires_grad=True)
    loss = mmkernels.ClipLoss(backend=backend)(a, b, torch.tensor(2.0), bias)
    want = open_clip_loss.ClipLoss()(a, b, torch.tensor(2.0), bias.detach())
    torch.testing.assert_close(loss.detach(), want, rtol=2e-5, atol=5e-6)
    loss.backward()
    assert bias.grad is not None and bias.grad.item() == 0.0


def test_unsupported_settings_are_refused():
    with pytest.raises(NotImplementedError, match="horovod"):
        mmkernels.ClipLoss(use_horovod=True)
