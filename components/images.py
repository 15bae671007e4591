"""Container images the components run in (recipes under images/). Override at compile time with
FLOWGRPO_TRAINER_IMAGE, e.g. to point at your registry."""

import os

VERSION = "0.1.0"
TRAINER_IMAGE = os.environ.get("FLOWGRPO_TRAINER_IMAGE", f"ghcr.io/flowgrpo/flowgrpo-trainer:{VERSION}")
