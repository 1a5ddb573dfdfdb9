"""Bad input raises ValueError/TypeError before any kernel runs, naming the argument."""

import pytest
import torch

import mmkernels

A = torch.randn(4, 3)
B = torch.randn(4, 3)


def clip(*args, **kw):
    return mmkernels.contrastive_loss(*args, **kw)


@pytest.mark.parametrize("call,error,words", [
    (lambda: clip(A, torch.randn(5, 3)), ValueError, ["batch sizes differ", "(4, 3)", "(5, 3)"]),
    (lambda: clip(A, torch.randn(4, 2)), ValueError, ["feature dimensions differ"]),
    (lambda: clip(torch.randn(4), B), ValueError, ["image_features", "2-D", "(4,)"]),
    (lambda: clip(A, torch.randn(2, 4, 3)), ValueError, ["text_features", "2-D"]),
    (lambda: clip(torch.randn(0, 3), torch.randn(0, 3)), ValueError, ["image_features", "non-empty"]),
    (lambda: clip(torch.randn(4, 0), torch.randn(4, 0)), ValueError, ["non-empty", "(4, 0)"]),
    (lambda: clip(A.long(), B.long()), ValueError, ["image_features", "torch.int64"]),
    (lambda: clip(A.long(), B.long()), TypeError, ["torch.int64"]),
    (lambda: clip(A, B.double()), ValueError, ["dtypes differ"]),
    (lambda: clip(A, B.to("meta")), ValueError, ["different devices", "meta"]),
    (lambda: clip(A.numpy(), B), TypeError, ["image_features", "ndarray"]),
    (lambda: clip(A, B, reduction="avg"), ValueError, ["reduction", "'avg'"]),
    (lambda: clip(A, B, backend="fast"), ValueError, ["backend", "'fast'"]),
    (lambda: clip(A, B, label_smoothing=1.0), ValueError, ["label_smoothing", "[0, 1)"]),
    (lambda: clip(A, B, label_smoothing=-0.1), ValueError, ["label_smoothing"]),
    (lambda: clip(A, B, torch.ones(2)), ValueError, ["logit_scale", "(2,)"]),
    (lambda: clip(A, B, "10"), TypeError, ["logit_scale", "str"]),
    (lambda: mmkernels.info_nce(A, B, torch.tensor([0, 1, 2, 4])), ValueError, ["labels", "[0, 4)", "4]"]),
    (lambda: mmkernels.info_nce(A, B, torch.tensor([0, -1, 2, 3])), ValueError, ["labels", "-1"]),
    (lambda: mmkernels.info_nce(A, B, torch.tensor([0, 1, 2])), ValueError, ["labels", "(4,)", "(3,)"]),
    (lambda: mmkernels.info_nce(A, B, torch.tensor([0., 1, 2, 3])), TypeError, ["labels", "int64"]),
    (lambda: mmkernels.info_nce(A, B, torch.tensor([0, 1, 2, 3], dtype=torch.int32)), ValueError, ["labels", "int32"]),
    (lambda: mmkernels.info_nce(torch.randn(5, 3), B), ValueError, ["labels", "at least N keys"]),
    (lambda: mmkernels.similarity_logsumexp(A, torch.randn(6, 4)), ValueError, ["a and b", "feature dimensions"]),
    (lambda: mmkernels.normalized_similarity(A, torch.randn(6, 4)), ValueError, ["feature dimensions"]),
])
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="'cuda'.*unavailable"):
        clip(A, B, backend="cuda")


def test_checks_run_before_any_kernel(monkeypatch):
    """A bad reduction is reported even though the features are fine and a kernel would run."""
    from mmkernels.ops import logsumexp

    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the checks")

    monkeypatch.setattr(logsumexp, "lse", boom)
    from mmkernels.ops import contrastive
    monkeypatch.setattr(contrastive, "lse", boom)
    with pytest.raises(ValueError, match="reduction"):
        clip(A, B, reduction="bogus", backend="torch")
