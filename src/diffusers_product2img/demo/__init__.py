"""The offline end-to-end demo (``python -m diffusers_product2img.demo``); see :mod:`.run`."""
