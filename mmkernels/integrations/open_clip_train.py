r"""open_clip's trainer with mmkernels' losses:

    python -m mmkernels.integrations.open_clip_train <open_clip_train arguments>
    torchrun --nproc_per_node 4 -m mmkernels.integrations.open_clip_train <arguments>

is ``python -m open_clip_train.main <arguments>`` (``pip install
'open_clip_torch[training]'``) after :func:`mmkernels.integrations.open_clip.patch`:
the CLIP loss (and ``--siglip``'s) is computed by mmkernels, with the
arguments open_clip's ``create_loss`` gives its own (``--local-loss``,
``--gather-with-grad``, the rank and world size, ``--loss-dist-impl``). CoCa
models and ``--distill`` keep open_clip's losses, with a one-line notice.
The environment variable ``MMKERNELS_BACKEND`` picks the kernels' backend.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``open_clip_train.main.main(argv)`` patched; ``argv`` defaults to ``sys.argv[1:]``.

    Returns 0, or 1 when open_clip's ``main`` returned an error code (it
    returns -1, having printed why, e.g. for an experiment name already
    used). The patch is undone afterwards, also on an exception.
    """
    from mmkernels.integrations import open_clip as integration

    integration.patch()
    try:
        from open_clip_train.main import main as train_main

        result = train_main(list(sys.argv[1:] if argv is None else argv))
    finally:
        integration.unpatch()
    return 0 if result in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
