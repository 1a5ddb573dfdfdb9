"""The contrastive-loss implementations the benchmarks put side by side.

=================  ==========================================================
name               what runs
=================  ==========================================================
naive              mmkernels' backend "naive": S materialized in fp32, then
                   F.cross_entropy both ways (open_clip's algorithm)
compile(naive)     ``torch.compile(naive, dynamic=True)``: one compiled graph
                   serves every N
torch, cpu,        mmkernels' tiled backends, those that run on the device
triton, cuda       (mmkernels.available_backends)
open_clip          open_clip's ``ClipLoss`` as installed, on F.normalize'd
                   features (its single-process path builds S and S.T: two
                   N x N products)
memeff             ``memeff.MemoryEfficientCLIPLoss`` (Triton; CUDA tensors
                   only). Takes a fixed temperature: no logit-scale gradient
inf_cl             Inf-CL's ``cal_flash_loss`` both ways, averaged (Triton;
                   CUDA tensors only; D a multiple of its head_dim, 256;
                   computes in fp32 whatever the input dtype)
=================  ==========================================================

Every implementation computes the symmetric CLIP loss of the L2-normalized
features with the same logit scale, forward and backward (gradients of both
feature matrices; of the logit scale too, except memeff). Peers are optional:
an implementation that cannot run here is left out with a printed reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from typing import Callable

import torch
import torch.nn.functional as F

BASELINES = ("naive", "compile(naive)")
PEERS = ("open_clip", "memeff", "inf_cl")
# Where each peer comes from (its PyPI name), for the notes and the version stamp.
PEER_PACKAGES = {"open_clip": "open_clip_torch", "memeff": "memeff", "inf_cl": "inf_cl"}
CUDA_ONLY_PEERS = ("memeff", "inf_cl")


def mmkernels_backends(device: str) -> list[str]:
    """mmkernels' tiled backends that run on ``device``, best first."""
    import mmkernels

    return [name for name in mmkernels.available_backends(device) if name != "naive"
            # triton runs CPU tensors only under the interpreter: a test lane, not a benchmark
            and not (name == "triton" and device == "cpu")]


def peer_unavailable(name: str, device: str) -> str | None:
    """Why peer ``name`` cannot run on ``device`` here, or None when it can."""
    module = "open_clip" if name == "open_clip" else name
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {PEER_PACKAGES[name]})"
    if name in CUDA_ONLY_PEERS and device != "cuda":
        return "CUDA tensors only (Triton kernels); skipped on cpu"
    return None


def version(name: str) -> str | None:
    """Version of the package behind implementation ``name`` (mmkernels for its own)."""
    package = PEER_PACKAGES.get(name, "mmkernels")
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        if package == "mmkernels":
            import mmkernels

            return mmkernels.__version__
        return None


def kind(name: str) -> str:
    if name in BASELINES:
        return "baseline"
    return "peer" if name in PEERS else "mmkernels"


def contrastive_impls(device: str, wanted: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(implementations to run on ``device``, {left-out implementation: why}).

    naive first (the reference of the "vs naive" column), then mmkernels'
    backends, the peers, and torch.compile last (its compile time is the
    first to go when a time budget runs short)."""
    names = ["naive"] + mmkernels_backends(device) + list(PEERS) + ["compile(naive)"]
    notes: dict[str, str] = {}
    chosen = []
    for name in names:
        if wanted is not None and name not in wanted:
            continue
        reason = peer_unavailable(name, device) if name in PEERS else None
        if reason:
            notes[name] = reason
        else:
            chosen.append(name)
    if wanted is not None:
        import mmkernels

        for name in wanted:
            if name not in names:
                if name in ("triton", "cpu", "cuda", "torch"):
                    why = mmkernels.backends.why_unavailable(name, torch.device(device))
                    notes[name] = why or "not a benchmark implementation on this device"
                else:
                    notes[name] = "unknown implementation"
    return chosen, notes


# --- the loss functions (called in the child processes) ------------------------

def _open_clip_loss_class():
    """open_clip's ClipLoss. Its module (open_clip/loss.py) needs only torch, while the
    package's __init__ imports the whole model zoo (timm, torchvision, ftfy: seconds per
    process, and packages a GPU machine may lack), so the module is loaded on its own."""
    spec = importlib.util.find_spec("open_clip")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = f"{list(spec.submodule_search_locations)[0]}/loss.py"
    try:
        loss_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
        module = importlib.util.module_from_spec(loss_spec)
        sys.modules["_open_clip_loss"] = module
        loss_spec.loader.exec_module(module)
        return module.ClipLoss
    except Exception:  # a layout we do not know: the ordinary import
        from open_clip.loss import ClipLoss

        return ClipLoss


def contrastive_fn(name: str, scale_value: float) -> Callable:
    """``fn(a, b, scale) -> loss``: the CLIP loss of normalized a, b by implementation ``name``."""
    import mmkernels

    if name == "naive" or name in ("torch", "cpu", "triton", "cuda"):
        backend = name

        def loss(a, b, scale):
            return mmkernels.contrastive_loss(a, b, scale, normalize=True, backend=backend)

        return loss
    if name == "compile(naive)":
        def naive(a, b, scale):
            return mmkernels.contrastive_loss(a, b, scale, normalize=True, backend="naive")

        return torch.compile(naive, dynamic=True)
    if name == "open_clip":
        clip_loss = _open_clip_loss_class()()

        def loss(a, b, scale):
            return clip_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale)

        return loss
    if name == "memeff":
        import memeff

        memeff_loss = memeff.MemoryEfficientCLIPLoss(temperature=1.0 / scale_value, stable=False)

        def loss(a, b, scale):  # normalizes inside; the temperature is a fixed float
            return memeff_loss(a, b)

        return loss
    if name == "inf_cl":
        from inf_cl import cal_flash_loss

        def loss(a, b, scale):  # cal_flash_loss gives the per-row losses of one direction, in fp32
            an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
            return (cal_flash_loss(an, bn, scale=scale).mean() + cal_flash_loss(bn, an, scale=scale).mean()) / 2

        return loss
    raise ValueError(f"unknown implementation {name!r}")
