"""``python -m hsgd_tune.cli``: the ``hsgd-tune`` command."""

import sys

from hsgd_tune.cli.main import main

sys.exit(main())
