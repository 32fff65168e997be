"""EPBD-synth: a small procedural EPBD in which right and wrong can be measured.

Real EPBD cannot be downloaded here and no pretrained model is available, so this module builds a
synthetic world with the same schema (product cutout, English product name, product image with
its background) in which

* every **category** has a product shape family and palette, listing-like product names (brand,
  attributes, colour, noun, size, context) and one **scene family** (``category_scene``): the right
  background for a product follows from its category, so a tiny model can learn name -> scene;
* every **scene** has a distinctive palette and texture (kitchen counter, beach, bathroom tiles,
  desk, garden, gym, vanity, cafe), recognised by the fixed procedural :func:`classify_scene`;
* a configurable share of the *training* samples (default 30%) is planted **low quality**: wrong
  scene for the category, plain white background, overlaid text/watermark, or clutter. The ground
  truth sits in the ``quality`` metadata column (never read by the model or the training), so
  scorers and the IDR-LMM loop can be checked against it; :func:`detect_defects` finds the pixel
  defects procedurally.

Everything is deterministic from the seed: each sample draws from its own
``numpy.random.default_rng((seed, split, index))``, so the same seed gives byte-identical files.
The output is the raw EPBD layout (:mod:`diffusers_product2img.data.layout`), so the same builder,
export and training code read it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import layout

__all__ = [
    "SynthConfig",
    "SceneSpec",
    "CategorySpec",
    "SCENES",
    "CATEGORIES",
    "TRAIN_CATEGORIES",
    "UNSEEN_CATEGORIES",
    "DEFECT_KINDS",
    "QUALITY_LABELS",
    "category_scene",
    "generate_epbd_synth",
    "render_sample",
    "ground_truth_scores",
    "classify_scene",
    "detect_defects",
]

DEFECT_KINDS: tuple[str, ...] = ("wrong_scene", "plain_white", "watermark", "clutter")
"""The planted low-quality kinds; ``quality`` is ``"good"`` or one of these."""
QUALITY_LABELS: tuple[str, ...] = ("good",) + DEFECT_KINDS

RGB = tuple[int, int, int]


# ----------------------------------------------------------------------------------------------
# The world: scenes and categories
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneSpec:
    """A background scene family.

    ``top`` and ``bottom`` are the prototype colours of the upper (wall / sky) and lower (surface)
    regions; :func:`classify_scene` compares an image's region colours with them.
    """

    name: str
    description: str
    top: RGB
    bottom: RGB
    context: tuple[str, ...]  # listing phrases that hint at the scene ("for Kitchen", "Summer Travel")


@dataclass(frozen=True)
class CategorySpec:
    name: str
    scene: str
    shape: str
    nouns: tuple[str, ...]
    colors: tuple[tuple[str, RGB], ...]  # (colour word used in the name, product colour)
    accent: RGB  # cap / label / secondary part colour
    attributes: tuple[str, ...]
    sizes: tuple[str, ...]
    unseen: bool = False


SCENES: dict[str, SceneSpec] = {
    s.name: s
    for s in (
        SceneSpec("kitchen_counter", "cream wall over a white marble counter with grey veins",
                  (232, 218, 195), (216, 216, 221), ("for Kitchen", "Home Kitchen", "for Breakfast")),
        SceneSpec("beach", "blue sky and sea over warm sand", (130, 188, 236), (226, 203, 152),
                  ("for Beach", "Summer Travel", "Beach Surf")),
        SceneSpec("bathroom_tiles", "teal wall tiles with white grout over pale aqua tiles",
                  (118, 188, 194), (196, 224, 224), ("for Shower", "Bathroom Body Care", "Bathroom")),
        SceneSpec("desk", "light grey wall over a grained oak desk", (198, 202, 208), (184, 133, 84),
                  ("for Office", "Home Office", "Office Desk")),
        SceneSpec("garden", "leafy green foliage over grass", (140, 182, 122), (84, 144, 64),
                  ("for Garden", "Outdoor Patio", "Garden Outdoor")),
        SceneSpec("gym", "dark grey wall over a speckled black rubber floor", (72, 74, 82), (40, 40, 43),
                  ("for Gym", "Fitness Gym", "Sports Fitness")),
        SceneSpec("vanity", "soft pink wall over a pale pink vanity top", (236, 182, 198), (246, 214, 222),
                  ("Beauty Makeup", "Gift for Her", "Beauty Care")),
        SceneSpec("cafe", "dark brown cafe wall with warm bokeh over a walnut table", (94, 62, 42),
                  (124, 82, 50), ("Gift Box", "Coffee Snack", "Cafe Snack")),
    )
}
"""The scene families, in a fixed order."""

_WHITE, _BLACK, _GREY = (238, 238, 234), (36, 36, 40), (140, 142, 148)
_RED, _BLUE, _NAVY, _GREEN = (196, 40, 42), (40, 104, 196), (32, 46, 100), (46, 150, 80)
_PINK, _PURPLE, _GOLD, _SILVER = (232, 120, 160), (120, 60, 160), (204, 164, 64), (186, 188, 194)
_BROWN, _YELLOW, _ORANGE, _CREAM, _TEAL = (120, 74, 42), (244, 200, 40), (238, 128, 30), (236, 224, 196), (24, 130, 132)

CATEGORIES: dict[str, CategorySpec] = {
    c.name: c
    for c in (
        CategorySpec("coffee_mug", "kitchen_counter", "mug", ("Coffee Mug", "Tea Cup", "Mug"),
                     (("White", _WHITE), ("Black", _BLACK), ("Red", _RED), ("Navy", _NAVY), ("Teal", _TEAL)),
                     _CREAM, ("Ceramic", "Porcelain", "Glossy", "Matte", "Classic"),
                     ("350 ml", "12 oz", "450 ml", "2 pcs Set")),
        CategorySpec("cookware", "kitchen_counter", "pot", ("Cooking Pot", "Pot", "Stock Pot"),
                     (("Silver", _SILVER), ("Black", _BLACK), ("Red", _RED), ("Copper", (184, 112, 52))),
                     _BLACK, ("Stainless Steel", "Non Stick", "Aluminum", "Heavy"), ("24 cm", "3 l", "5 l")),
        CategorySpec("sunscreen", "beach", "tube", ("Sunscreen Lotion", "Sunscreen Gel", "Sunscreen Cream"),
                     (("Yellow", _YELLOW), ("Orange", _ORANGE), ("White", _WHITE), ("Blue", _BLUE)),
                     _WHITE, ("SPF 50", "SPF 30 PA +++", "Waterproof", "Hydrating"), ("50 ml", "100 ml", "200 ml")),
        CategorySpec("sunglasses", "beach", "glasses", ("Sunglasses", "Round Sunglasses"),
                     (("Black", _BLACK), ("Gold", _GOLD), ("Pink", _PINK), ("Silver", _SILVER)),
                     (30, 30, 34), ("Classic", "Vintage", "Unisex", "Metal"), ("1 pair", "2 pcs")),
        CategorySpec("shampoo", "bathroom_tiles", "bottle", ("Shampoo", "Conditioner", "Hair Shampoo"),
                     (("White", _WHITE), ("Green", _GREEN), ("Purple", _PURPLE), ("Blue", _BLUE)),
                     _BLACK, ("Aloe Vera", "Natural", "Organic", "Moisturizing"), ("400 ml", "750 ml", "1 l")),
        CategorySpec("soap", "bathroom_tiles", "bar", ("Soap Bar", "Soap", "Body Soap"),
                     (("Cream", _CREAM), ("Pink", _PINK), ("Green", (120, 180, 110)), ("Purple", (170, 130, 200))),
                     _WHITE, ("Natural", "Organic", "Vegan", "Scented"), ("100 g", "3 pcs", "4 pack")),
        CategorySpec("computer_mouse", "desk", "mouse", ("Wireless Mouse", "Bluetooth Mouse", "Mouse"),
                     (("Black", _BLACK), ("White", _WHITE), ("Grey", _GREY), ("Pink", _PINK)),
                     _GREY, ("Wireless", "Rechargeable", "Slim", "Silent"), ("USB", "2 pack", "Mini")),
        CategorySpec("notebook", "desk", "book", ("Notebook", "Notebook Set", "Paper Notebook"),
                     (("Brown", _BROWN), ("Black", _BLACK), ("Navy", _NAVY), ("Green", _GREEN)),
                     _GOLD, ("Leather", "Linen", "Classic", "Hardcover"), ("A5", "2 pack", "200 pages")),
        CategorySpec("plant_pot", "garden", "flowerpot", ("Flower Pot", "Plant Pot", "Planter"),
                     (("Brown", (176, 96, 58)), ("White", _WHITE), ("Grey", _GREY), ("Black", _BLACK)),
                     (48, 132, 56), ("Ceramic", "Outdoor", "Large", "Concrete"), ("20 cm", "30 cm", "2 pcs")),
        CategorySpec("dumbbell", "gym", "dumbbell", ("Dumbbell", "Dumbbell Set", "Weights"),
                     (("Black", (50, 50, 54)), ("Blue", _BLUE), ("Red", _RED), ("Grey", _GREY)),
                     _SILVER, ("Rubber", "Adjustable", "Steel", "Hex"), ("5 kg", "10 kg", "2 x 3 kg")),
        CategorySpec("lipstick", "vanity", "lipstick", ("Lipstick", "Matte Lipstick", "Lip Color"),
                     (("Red", _RED), ("Rose", (200, 80, 110)), ("Pink", _PINK), ("Purple", _PURPLE)),
                     _GOLD, ("Matte", "Velvet", "Hydrating", "Long Lasting"), ("3.5 g", "4 g", "2 pcs")),
        CategorySpec("chocolate", "cafe", "chocolate", ("Chocolate Bar", "Dark Chocolate", "Milk Chocolate"),
                     (("Gold", _GOLD), ("Red", _RED), ("Purple", _PURPLE), ("Blue", _BLUE)),
                     (82, 48, 30), ("Organic", "Vegan", "Sugar Free", "Premium"), ("100 g", "200 g", "3 pack")),
        # Categories held out of training (the paper's "unseen" test set): their scenes are seen
        # through other categories, and their names share the scene's context words.
        CategorySpec("kettle", "kitchen_counter", "kettle", ("Electric Kettle", "Tea Kettle", "Kettle"),
                     (("Silver", _SILVER), ("White", _WHITE), ("Black", _BLACK), ("Cream", _CREAM)),
                     _BLACK, ("Stainless Steel", "Glass", "Compact", "Classic"), ("1.7 l", "1 l"), True),
        CategorySpec("body_lotion", "bathroom_tiles", "pump_bottle", ("Body Lotion", "Hand Wash", "Shower Gel"),
                     (("White", _WHITE), ("Green", _GREEN), ("Pink", _PINK), ("Blue", _BLUE)),
                     _SILVER, ("Aloe Vera", "Moisturizing", "Natural", "Vitamin E"), ("250 ml", "500 ml"), True),
        CategorySpec("running_shoes", "gym", "shoe", ("Running Shoes", "Sneakers", "Sports Shoes"),
                     (("White", _WHITE), ("Black", _BLACK), ("Blue", _BLUE), ("Red", _RED)),
                     _WHITE, ("Lightweight", "Breathable", "Non Slip", "Men"), ("Size 42", "Size 38", "Size 44"),
                     True),
        CategorySpec("headphones", "desk", "headphones", ("Wireless Headphones", "Bluetooth Headphones", "Headphones"),
                     (("Black", _BLACK), ("White", _WHITE), ("Silver", _SILVER), ("Navy", _NAVY)),
                     _GREY, ("Wireless", "Noise Cancelling", "Foldable", "Over Ear"), ("40 h", "USB C"), True),
    )
}
"""Category name -> :class:`CategorySpec` (shape, palette, name parts, and its scene)."""

TRAIN_CATEGORIES: tuple[str, ...] = tuple(n for n, c in CATEGORIES.items() if not c.unseen)
UNSEEN_CATEGORIES: tuple[str, ...] = tuple(n for n, c in CATEGORIES.items() if c.unseen)
_BRANDS = ("Zen", "Aurora", "Nova", "Luma", "Vita", "Terra", "Ocea", "Solis", "Petra", "Kiro", "Mako")


def category_scene(category: str) -> str:
    """The right scene family for a category (what a good EPBD-synth image shows)."""
    try:
        return CATEGORIES[category].scene
    except KeyError:
        raise KeyError(f"unknown EPBD-synth category {category!r}; known: {sorted(CATEGORIES)}") from None


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """What :func:`generate_epbd_synth` generates. Defaults are small: seconds on one CPU core."""

    seed: int = 0
    resolution: int = 64
    num_train: int = 360
    num_validation: int = 24
    num_test: int = 48
    num_test_unseen: int = 48
    low_quality_rate: float = 0.3
    num_train_categories: int = 12
    num_unseen_categories: int = 4
    defect_kinds: tuple[str, ...] = DEFECT_KINDS
    write_masks: bool = False  # masks are derivable from the cutouts' alpha; write them to test that path

    def validate(self) -> None:
        if not 16 <= self.resolution <= 512:
            raise ValueError(f"resolution must be in [16, 512], got {self.resolution}")
        for name in ("num_train", "num_validation", "num_test", "num_test_unseen"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.low_quality_rate <= 1.0:
            raise ValueError(f"low_quality_rate must be in [0, 1], got {self.low_quality_rate}")
        if not 1 <= self.num_train_categories <= len(TRAIN_CATEGORIES):
            raise ValueError(f"num_train_categories must be in [1, {len(TRAIN_CATEGORIES)}]")
        if not 0 <= self.num_unseen_categories <= len(UNSEEN_CATEGORIES):
            raise ValueError(f"num_unseen_categories must be in [0, {len(UNSEEN_CATEGORIES)}]")
        if self.num_test_unseen and not self.num_unseen_categories:
            raise ValueError("num_test_unseen > 0 needs num_unseen_categories > 0")
        bad = set(self.defect_kinds) - set(DEFECT_KINDS)
        if bad or not self.defect_kinds:
            raise ValueError(f"defect_kinds must be a non-empty subset of {DEFECT_KINDS}, got {self.defect_kinds}")


# ----------------------------------------------------------------------------------------------
# Rendering helpers (all vectorised numpy on float32 images in [0, 1])
# ----------------------------------------------------------------------------------------------


class _Grid:
    """Coordinates and noise banks for one resolution, computed once."""

    def __init__(self, res: int):
        self.res = res
        axis = (np.arange(res, dtype=np.float32) + 0.5) / res
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")  # (H, W) in (0, 1)
        bank = np.random.default_rng(20240601)
        self.fine = bank.random((2 * res, 2 * res), dtype=np.float32) - 0.5  # per-pixel noise
        self.coarse = _smooth_noise(bank, 2 * res, cells=16) - 0.5  # blobs ~ res/8

    def crop(self, bank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        oy, ox = rng.integers(0, self.res, size=2)
        return bank[oy : oy + self.res, ox : ox + self.res]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled value noise in [0, 1] of shape (size, size)."""
    low = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    i = t.astype(np.int64)
    f = t - i
    rows = low[i] * (1 - f)[:, None] + low[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


@lru_cache(maxsize=8)
def _grid(res: int) -> _Grid:
    return _Grid(res)


def _rgb(color: Sequence[float]) -> np.ndarray:
    return np.asarray(color, dtype=np.float32) / 255.0


def _jitter(color: RGB, rng: np.random.Generator, amount: float = 8.0) -> np.ndarray:
    return np.clip((np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3)) / 255.0, 0, 1)


