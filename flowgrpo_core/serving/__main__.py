"""``python -m flowgrpo_core.serving serve-reward NAME ...``: the server without the rest of the CLI."""

import sys

from flowgrpo_core.serving.commands import main

sys.exit(main())
