"""Container images the components run in (recipes under images/). Override at compile time with
FLOWGRPO_TRAINER_IMAGE or ``flowgrpo compile --image``, e.g. to point at your registry."""

import os

from flowgrpo_core.cluster.images import TRAINER, VERSION, image_ref

TRAINER_IMAGE = os.environ.get("FLOWGRPO_TRAINER_IMAGE", image_ref(TRAINER))

__all__ = ["TRAINER_IMAGE", "VERSION"]