def _fill(top: np.ndarray, bottom: np.ndarray, horizon: float, g: _Grid) -> np.ndarray:
    below = (g.y >= horizon)[..., None]
    return np.where(below, bottom, top).astype(np.float32)


def _scene_kitchen_counter(spec, rng, g, horizon):
    top = _jitter(spec.top, rng) * (1.0 + 0.04 * (0.5 - g.y))[..., None]
    vein = np.abs(np.sin(2 * np.pi * (rng.uniform(1.5, 3.0) * g.x + 1.5 * g.y + 4.0 * g.crop(g.coarse, rng))))
    marble = _jitter(spec.bottom, rng)[None, None] * (1.0 - 0.22 * (vein < 0.12))[..., None]
    img = _fill(top, marble, horizon, g)
    edge = (np.abs(g.y - horizon) < 0.012)[..., None]
    return np.where(edge, img * 0.85, img)


def _scene_beach(spec, rng, g, horizon):
    sky = _jitter(spec.top, rng)[None, None] + (g.y / horizon * 0.12)[..., None] * np.float32([0.6, 0.3, 0.0])
    sea_top = horizon - rng.uniform(0.08, 0.14)
    waves = 0.05 * np.sin(2 * np.pi * (g.y * 40 + 2 * g.crop(g.coarse, rng)))
    sea = _rgb((76, 136, 176))[None, None] + waves[..., None]
    sand = _jitter(spec.bottom, rng)[None, None] + 0.05 * g.crop(g.fine, rng)[..., None]
    img = np.where((g.y < sea_top)[..., None], sky, sea)
    return np.where((g.y >= horizon)[..., None], sand, img).astype(np.float32)


