"""Baselines of the paper's Table 1 and the ``product2img benchmark`` harness.

* :mod:`.methods`: the :class:`BackgroundMethod` protocol and one adapter per method over a stock
  diffusers pipeline (SD-Inpainting, ControlNet-Inpainting (canny), IP-Adapter, EPBD-FT, Product2Img),
  the registry :data:`METHODS` and :func:`build_method`;
* :mod:`.benchmark`: :func:`load_benchmark_samples` and :func:`run_benchmark` (same samples, seeds and
  sampler for every method; per-method image folders; the metrics table);
* :mod:`.canny`: NumPy Canny edges for the ControlNet control image;
* :mod:`.commands`: the CLI subcommand.

Importing this package is cheap: torch and diffusers load on first use of a method.
"""

from .commands import register_commands

__all__ = [
    "register_commands",
    "BackgroundMethod",
    "SDInpaintingMethod",
    "ControlNetInpaintingCannyMethod",
    "IPAdapterMethod",
    "EPBDFTMethod",
    "Product2ImgMethod",
    "METHODS",
    "UNIFORM_PROMPT_TEMPLATE",
    "build_method",
    "uniform_prompt",
    "inpainting_mask",
    "checkpoint_class_name",
    "BenchmarkSample",
    "LazyMethod",
    "load_benchmark_samples",
    "run_benchmark",
    "canny_edges",
    "canny_control_image",
]

_LAZY = {
    **{name: "methods" for name in (
        "BackgroundMethod", "SDInpaintingMethod", "ControlNetInpaintingCannyMethod", "IPAdapterMethod", "EPBDFTMethod",
        "Product2ImgMethod", "METHODS", "UNIFORM_PROMPT_TEMPLATE", "build_method", "uniform_prompt",
        "inpainting_mask", "checkpoint_class_name",
    )},
    **{name: "benchmark" for name in ("BenchmarkSample", "LazyMethod", "load_benchmark_samples", "run_benchmark")},
    "canny_edges": "canny",
    "canny_control_image": "canny",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
