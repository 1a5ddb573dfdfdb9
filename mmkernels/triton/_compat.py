"""What differs between the supported Triton releases (mmkernels/backends.py
TRITON_SUPPORTED), in one place. Everything else in mmkernels/triton/ uses only
language and runtime API common to all of them.

Differences found by .ci/triton_versions.sh (3.6.0, 3.8.0 and 3.9.0):

- ``tl.dot`` on 3.6 rejects K < 16 for every dtype, fp32 and fp64 included
  (3.8 accepts K = 8 for exact fp32): the tile tables of _launch.py keep
  BLOCK_K >= ``_launch.MIN_DOT_K`` for all versions, no code here.
- ``tl.dot(x, y, acc)`` on 3.6 takes out_dtype fp32 unless told, and rejects an
  fp64 accumulator: matmul.dot passes ``out_dtype=acc.dtype`` (valid on both).
- The interpreter of 3.6 turns a one-element tensor into a Python int with
  ``int(ndarray)``, which NumPy 2.4 rejects for a 1-d array; 3.8 squeezes
  first. Loops ``range(program_id, n, num_programs)`` hit it.
  :func:`patch_interpreter` gives 3.6 the later behaviour.
- The interpreter of 3.9 gives ``bool tensor & bool scalar`` the dtype int32 and
  then refuses it as a load mask ("mask has unsupported dtype"); compiled code
  is fine. Kernels write such masks as ``tl.where(scalar, tensor, False)``
  (logsumexp.py), valid everywhere, no code here.
- 3.9 warns once that TRITON_DEFAULT_FP_FUSION is unset (its default, fusion
  on, is what the kernels were tuned and tested with; 3.10 will turn it off).
"""

from __future__ import annotations

import re

import triton

TRITON_VERSION = tuple(int(x) for x in re.findall(r"\d+", triton.__version__.split("+")[0])[:2])


def patch_interpreter() -> None:
    """Make the interpreter's ``tensor.__index__`` squeeze a one-element block
    (as triton >= 3.8 does). Call only under TRITON_INTERPRET=1; idempotent."""
    if TRITON_VERSION >= (3, 8):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_mmkernels", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._mmkernels = True
    interpreter._patch_lang_tensor = patched
