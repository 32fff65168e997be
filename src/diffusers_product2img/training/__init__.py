"""Training Product2Img (paper 4.3, 5.1.1): the reusable parts of examples/train_product2img.py.

* :mod:`.params`: parameter groups and learning rates, the frozen embedding rows;
* :mod:`.sampler`: the sample order, a pure function of seed and step;
* :mod:`.collate`: EPBD rows -> tensors;
* :mod:`.loop`: one training step (inpainting loss + CBA);
* :mod:`.cache`: precomputed VAE / CLIP features;
* :mod:`.model_card`: the model card and the Hub upload.

Nothing here is imported by the pipeline (inference does not depend on training code).
"""

from .collate import Product2ImgCollator, inpainting_condition
from .loop import CBAConfig, StepOutput, encode_frozen_features, per_sample_randomness, training_step
from .params import FrozenEmbeddingRows, parameter_groups
from .sampler import EpochOrder, MicroBatchSampler, PositionDataset

__all__ = [
    "CBAConfig",
    "EpochOrder",
    "FrozenEmbeddingRows",
    "MicroBatchSampler",
    "PositionDataset",
    "Product2ImgCollator",
    "StepOutput",
    "encode_frozen_features",
    "inpainting_condition",
    "parameter_groups",
    "per_sample_randomness",
    "training_step",
]
