"""``python -m clproxy`` is the ``clproxy`` command."""

import sys

from clproxy.cli.main import main

sys.exit(main())
