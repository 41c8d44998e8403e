"""``python -m adapterfuse.cli``: the same as the ``adapterfuse`` command (used by ``accelerate launch -m``)."""

import sys

from adapterfuse.cli.main import main

sys.exit(main())
