"""``python -m cai`` (and ``torchrun ... -m cai``): the ``cai`` command."""
import sys

from cai.cli import main

sys.exit(main())
