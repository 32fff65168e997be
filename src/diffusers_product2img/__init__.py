"""diffusers-product2img: prompt-free e-commerce product backgrounds (Product2Img, ACM MM 2024)."""

from .background_token import (
    DEFAULT_BACKGROUND_TOKEN,
    add_background_token,
    load_learned_embeds,
    save_learned_embeds,
    tokenize_product_names,
)
from .pipeline_product2img import Product2ImgPipeline, Product2ImgPipelineOutput
from .placement import composite_product, place_cutout, product_mask_from_alpha

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_BACKGROUND_TOKEN",
    "Product2ImgPipeline",
    "Product2ImgPipelineOutput",
    "add_background_token",
    "composite_product",
    "load_learned_embeds",
    "place_cutout",
    "product_mask_from_alpha",
    "save_learned_embeds",
    "tokenize_product_names",
]
