"""``python -m clproxy`` is the ``clproxy`` command."""

import sys

from .cli.main import main

sys.exit(main())
