"""Backend selection: auto, the environment override, and errors that say why."""

import pytest
import torch

import mmkernels
from mmkernels import backends

CPU = torch.device("cpu")


def test_available_backends_lists_portable_ones():
    names = mmkernels.available_backends("cpu")
    assert "torch" in names and "naive" in names
    assert names.index("torch") < names.index("naive")


def test_auto_picks_best_available_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected = "cpu" if backends.why_unavailable("cpu", CPU) is None else "torch"
    assert backends.select_backend("auto", CPU) == expected


def test_auto_on_cuda_prefers_triton(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "why_unavailable", lambda name, device: None)
    assert backends.select_backend("auto", torch.device("cuda")) == "triton"


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "naive")
    assert backends.select_backend("auto", CPU) == "naive"
    # an explicit argument wins over the variable
    assert backends.select_backend("torch", CPU) == "torch"


def test_environment_override_is_used_by_the_losses(monkeypatch):
    calls = []
    from mmkernels.ops import contrastive

    real = contrastive._naive_contrastive
    monkeypatch.setattr(contrastive, "_naive_contrastive",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(backends.ENV_VAR, "naive")
    mmkernels.contrastive_loss(torch.randn(3, 2), torch.randn(3, 2))
    assert calls == [1]


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.select_backend("auto", CPU)


def test_unavailable_backend_from_environment_names_it(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="'cuda'.*MMKERNELS_BACKEND"):
        backends.select_backend("auto", CPU)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends.why_unavailable("triton", CPU)
    assert reason is not None and ("TRITON_INTERPRET" in reason or "not installed" in reason)


def test_every_backend_has_a_reason_or_runs():
    for name in backends.BACKENDS:
        reason = backends.why_unavailable(name, CPU)
        assert reason is None or (isinstance(reason, str) and reason)
