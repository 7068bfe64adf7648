"""``python -m redis_memory``: the ``redis-memory`` command (see :mod:`redis_memory.cli`)."""

import sys

from .cli import main

sys.exit(main())
