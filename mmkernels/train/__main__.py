"""``python -m mmkernels.train``: see mmkernels/train/__init__.py."""

import sys

from mmkernels.train import main

sys.exit(main())
