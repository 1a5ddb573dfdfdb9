r"""open_clip's ``create_loss`` (and so its trainer, ``open_clip_train``) with
mmkernels' losses in place of open_clip's.

    from mmkernels.integrations import open_clip as mmk_open_clip
    mmk_open_clip.patch()                  # open_clip.create_loss(args) now builds mmkernels'
    loss = open_clip.create_loss(args)     # mmkernels.ClipLoss / mmkernels.SigLipLoss
    mmk_open_clip.unpatch()                # back to open_clip's own

or run open_clip's trainer patched:
``python -m mmkernels.integrations.open_clip_train <open_clip_train arguments>``.

How it is patched
-----------------
``open_clip.create_loss`` (open_clip 2.x and 3.x, ``open_clip/factory.py``)
looks up the classes it builds (``ClipLoss``, ``SigLipLoss``, ``CoCaLoss``,
``DistillClipLoss``) in the globals of ``open_clip.factory`` when it is called.
:func:`patch` rebinds those names there, so every reference to the function
(``open_clip.create_loss``, ``open_clip.factory.create_loss``, and the copy
that ``open_clip_train.main`` imported by name) builds mmkernels' losses,
whatever was imported before or after. The function itself is not replaced.

- ``ClipLoss(local_loss, gather_with_grad, cache_labels, rank, world_size,
  use_horovod)`` builds :class:`mmkernels.ClipLoss` with exactly those
  arguments (its ``world_size > 1`` follows open_clip's for every combination
  of the flags, over torch.distributed). ``use_horovod=True`` is left to
  open_clip's own class (mmkernels runs over torch.distributed only).
- ``SigLipLoss(cache_labels, rank, world_size, dist_impl)`` builds
  :class:`mmkernels.SigLipLoss` with those arguments.
- ``CoCaLoss`` (a captioning loss on the decoder's logits) and
  ``DistillClipLoss`` (a distillation term on a teacher's logits) are left to
  open_clip: they are built by open_clip's classes, with a one-line notice on
  the ``mmkernels.integrations.open_clip`` logger.

Each time one of them is built, the choice is logged at INFO on that logger
(the trainer's log shows it). Importing this module imports open_clip;
``import mmkernels`` does not.
"""

from __future__ import annotations

import logging

import open_clip.factory as _factory

import mmkernels

LOGGER = logging.getLogger(__name__)

# The loss classes create_loss looks up in open_clip.factory when it is called.
PATCHED_NAMES = ("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss")

_originals: dict = {}  # name -> open_clip's class, while patched
_options: dict = {}


def _clip_loss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
               world_size=1, use_horovod=False):
    """Stands for ``open_clip.factory.ClipLoss`` while patched: the same arguments."""
    if use_horovod:
        LOGGER.warning("mmkernels: ClipLoss with use_horovod=True is left to open_clip "
                       "(mmkernels runs over torch.distributed)")
        return _originals["ClipLoss"](local_loss=local_loss, gather_with_grad=gather_with_grad,
                                      cache_labels=cache_labels, rank=rank,
                                      world_size=world_size, use_horovod=use_horovod)
    LOGGER.info("mmkernels: using mmkernels.ClipLoss (local_loss=%s, gather_with_grad=%s, "
                "rank=%d, world_size=%d)", local_loss, gather_with_grad, rank, world_size)
    return mmkernels.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad,
                              cache_labels=cache_labels, rank=rank, world_size=world_size,
                              **_options)


def _siglip_loss(cache_labels=False, rank=0, world_size=1, dist_impl=None):
    """Stands for ``open_clip.factory.SigLipLoss`` while patched: the same arguments."""
    LOGGER.info("mmkernels: using mmkernels.SigLipLoss (rank=%d, world_size=%d, dist_impl=%s)",
                rank, world_size, dist_impl)
    return mmkernels.SigLipLoss(cache_labels=cache_labels, rank=rank, world_size=world_size,
                                dist_impl=dist_impl, backend=_options["backend"])


def _left_to_open_clip(name: str, why: str):
    def build(*args, **kwargs):
        LOGGER.warning("mmkernels: %s is left to open_clip (%s)", name, why)
        return _originals[name](*args, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Stands for ``open_clip.factory.{name}`` while patched: open_clip's own."
    return build


_REPLACEMENTS = {
    "ClipLoss": _clip_loss,
    "SigLipLoss": _siglip_loss,
    "CoCaLoss": _left_to_open_clip(
        "CoCaLoss", "its captioning term needs the decoder's logits, not a contrastive kernel"),
    "DistillClipLoss": _left_to_open_clip(
        "DistillClipLoss", "its distillation term needs the teacher's logits"),
}


def patch(*, backend: str = "auto", strategy: str = "ring") -> None:
    """Make ``open_clip.create_loss`` build mmkernels' ``ClipLoss`` and ``SigLipLoss``.

    Rebinds the loss classes in ``open_clip.factory`` (see the module
    docstring), so the trainer's ``create_loss``, imported by name, is
    patched too. Calling it again while patched only changes the options.

    Args:
        backend: the mmkernels backend of the losses built ("auto": the best
            for the features' device; ``MMKERNELS_BACKEND`` overrides it).
        strategy: how ``ClipLoss`` computes the global loss with
            ``world_size > 1`` and ``local_loss=False``: "ring" (default) or
            "gather" (see :mod:`mmkernels.distributed`).

    Raises:
        ValueError: an unknown backend or strategy (before anything is patched).
    """
    from mmkernels import backends

    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {backends.BACKENDS}, "
                         f"got {backend!r}")
    if strategy not in ("ring", "gather"):
        raise ValueError(f"strategy: expected 'ring' or 'gather', got {strategy!r}")
    _options.update(backend=backend, strategy=strategy)
    if not _originals:
        for name in PATCHED_NAMES:
            _originals[name] = getattr(_factory, name)
            setattr(_factory, name, _REPLACEMENTS[name])


def unpatch() -> None:
    """Undo :func:`patch`: ``open_clip.create_loss`` builds open_clip's losses again.

    Losses already built keep working. Does nothing when not patched.
    """
    for name, original in _originals.items():
        setattr(_factory, name, original)
    _originals.clear()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return bool(_originals)
