"""``python -m diffusers_product2img.demo``: the offline end-to-end demo (see :mod:`.run`)."""

import sys

from .run import main

sys.exit(main())