def _tiles(g, rng, n, grout_width):
    phase = rng.uniform(0, 1, 2)
    fx = (g.x * n + phase[0]) % 1.0
    fy = (g.y * n + phase[1]) % 1.0
    w = grout_width * n / g.res
    return (fx < w) | (fy < w)


def _scene_bathroom_tiles(spec, rng, g, horizon):
    grout = _rgb((232, 238, 238))
    wall = np.where(_tiles(g, rng, 6, 1.0)[..., None], grout, _jitter(spec.top, rng))
    floor = np.where(_tiles(g, rng, 4, 1.0)[..., None], grout, _jitter(spec.bottom, rng))
    shade = (1.0 + 0.03 * g.crop(g.coarse, rng))[..., None]
    return (_fill(wall, floor, horizon, g) * shade).astype(np.float32)


def _scene_desk(spec, rng, g, horizon):
    wall = _jitter(spec.top, rng)[None, None] * (1.0 + 0.05 * (g.x - 0.5))[..., None]
    grain = 0.06 * np.sin(2 * np.pi * (g.y * 28 + 1.5 * g.crop(g.coarse, rng)))
    wood = _jitter(spec.bottom, rng)[None, None] * (1.0 + grain)[..., None]
    return _fill(wall, wood, horizon, g)


def _scene_garden(spec, rng, g, horizon):
    leaves = (g.crop(g.coarse, rng) > 0.1)[..., None]
    foliage = np.where(leaves, _jitter((96, 146, 84), rng), _jitter(spec.top, rng))
    grass = _jitter(spec.bottom, rng)[None, None] + (0.07 * g.crop(g.fine, rng))[..., None] * np.float32([0.5, 1, 0.5])
    return _fill(foliage, grass, horizon, g)


