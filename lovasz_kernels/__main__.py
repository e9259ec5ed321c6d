"""``python -m lovasz_kernels``: the ``lovasz-kernels`` command, also where pip put its script
outside PATH (``pip install --user``, some notebook kernels)."""

import sys

from lovasz_kernels.cli import main

sys.exit(main())
