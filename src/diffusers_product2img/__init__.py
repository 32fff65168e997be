"""diffusers-product2img: prompt-free e-commerce product backgrounds (Product2Img, ACM MM 2024).

Names are imported lazily (as diffusers does), so ``import diffusers_product2img`` and the
``product2img --help`` command do not pay for torch and diffusers until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "DEFAULT_BACKGROUND_TOKEN": "background_token",
    "add_background_token": "background_token",
    "load_learned_embeds": "background_token",
    "save_learned_embeds": "background_token",
    "tokenize_product_names": "background_token",
    "Product2ImgPipeline": "pipeline_product2img",
    "Product2ImgPipelineOutput": "pipeline_product2img",
    "composite_product": "placement",
    "place_cutout": "placement",
    "product_mask_from_alpha": "placement",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .background_token import (  # noqa: F401
        DEFAULT_BACKGROUND_TOKEN,
        add_background_token,
        load_learned_embeds,
        save_learned_embeds,
        tokenize_product_names,
    )
    from .pipeline_product2img import Product2ImgPipeline, Product2ImgPipelineOutput  # noqa: F401
    from .placement import composite_product, place_cutout, product_mask_from_alpha  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