def _scene_gym(spec, rng, g, horizon):
    wall = _jitter(spec.top, rng)[None, None] * (1.0 - 0.15 * np.abs(g.x - 0.5))[..., None]
    speck = (g.crop(g.fine, rng) > 0.44)[..., None]
    floor = np.where(speck, _rgb((96, 96, 100)), _jitter(spec.bottom, rng))
    return _fill(wall, floor, horizon, g)


def _scene_vanity(spec, rng, g, horizon):
    cx = rng.uniform(0.3, 0.7)
    glow = np.exp(-((g.x - cx) ** 2 + (g.y - 0.2) ** 2) / 0.08)[..., None] * 0.05
    wall = _jitter(spec.top, rng)[None, None] + glow
    top = _jitter(spec.bottom, rng)[None, None] * (1.0 - 0.03 * (g.y - horizon))[..., None]
    return np.clip(_fill(wall, top, horizon, g), 0, 1)


def _scene_cafe(spec, rng, g, horizon):
    wall = np.broadcast_to(_jitter(spec.top, rng), g.y.shape + (3,)).copy()
    warm = _rgb((214, 164, 104))
    for _ in range(int(rng.integers(4, 8))):
        cx, cy, r = rng.uniform(0.05, 0.95), rng.uniform(0.03, horizon - 0.05), rng.uniform(0.04, 0.08)
        win = _window(g, cx - 3 * r, cx + 3 * r, cy - 3 * r, cy + 3 * r)
        a = 0.5 * np.exp(-((g.x[win] - cx) ** 2 + (g.y[win] - cy) ** 2) / (r * r))[..., None]
        wall[win] = wall[win] * (1 - a) + warm * a
    grain = 0.07 * np.sin(2 * np.pi * (g.y * 22 + 1.2 * g.crop(g.coarse, rng)))
    table = _jitter(spec.bottom, rng)[None, None] * (1.0 + grain)[..., None]
    return _fill(wall, table, horizon, g)


_SCENE_RENDERERS: dict[str, Callable] = {
    "kitchen_counter": _scene_kitchen_counter,
    "beach": _scene_beach,
    "bathroom_tiles": _scene_bathroom_tiles,
    "desk": _scene_desk,
    "garden": _scene_garden,
    "gym": _scene_gym,
    "vanity": _scene_vanity,
    "cafe": _scene_cafe,
}


def _render_scene(scene: str, rng: np.random.Generator, g: _Grid, horizon: float) -> np.ndarray:
    return np.clip(_SCENE_RENDERERS[scene](SCENES[scene], rng, g, horizon), 0, 1).astype(np.float32)


# --- product shapes: signed distances (negative inside) in product units -----------------------


def _box(u, v, cx, cy, hw, hh, r=0.0):
    qx = np.abs(u - cx) - hw + r
    qy = np.abs(v - cy) - hh + r
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r


def _circle(u, v, cx, cy, r):
    return np.hypot(u - cx, v - cy) - r


def _ring(u, v, cx, cy, r, t):
    return np.abs(np.hypot(u - cx, v - cy) - r) - t


def _trapezoid(u, v, cy, hh, hw_bottom, hw_top):
    # v grows downwards in image space; bottom edge at cy + hh.
    t = np.clip((v - (cy - hh)) / (2 * hh), 0, 1)
    hw = hw_top + (hw_bottom - hw_top) * t
    return np.maximum(np.abs(u) - hw, np.abs(v - cy) - hh)


