import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers reads it at import time

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and several threads on 2 shared cores stall them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier test (or the code it ran) set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A complete tiny Product2Img folder, written once per test session."""
    from diffusers_product2img.testing import save_tiny_product2img_pipeline

    return save_tiny_product2img_pipeline(tmp_path_factory.mktemp("models") / "tiny-product2img")


@pytest.fixture(scope="session")
def tiny_inpainting_dir(tmp_path_factory):
    """A tiny stock SD-Inpainting folder (stands in for the SD-1.5 inpainting repo)."""
    from diffusers_product2img.testing import save_tiny_inpainting_pipeline

    return save_tiny_inpainting_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-inpainting")
