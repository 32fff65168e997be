"""The ``product2img generate`` command, run in-process and as a real console script."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_product2img.cli import main
from diffusers_product2img.placement import place_cutout

GEN = ["--steps", "2", "--size", "64x64", "--quiet", "--device", "cpu"]


@pytest.fixture()
def cutout_png(tmp_path):
    rgba = Image.new("RGBA", (40, 60), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (30, 50), (200, 40, 40, 255)), (5, 5))
    path = tmp_path / "mug.png"
    rgba.save(path)
    return path


def test_generate_single_product(tiny_pipeline_dir, cutout_png, tmp_path):
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_pipeline_dir), "--image", str(cutout_png),
                 "--name", "Ceramic Coffee Mug 350ml Matte Black", "--out", str(out), "--num-images", "2", *GEN])
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["mug_0.png", "mug_1.png"]
    a, b = (np.asarray(Image.open(out / f)) for f in files)
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)


def test_generate_batch_csv_and_jsonl(tiny_pipeline_dir, cutout_png, tmp_path):
    canvas, mask = place_cutout(Image.open(cutout_png), (64, 64))
    canvas.save(tmp_path / "shoe.jpg")
    mask.save(tmp_path / "shoe_mask.png")
    (tmp_path / "rows.csv").write_text(
        "image,name,mask,id\nmug.png,Matte Black Mug,,m1\nshoe.jpg,Running Shoes Men,shoe_mask.png,s1\n"
    )
    code = main(["generate", "--model", str(tiny_pipeline_dir), "--batch", str(tmp_path / "rows.csv"),
                 "--out", str(tmp_path / "csv_out"), *GEN])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "csv_out").iterdir()) == ["m1_0.png", "s1_0.png"]
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "mug.png", "name": "Matte Black Mug"}) + "\n")
    assert main(["generate", "--model", str(tiny_pipeline_dir), "--batch", str(tmp_path / "rows.jsonl"),
                 "--out", str(tmp_path / "jsonl_out"), *GEN]) == 0
    assert [p.name for p in (tmp_path / "jsonl_out").iterdir()] == ["mug_0.png"]


@pytest.mark.parametrize(
    "case,expected",
    [
        ("corrupt", "is not a readable image"),
        ("missing", "image not found"),
        ("no_alpha", "no alpha channel"),
        ("empty_name", "non-empty 'name'"),
        ("no_model", "cannot load a Product2Img model"),
    ],
)
def test_generate_errors_are_one_line(tiny_pipeline_dir, cutout_png, tmp_path, capsys, case, expected):
    model, image, rows = str(tiny_pipeline_dir), str(cutout_png), None
    if case == "corrupt":
        (tmp_path / "bad.png").write_bytes(b"this is not a png")
        image = str(tmp_path / "bad.png")
    elif case == "missing":
        image = str(tmp_path / "nope.png")
    elif case == "no_alpha":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "rgb.png")
        image = str(tmp_path / "rgb.png")
    elif case == "empty_name":
        rows = tmp_path / "rows.csv"
        rows.write_text("image,name\nmug.png,  \n")
    elif case == "no_model":
        model = str(tmp_path / "no-such-model")
    source = ["--batch", str(rows)] if rows else ["--image", image, "--name", "Mug"]
    out = tmp_path / "out"
    code = main(["generate", "--model", model, *source, "--out", str(out), *GEN])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_console_script_bad_size_is_usage_error(tiny_pipeline_dir, cutout_png):
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_product2img.cli", "generate", "--model", str(tiny_pipeline_dir),
         "--image", str(cutout_png), "--name", "Mug", "--size", "60x64"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "multiples of 8" in proc.stderr and "Traceback" not in proc.stderr