def _shape_parts(shape: str, u: np.ndarray, v: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """Signed-distance parts of a product, drawn in order; roles: base, accent, dark.

    Product units: the product spans v in [-1, 1] (top to bottom) and is centred at u = 0.
    """
    if shape == "mug":
        return [(_ring(u, v, 0.42, 0.0, 0.28, 0.08), "base"), (_box(u, v, -0.1, 0.1, 0.48, 0.82, 0.08), "base"),
                (_box(u, v, -0.1, -0.6, 0.48, 0.06), "dark")]
    if shape == "pot":
        return [(_box(u, v, 0, 0.25, 0.82, 0.6, 0.1), "base"), (_box(u, v, 0, -0.38, 0.86, 0.07, 0.03), "dark"),
                (_box(u, v, 0, -0.55, 0.14, 0.12, 0.05), "accent"), (_box(u, v, 0.95, 0.05, 0.13, 0.06), "accent"),
                (_box(u, v, -0.95, 0.05, 0.13, 0.06), "accent")]
    if shape == "tube":
        return [(_trapezoid(u, v, -0.1, 0.75, 0.24, 0.42), "base"), (_box(u, v, 0, -0.85, 0.44, 0.06), "dark"),
                (_box(u, v, 0, 0.8, 0.22, 0.2, 0.04), "accent"), (_box(u, v, 0, -0.1, 0.28, 0.2), "accent")]
    if shape == "glasses":
        return [(_box(u, v, 0, -0.12, 0.2, 0.05), "base"), (_circle(u, v, -0.5, 0.05, 0.42), "base"),
                (_circle(u, v, 0.5, 0.05, 0.42), "base"), (_circle(u, v, -0.5, 0.05, 0.33), "accent"),
                (_circle(u, v, 0.5, 0.05, 0.33), "accent")]
    if shape == "bottle":
        return [(_box(u, v, 0, 0.25, 0.4, 0.75, 0.12), "base"), (_box(u, v, 0, -0.6, 0.14, 0.14), "base"),
                (_box(u, v, 0, -0.82, 0.18, 0.14, 0.04), "accent"), (_box(u, v, 0, 0.3, 0.32, 0.28), "accent")]
    if shape == "bar":
        return [(_box(u, v, 0, 0.35, 0.85, 0.5, 0.3), "base"), (_box(u, v, 0, 0.35, 0.5, 0.18, 0.12), "accent")]
    if shape == "mouse":
        e = np.hypot(u / 0.52, (v - 0.1) / 0.9) - 1.0
        return [(e * 0.5, "base"), (_box(u, v, 0, -0.45, 0.02, 0.3), "dark"), (_box(u, v, 0, -0.3, 0.05, 0.1), "accent")]
    if shape == "book":
        return [(_box(u, v, 0.05, 0, 0.62, 0.92, 0.03), "base"), (_box(u, v, -0.5, 0, 0.08, 0.92), "dark"),
                (_box(u, v, 0.1, -0.45, 0.3, 0.1), "accent")]
    if shape == "flowerpot":
        return [(_circle(u, v, 0, -0.45, 0.5) - 0.0, "accent"), (_circle(u, v, -0.35, -0.2, 0.32), "accent"),
                (_circle(u, v, 0.35, -0.2, 0.32), "accent"), (_trapezoid(u, v, 0.4, 0.58, 0.42, 0.6), "base"),
                (_box(u, v, 0, -0.12, 0.66, 0.08), "dark")]
    if shape == "dumbbell":
        return [(_box(u, v, 0, 0.3, 0.7, 0.07), "accent"), (_box(u, v, -0.62, 0.3, 0.16, 0.55, 0.06), "base"),
                (_box(u, v, 0.62, 0.3, 0.16, 0.55, 0.06), "base"), (_box(u, v, -0.85, 0.3, 0.08, 0.38, 0.04), "dark"),
                (_box(u, v, 0.85, 0.3, 0.08, 0.38, 0.04), "dark")]
    if shape == "lipstick":
        tip = np.maximum(_box(u, v, 0, -0.45, 0.14, 0.5, 0.06), (v + 0.55) - 0.6 * (u + 0.14))
        return [(tip, "base"), (_box(u, v, 0, 0.05, 0.2, 0.15), "accent"), (_box(u, v, 0, 0.6, 0.24, 0.4, 0.04), "dark")]
    if shape == "chocolate":
        bar = _box(u, v, 0, 0, 0.6, 0.92, 0.03)
        segs = (np.abs(((u + 0.6) / 0.4) % 1.0 - 0.5) > 0.44) | (np.abs(((v + 0.92) / 0.46) % 1.0 - 0.5) > 0.45)
        return [(bar, "accent"), (np.where(segs, 1.0, _box(u, v, 0, 0.35, 0.62, 0.5)), "base")]
    if shape == "kettle":
        return [(_ring(u, v, 0, -0.35, 0.45, 0.06), "dark"), (_circle(u, v, 0, 0.35, 0.62), "base"),
                (_trapezoid(u, v, 0.7, 0.25, 0.62, 0.5), "base"), (_box(u, v, 0.72, 0.05, 0.22, 0.06), "base"),
                (_box(u, v, 0, 0.92, 0.55, 0.05), "accent")]
    if shape == "pump_bottle":
        return [(_box(u, v, 0, 0.35, 0.38, 0.65, 0.1), "base"), (_box(u, v, 0, -0.45, 0.1, 0.2), "accent"),
                (_box(u, v, 0.12, -0.65, 0.25, 0.06), "accent"), (_box(u, v, 0, 0.4, 0.3, 0.25), "accent")]
    if shape == "shoe":
        upper = np.maximum(np.hypot((u + 0.1) / 0.85, (v - 0.45) / 0.75) - 1.0, v - 0.5) * 0.6
        return [(upper, "base"), (_box(u, v, 0.05, 0.62, 0.92, 0.12, 0.06), "accent"),
                (_box(u, v, -0.45, -0.05, 0.18, 0.06), "dark")]
    if shape == "headphones":
        band = np.maximum(_ring(u, v, 0, 0.15, 0.72, 0.08), v - 0.15)
        return [(band, "base"), (_box(u, v, -0.72, 0.4, 0.16, 0.35, 0.1), "dark"),
                (_box(u, v, 0.72, 0.4, 0.16, 0.35, 0.1), "dark")]
    raise ValueError(f"unknown product shape {shape!r}")


def _window(g: _Grid, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Pixel slices covering [x0, x1] x [y0, y1] (canvas fractions), one pixel of margin."""
    r = g.res
    return (slice(max(int(y0 * r) - 1, 0), min(int(y1 * r) + 2, r)),
            slice(max(int(x0 * r) - 1, 0), min(int(x1 * r) + 2, r)))


def _render_product(spec: CategorySpec, color: RGB, rng: np.random.Generator, g: _Grid, horizon: float):
    """(rgb HxWx3, alpha HxW) of the product, placed resting on the scene's surface."""
    res = g.res
    half = rng.uniform(0.22, 0.28)  # half height of the product, as a fraction of the canvas
    cx = rng.uniform(0.38, 0.62)
    bottom = min(horizon + rng.uniform(0.08, 0.16), 0.88)
    cy = bottom - half
    # Every shape fits in |u| <= 1.15, |v| <= 1.05: render that window only.
    win = _window(g, cx - 1.15 * half, cx + 1.15 * half, cy - 1.05 * half, cy + 1.05 * half)
    u = (g.x[win] - cx) / half
    v = (g.y[win] - cy) / half
    px = half * res  # pixels per product unit
    base = _rgb(color) * np.float32(rng.uniform(0.94, 1.06))
    roles = {"base": base, "accent": _rgb(spec.accent), "dark": base * 0.6}
    rgb_w = np.zeros(u.shape + (3,), np.float32)
    alpha_w = np.zeros(u.shape, np.float32)
    light = (1.0 + 0.12 * np.cos(np.clip(u, -1.5, 1.5) * 1.2) - 0.06)[..., None]
    for sdf, role in _shape_parts(spec.shape, u, v):
        a = np.clip(0.5 - sdf * px, 0.0, 1.0)
        rgb_w = rgb_w * (1 - a[..., None]) + (roles[role] * light) * a[..., None]
        alpha_w = np.maximum(alpha_w, a)
    rgb = np.zeros(g.y.shape + (3,), np.float32)
    alpha = np.zeros(g.y.shape, np.float32)
    rgb[win] = np.clip(rgb_w, 0, 1)
    alpha[win] = alpha_w
    return rgb, alpha


# --- defects --------------------------------------------------------------------------------------

_WATERMARK_TEXTS = ("SALE 50% OFF", "BEST PRICE", "www.shop.com", "HOT SALE", "FREE SHIPPING", "NEW 2024")


@lru_cache(maxsize=64)
def _text_stamp(text: str, res: int, outline: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Alpha masks ``(fill, outline)`` (h, w) float32 of a text at a size proportional to the resolution.

    ``outline`` adds a stroke around the glyphs (the usual white-on-black-outline watermark); without
    it the outline mask is empty.
    """
    size = max(8, res // 7)
    stroke = max(1, size // 12) if outline else 0
    font = ImageFont.load_default(size=size)
    box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font, stroke_width=stroke)
    canvas = (box[2] + 2, box[3] + 2)
    fill_img, full_img = Image.new("L", canvas, 0), Image.new("L", canvas, 0)
    ImageDraw.Draw(fill_img).text((1, 1), text, fill=255, font=font)
    ImageDraw.Draw(full_img).text((1, 1), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    fill = np.asarray(fill_img, dtype=np.float32) / 255.0
    full = np.asarray(full_img, dtype=np.float32) / 255.0
    return fill, np.clip(full - fill, 0.0, 1.0)


def _paste_alpha(img: np.ndarray, stamp: np.ndarray, top: int, left: int, color: np.ndarray, opacity: float):
    h, w = img.shape[:2]
    sh, sw = stamp.shape
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + sh, h), min(left + sw, w)
    if y0 >= y1 or x0 >= x1:
        return
    a = stamp[y0 - top : y1 - top, x0 - left : x1 - left, None] * opacity
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + color * a


def _add_watermark(img: np.ndarray, rng: np.random.Generator, g: _Grid) -> None:
    res = g.res
    white, dark = np.float32([1, 1, 1]), np.float32([0.03, 0.03, 0.04])
    text = _WATERMARK_TEXTS[int(rng.integers(len(_WATERMARK_TEXTS)))]
    if rng.random() < 0.5:  # a dark promotional banner with white text
        fill, outline = _text_stamp(text, res, outline=True)
        fill = np.maximum(fill, outline)  # bold white text
        band_h = fill.shape[0] + max(2, res // 32)
        top = int(rng.choice([rng.integers(0, res // 10 + 1), rng.integers(res - band_h - res // 10, res - band_h + 1)]))
        img[top : top + band_h] = img[top : top + band_h] * 0.04 + dark * 0.96
        left = int(rng.integers(0, max(1, res - fill.shape[1])))
        _paste_alpha(img, fill, top + (band_h - fill.shape[0]) // 2, left, white, 1.0)
    else:  # repeated white watermark text with a dark outline
        fill, outline = _text_stamp(text, res, outline=True)
        rows = int(rng.integers(3, 5))
        for k in range(rows):
            top = int((k + rng.uniform(0.1, 0.6)) * res / rows) - fill.shape[0] // 2
            left = int(rng.integers(-fill.shape[1] // 3, max(1, res - fill.shape[1] // 2)))
            _paste_alpha(img, outline, top, left, dark, 0.96)
            _paste_alpha(img, fill, top, left, white, 0.96)


def _add_clutter(img: np.ndarray, rng: np.random.Generator, g: _Grid) -> None:
    for _ in range(int(rng.integers(7, 13))):
        hue = rng.uniform(0, 1)
        color = _hsv_to_rgb(hue, rng.uniform(0.8, 1.0), rng.uniform(0.7, 1.0))
        cx, cy, r = rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.09)
        kind = int(rng.integers(3))
        win = _window(g, cx - 1.7 * r, cx + 1.7 * r, cy - 1.3 * r, cy + 1.3 * r)
        x, y = g.x[win], g.y[win]
        if kind == 0:
            sdf = _circle(x, y, cx, cy, r)
        elif kind == 1:
            sdf = _box(x, y, cx, cy, r, r * rng.uniform(0.5, 1.2))
        else:
            sdf = _box(x, y, cx, cy, r * 1.6, r * 0.3)
        a = np.clip(0.5 - sdf * g.res, 0, 1)[..., None]
        img[win] = img[win] * (1 - a) + color * a


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.float32([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _plain_white(rng: np.random.Generator, g: _Grid, cx: float, bottom: float) -> np.ndarray:
    img = np.ones(g.y.shape + (3,), np.float32)
    shadow = np.exp(-(((g.x - cx) / 0.25) ** 2 + ((g.y - bottom) / 0.03) ** 2)) * 0.1
    return img - shadow[..., None]


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------


def _product_name(spec: CategorySpec, color_word: str, rng: np.random.Generator) -> str:
    brand = _BRANDS[int(rng.integers(len(_BRANDS)))]
    noun = spec.nouns[int(rng.integers(len(spec.nouns)))]
    attrs = list(rng.choice(spec.attributes, size=int(rng.integers(1, 3)), replace=False))
    size = spec.sizes[int(rng.integers(len(spec.sizes)))]
    context = SCENES[spec.scene].context
    ctx = context[int(rng.integers(len(context)))] if rng.random() < 0.6 else ""
    template = int(rng.integers(3))
    if template == 0:
        parts = [brand, *attrs, color_word, noun, size, ctx]
    elif template == 1:
        parts = [brand, noun, *attrs, color_word, ctx, size]
    else:
        parts = [*attrs, color_word, noun, size, ctx, "by", brand]
    return " ".join(p for p in parts if p)


def render_sample(
    category: str,
    quality: str = "good",
    seed: int | Sequence[int] = 0,
    resolution: int = 64,
) -> dict:
    """Render one EPBD-synth sample.

    Returns a dict with ``image`` (uint8 HxWx3), ``cutout`` (uint8 HxWx4, alpha = product),
    ``product_name``, ``scene`` (the scene actually drawn, or ``"plain_white"``) and ``quality``.
    """
    if quality not in QUALITY_LABELS:
        raise ValueError(f"quality must be one of {QUALITY_LABELS}, got {quality!r}")
    spec = CATEGORIES[category] if category in CATEGORIES else None
    if spec is None:
        raise KeyError(f"unknown EPBD-synth category {category!r}; known: {sorted(CATEGORIES)}")
    rng = np.random.default_rng(seed)
    g = _grid(int(resolution))
    color_word, color = spec.colors[int(rng.integers(len(spec.colors)))]
    name = _product_name(spec, color_word, rng)
    horizon = float(rng.uniform(0.56, 0.68))
    scene = spec.scene
    if quality == "wrong_scene":
        others = [s for s in SCENES if s != spec.scene]
        scene = others[int(rng.integers(len(others)))]
    product_rgb, alpha = _render_product(spec, color, rng, g, horizon)
    if quality == "plain_white":
        cols = np.nonzero(alpha.max(axis=0) > 0.5)[0]
        rows = np.nonzero(alpha.max(axis=1) > 0.5)[0]
        cx = (cols.mean() + 0.5) / g.res if cols.size else 0.5
        bottom = (rows.max() + 1) / g.res if rows.size else 0.8
        background = _plain_white(rng, g, cx, bottom)
        scene = "plain_white"
    else:
        background = _render_scene(scene, rng, g, horizon)
    if quality == "watermark":
        _add_watermark(background, rng, g)
    elif quality == "clutter":
        _add_clutter(background, rng, g)
    a = alpha[..., None]
    image = background * (1 - a) + product_rgb * a
    image_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    alpha_u8 = np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)
    product_u8 = np.clip(product_rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # The cutout holds the image's own pixels where the product is opaque (what a cutout tool
    # extracts) and the product colour in its soft edge.
    cutout_rgb = np.where((alpha_u8 == 255)[..., None], image_u8, product_u8)
    cutout = np.concatenate([cutout_rgb, alpha_u8[..., None]], axis=-1)
    return {"image": image_u8, "cutout": cutout, "product_name": name, "scene": scene, "quality": quality}


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

_SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2, "test_unseen": 3}


def _plan(config: SynthConfig) -> list[dict]:
    """Which sample is which: id, split, category, quality (deterministic from the seed)."""
    plan_rng = np.random.default_rng((config.seed, 99))
    seen = TRAIN_CATEGORIES[: config.num_train_categories]
    unseen = UNSEEN_CATEGORIES[: config.num_unseen_categories]
    rows: list[dict] = []
    for split, count, cats in (
        ("train", config.num_train, seen),
        ("validation", config.num_validation, seen),
        ("test", config.num_test, seen),
        ("test_unseen", config.num_test_unseen, unseen),
    ):
        if not count:
            continue
        categories = [cats[i % len(cats)] for i in plan_rng.permutation(count)]
        qualities = ["good"] * count
        if split == "train":
            n_bad = int(round(config.low_quality_rate * count))
            for j, idx in enumerate(plan_rng.permutation(count)[:n_bad]):
                qualities[idx] = config.defect_kinds[j % len(config.defect_kinds)]
        width = max(5, len(str(count)))
        for i in range(count):
            rows.append({"id": f"{split}-{i:0{width}d}", "split": split, "index": i,
                         "category": categories[i], "quality": qualities[i]})
    return rows


def _write_samples(root: str, rows: list[dict], config: SynthConfig) -> list[dict]:
    """Render and write some planned samples; returns their metadata records (in order)."""
    tmp = Path(root)
    records = []
    for row in rows:
        sample = render_sample(row["category"], row["quality"],
                               seed=(config.seed, _SPLIT_INDEX[row["split"]], row["index"]),
                               resolution=config.resolution)
        _save_png(sample["image"], "RGB", tmp / layout.default_image_path(row["id"]))
        _save_png(sample["cutout"], "RGBA", tmp / layout.default_cutout_path(row["id"]))
        if config.write_masks:
            _save_png(sample["cutout"][..., 3], "L", tmp / layout.default_mask_path(row["id"]))
        records.append({"id": row["id"], "product_name": sample["product_name"], "category": row["category"],
                        "split": row["split"], "quality": sample["quality"], "scene": sample["scene"]})
    return records


def generate_epbd_synth(output_dir: str | os.PathLike, config: SynthConfig | None = None, *,
                        overwrite: bool = False, num_workers: int = 1, **overrides) -> Path:
    """Generate EPBD-synth in the raw EPBD layout and return its root.

    Args:
        output_dir: folder to create (written to a temporary sibling first, then moved into place).
        config: a :class:`SynthConfig`; keyword ``overrides`` replace its fields
            (``generate_epbd_synth(out, seed=1, num_train=1000)``).
        overwrite: replace an existing ``output_dir``.
        num_workers: processes rendering in parallel (the output is the same for any value: every
            sample has its own random stream).

    The metadata has the EPBD columns ``id, product_name, category, split`` plus, for EPBD-synth
    only, ``quality`` (ground truth: ``good`` or a :data:`DEFECT_KINDS` entry) and ``scene`` (the
    scene actually drawn). Training never reads those two columns.
    """
    config = replace(config or SynthConfig(), **overrides)
    config.validate()
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        for sub in (layout.IMAGES_DIR, layout.CUTOUTS_DIR) + ((layout.MASKS_DIR,) if config.write_masks else ()):
            (tmp / sub).mkdir()
        plan = _plan(config)
        if num_workers > 1 and len(plan) > 64:
            from concurrent.futures import ProcessPoolExecutor

            chunks = [plan[i : i + 256] for i in range(0, len(plan), 256)]
            with ProcessPoolExecutor(num_workers) as pool:
                parts = pool.map(_write_samples, [str(tmp)] * len(chunks), chunks, [config] * len(chunks))
                records = [r for part in parts for r in part]
        else:
            records = _write_samples(str(tmp), plan, config)
        layout.write_metadata(tmp, records, extra_columns=("quality", "scene"))
        layout.write_info(tmp, {
            "name": "EPBD-synth",
            "synthetic": True,
            "resolution": config.resolution,
            "generator": "diffusers_product2img.data.synth",
            "config": {f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v)
                       for f in fields(config)},
            "categories": {n: {"scene": c.scene, "unseen": c.unseen} for n, c in CATEGORIES.items()},
            "scenes": {n: s.description for n, s in SCENES.items()},
            "quality_labels": list(QUALITY_LABELS),
        })
        layout.replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _save_png(array: np.ndarray, mode: str, path: Path) -> None:
    Image.fromarray(array, mode=mode).save(path, format="PNG", compress_level=1)


def ground_truth_scores(root: str | os.PathLike, round_index: int = 1, *, error_rate: float = 0.0,
                        seed: int = 0) -> dict[str, float]:
    """What an oracle LMM would score the candidates of IDR round ``round_index`` (for tests and demos).

    The candidates are the train samples kept after round k-1. A ``good`` sample scores 4 or 5, a
    planted low-quality one 1 to 3; ``error_rate`` flips that judgement for a random share of them.
    Write the result with :func:`~diffusers_product2img.data.layout.write_round_scores`.
    """
    lay = layout.EPBDLayout(root)
    if "quality" not in lay.extra_columns:
        raise layout.EPBDLayoutError("no 'quality' column: ground-truth scores need EPBD-synth", path=root)
    rng = np.random.default_rng((seed, int(round_index)))
    scores = {}
    for sid in lay.kept_ids(int(round_index) - 1):
        good = lay.by_id[sid].extra["quality"] == "good"
        if rng.random() < error_rate:
            good = not good
        scores[sid] = float(rng.integers(4, 6)) if good else float(rng.integers(1, 4))
    return scores


# ----------------------------------------------------------------------------------------------
# Fixed procedural judges: scene classifier and defect detectors
# ----------------------------------------------------------------------------------------------


def _as_float_image(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0, 1)


def _background_weights(shape: tuple[int, int], product_mask, dilate: int = 2) -> np.ndarray:
    """Boolean HxW: pixels that are background, away from the product's edge."""
    if product_mask is None:
        return np.ones(shape, bool)
    if isinstance(product_mask, Image.Image):
        m = np.asarray(product_mask.convert("L"), dtype=np.float32) / 255.0
    else:
        m = np.asarray(product_mask, dtype=np.float32)
        if m.ndim == 3:
            m = m[..., 0]
        if m.max(initial=0) > 1.0:
            m = m / 255.0
    if m.shape != shape:
        raise ValueError(f"product_mask has shape {m.shape}, the image {shape}")
    return ~_dilate(m > 0.02, max(dilate, dilate * shape[0] // 64))


def _smoothstep(x: float, lo: float, hi: float) -> float:
    t = min(max((x - lo) / (hi - lo), 0.0), 1.0)
    return float(t * t * (3 - 2 * t))


_PROTOTYPES = np.array([list(s.top) + list(s.bottom) for s in SCENES.values()], dtype=np.float32)
_UNKNOWN_DISTANCE = 75.0


def _region_median(img: np.ndarray, keep: np.ndarray, y0: float, y1: float) -> np.ndarray | None:
    h = img.shape[0]
    a, b = int(round(y0 * h)), max(int(round(y1 * h)), int(round(y0 * h)) + 1)
    sel = keep[a:b]
    if sel.sum() < max(4, sel.size // 50):
        return None
    return np.median(img[a:b][sel], axis=0) * 255.0


def _plain_white_fraction(img: np.ndarray, keep: np.ndarray) -> float:
    bg = img[keep]
    if not len(bg):
        return 0.0
    return float((bg.min(axis=-1) > 0.92).mean())


def classify_scene(image, product_mask=None) -> str:
    """Which :data:`SCENES` family a background belongs to, from its pixels (no learning).

    Compares the median colours of the upper band (wall / sky) and the lower band (surface) of the
    non-product pixels with each scene's prototype colours. Returns ``"plain_white"`` for a white
    studio background and ``"unknown"`` when no scene is close. Pass ``product_mask`` (L, 255 =
    product) when you have it; without it the bands still mostly miss the product.
    """
    img = _as_float_image(image)
    keep = _background_weights(img.shape[:2], product_mask, dilate=1)
    if _plain_white_fraction(img, keep) > 0.6:
        return "plain_white"
    # Overlaid text and banners are near-white / near-black: no scene has those, leave them out,
    # and the whole rows of a dark banner with them (its anti-aliased text would remain otherwise).
    lum = img @ np.float32([0.299, 0.587, 0.114])
    dark = lum < 0.1
    banner_rows = (dark & keep).sum(axis=1) > 0.5 * np.maximum(keep.sum(axis=1), 1)
    keep = keep & (lum < 0.93) & ~dark & ~banner_rows[:, None]
    top = _region_median(img, keep, 0.0, 0.38)
    bottom = _region_median(img, keep, 0.7, 1.0)
    if top is None or bottom is None:
        return "unknown"
    dist = np.linalg.norm(_PROTOTYPES - np.concatenate([top, bottom])[None], axis=1)
    best = int(dist.argmin())
    if dist[best] > _UNKNOWN_DISTANCE:
        return "unknown"
    return list(SCENES)[best]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _text_edge_density(img: np.ndarray, keep: np.ndarray) -> float:
    """Near-white pixels right next to near-black ones (text, its shadow or banner), per image row.

    Normalised by the side length so that it does not depend on the resolution (text edges are
    lines: their pixel count grows with the side, not the area).
    """
    res = img.shape[0]
    lum = img @ np.float32([0.299, 0.587, 0.114])
    reach = max(1, res // 64)
    bright = (lum > 0.85) & keep
    dark = (lum < 0.25) & keep
    count = (bright & _dilate(dark, reach)).sum()
    return float(count) / (res * max(float(keep.mean()), 0.05) * reach)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in [0, 1) of an (N, 3) float array."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    mx, mn = rgb.max(axis=1), rgb.min(axis=1)
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return (h / 6.0) % 1.0


def detect_defects(image, product_mask=None, category: str | None = None) -> dict[str, float]:
    """Procedural defect detectors: a confidence in [0, 1] per kind.

    Always returns ``plain_white`` (a white studio background), ``watermark`` (overlaid text /
    marks: bright strokes right next to dark ones) and ``clutter`` (many strongly saturated
    objects, which no scene has). With ``category`` it adds ``wrong_scene``: 1.0 when
    :func:`classify_scene` disagrees with :func:`category_scene`, else 0.0.
    """
    img = _as_float_image(image)
    keep = _background_weights(img.shape[:2], product_mask, dilate=2)
    n = max(int(keep.sum()), 1)
    out = {"plain_white": _smoothstep(_plain_white_fraction(img, keep), 0.45, 0.75)}
    out["watermark"] = _smoothstep(_text_edge_density(img, keep), 0.55, 1.2)
    mx, mn = img.max(axis=-1), img.min(axis=-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    vivid = (sat > 0.7) & (mx > 0.4) & keep
    # Clutter is many vivid objects of many hues; a product (when no mask hides it) has one or two.
    hue_bins = np.bincount((_hue(img[vivid]) * 12).astype(np.int64) % 12, minlength=12)
    distinct_hues = int((hue_bins >= max(3, 0.002 * n)).sum())
    out["clutter"] = _smoothstep(float(vivid.sum()) / n, 0.015, 0.05) * _smoothstep(distinct_hues, 2.0, 4.0)
    if category is not None:
        out["wrong_scene"] = float(classify_scene(img, product_mask) != category_scene(category))
    return out
