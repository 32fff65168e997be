"""EPBD as a ``datasets.GeneratorBasedBuilder`` over the raw layout on disk.

datasets >= 4 no longer runs loading scripts (``load_dataset("dataset_scripts/epbd")`` raises), so
instantiate the builder yourself::

    import sys; sys.path.insert(0, "dataset_scripts/epbd"); from epbd import EPBD
    builder = EPBD(config_name="idr_round_2", data_dir="/data/epbd_raw")   # or "default"
    builder.download_and_prepare(); ds = builder.as_dataset()             # a DatasetDict

For ``load_dataset`` and the Hub, export the Hub-native form instead (Parquet + README configs):
``product2img dataset-export /data/epbd_raw /data/epbd``.

The builder is deliberately thin: reading and validating the layout, the IDR round chaining and
the features all live in :mod:`diffusers_product2img.data.layout`, shared with the export.

Configs: ``default`` (train, validation, test, test_unseen with every known round score) and
``idr_round_<k>`` (k = 1..10: the train samples kept in round k, chained). A custom gamma for a
round config: ``EPBD(config_name="idr_round_2", threshold=3.5, data_dir=...)``. The cache hash is
a fingerprint of the raw data (metadata, scores, file sizes and mtimes), so edits invalidate it.
"""

from dataclasses import dataclass

import datasets

from diffusers_product2img.data.layout import EPBDLayout, round_config_name

MAX_ROUNDS = 10

_DESCRIPTION = (
    "EPBD, the E-commerce Product Background Dataset of Product2Img (ACM MM 2024): product images with "
    "designed backgrounds, product cutouts and English product names, with IDR-LMM round subsets."
)
_CITATION = """@inproceedings{product2img2024,
  title={Product2IMG: Prompt-Free E-commerce Product Background Generation with Diffusion Model and Self-Improved LMM},
  booktitle={ACM Multimedia}, year={2024}
}"""


@dataclass
class EPBDConfig(datasets.BuilderConfig):
    """``round_index`` 0 is the full dataset; k >= 1 the train samples kept in IDR round k.

    ``threshold``: a custom gamma applied to every round 1..k (default: each round's stored one).
    """

    round_index: int = 0
    threshold: float | None = None


class EPBD(datasets.GeneratorBasedBuilder):
    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = EPBDConfig
    BUILDER_CONFIGS = [EPBDConfig(name="default", description="All splits.")] + [
        EPBDConfig(name=round_config_name(k), round_index=k, description=f"Train samples kept in IDR round {k}.")
        for k in range(1, MAX_ROUNDS + 1)
    ]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *args, data_dir: str | None = None, hash: str | None = None, **kwargs):
        if data_dir is None:
            raise ValueError("EPBD needs data_dir=<a raw EPBD folder> (see dataset_scripts/epbd/README.md)")
        self._layout = EPBDLayout(data_dir)
        super().__init__(*args, data_dir=data_dir, hash=hash or self._layout.fingerprint(), **kwargs)
        if self.config.threshold is not None and not self.config.round_index:
            raise ValueError("threshold applies to an idr_round_<k> config, not to 'default'")

    def _info(self) -> datasets.DatasetInfo:
        # Raises EPBDMissingScoresError for a round that has not been scored yet.
        return datasets.DatasetInfo(
            description=_DESCRIPTION,
            features=self._layout.features(self.config.round_index),
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"split": split})
            for split in self._layout.splits(self.config.round_index, self.config.threshold)
        ]

    def _generate_examples(self, split: str):
        yield from self._layout.iter_examples(split, self.config.round_index, self.config.threshold)
