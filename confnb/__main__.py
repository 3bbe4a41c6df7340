"""``python -m confnb`` is the ``confnb`` command."""

import sys

from confnb.cli import main

sys.exit(main())
