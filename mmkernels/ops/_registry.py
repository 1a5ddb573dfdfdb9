"""The kernel registry: one table per op family, from backend names to kernels.

An op family is a forward op, a backward op and the contract between them,
stated in the docstring of the family's module (the primitive in
ops/logsumexp.py, SigLIP's loss in ops/siglip.py, the similarity matrix in
ops/similarity.py). Each such module creates one :class:`KernelTable`,
which holds what every backend of the family shares: the fake kernels (the
output shapes torch.compile traces with) and the autograd formula (the
backward kernel, then the O(N*D) epilogue of ops/_common.py).

A backend registers its op pair with ``TABLE.register(names, fwd, bwd)`` when
its module is imported: the torch backend in the family's own module, the
triton backend in mmkernels/triton/__init__.py, the compiled cpu and cuda
backends in mmkernels/compiled.py. ``import mmkernels`` imports every backend
module usable in this process (mmkernels/__init__.py), so the tables are
complete before the first call and torch.compile never has to trace an
import. One policy for a backend that has no kernels in a table: an error
that names the backend, the op, and why (:func:`mmkernels.backends.why_unavailable`).
"""

from __future__ import annotations

from typing import Callable

import torch

from mmkernels import backends

# A forward op and its backward op, as registered.
KernelPair = tuple[Callable, Callable]


class KernelTable:
    """The kernels of one op family on every backend that has them.

    Args:
        op: the family's public name, for error messages ("similarity_logsumexp").
        fwd_fake, bwd_fake: fake kernels of the forward and backward ops.
        setup_context: what the forward saves for the backward (torch.library's).
        backward: ``backward(bwd_op)`` returns the autograd formula of a forward
            op whose backward kernel is ``bwd_op``.
    """

    def __init__(self, op: str, *, fwd_fake: Callable, bwd_fake: Callable,
                 setup_context: Callable, backward: Callable[[Callable], Callable]):
        self.op = op
        self._fakes = (fwd_fake, bwd_fake)
        self._setup_context = setup_context
        self._backward = backward
        self._pairs: dict[str, KernelPair] = {}

    def register(self, names: str | tuple[str, ...], fwd, bwd, *, register_fake: bool = True,
                 autograd: bool = True) -> None:
        """Make the torch.library ops ``fwd``/``bwd`` (obeying the family's kernel
        contract) its kernels on the backends ``names``. Attaches the shared autograd
        formula (unless ``autograd=False``: a reference pair for the naive backend,
        plain functions that callers differentiate themselves) and the fake kernels
        (unless the op derives its own, as a triton_op does). One pair may serve
        several names (the compiled cpu and cuda backends share their ops)."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for name in names:
            if name not in backends.BACKENDS:
                raise ValueError(f"{self.op}: unknown backend {name!r}; expected one of "
                                 f"{backends.BACKENDS}")
            if name in self._pairs:
                raise RuntimeError(f"{self.op}: backend {name!r} already has kernels")
        if autograd:
            if register_fake:
                torch.library.register_fake(fwd, self._fakes[0])
                torch.library.register_fake(bwd, self._fakes[1])
            torch.library.register_autograd(fwd, self._backward(bwd),
                                            setup_context=self._setup_context)
        for name in names:
            self._pairs[name] = (fwd, bwd)

    def kernels(self, name: str, device: torch.device) -> KernelPair:
        """(fwd, bwd) of backend ``name`` (a name :func:`backends.select_backend`
        resolved for ``device``); raises if the backend registered none."""
        pair = self._pairs.get(name)
        if pair is not None:
            return pair
        reason = backends.why_unavailable(name, device) if name in backends.BACKENDS else None
        if reason is None:
            reason = ("its kernels register when mmkernels is imported and it was not "
                      "usable then (e.g. TRITON_INTERPRET=1 set after the import)"
                      if name in backends.BACKENDS else "no such backend")
        raise RuntimeError(f"backend {name!r} has no {self.op} kernels in this process: {reason}")

    def __contains__(self, name: str) -> bool:
        return name in self._pairs

    def __getitem__(self, name: str) -> KernelPair:
        """The registered pair of ``name`` (KeyError if none): for tests and tools."""
        return self._pairs[name]

    def items(self):
        return self._pairs.items()

    def values(self):
        return self._pairs.values()
