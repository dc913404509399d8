"""The ``ppm`` command line, image reading and atomic writes."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppm_core.cli import main
from ppm_core.io import atomic_path, read_image, save_png
from ppm_core.priors import load_prior

TINY_TRAIN_ARGS = ["--steps", "3", "--batch-size", "4", "--crop-size", "16", "--base-channels", "8", "--channel-mults", "1,2", "--blocks-per-level", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "prior"
    assert main(["train-prior", "--synthetic", "blobs", "--out", str(out), *TINY_TRAIN_ARGS]) == 0
    return out


# ------------------------------------------------------------------------------------------------
# ppm train-prior and ppm sample-prior


def test_train_prior_writes_loadable_prior(prior_dir):
    prior = load_prior(prior_dir)
    assert prior.unet_config.base_channels == 8
    assert prior.unet_config.channel_mults == [1, 2]
    config = json.loads((prior_dir / "config.json").read_text())
    assert config["trained_steps"] == 3
    assert config["training_data"]["generator"] == "blobs"
    assert config["training"]["world_size"] == 1


def test_sample_prior_writes_grid(prior_dir, tmp_path):
    png = tmp_path / "grid.png"
    tiff = tmp_path / "samples.tif"
    args = ["sample-prior", str(prior_dir), "--n", "4", "--size", "24", "--steps", "4", "--out", str(png), "--tiff", str(tiff)]
    assert main(args) == 0

    # Four samples tile a 2x2 grid of 24-pixel images with 2-pixel gaps: 2 * 24 + 2 = 50.
    with Image.open(png) as image:
        assert image.size == (50, 50)
        assert image.mode == "L"
    import tifffile

    stack = tifffile.imread(tiff)
    assert stack.shape == (4, 1, 24, 24)
    assert stack.dtype == np.float32
    assert np.isfinite(stack).all()


def test_sample_prior_seed_reproducible(prior_dir, tmp_path):
    paths = [tmp_path / "first.tif", tmp_path / "second.tif"]
    for path in paths:
        assert main(["sample-prior", str(prior_dir), "--n", "2", "--size", "8", "--steps", "3", "--seed", "5", "--out", str(path.with_suffix(".png")), "--tiff", str(path)]) == 0
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(paths[0]), tifffile.imread(paths[1]))


USER_ERRORS = [
    ("missing data folder", ["train-prior", "--data", "{tmp}/absent", "--out", "{tmp}/p", *TINY_TRAIN_ARGS], r"training folder not found: {tmp}/absent"),
    ("missing prior folder", ["sample-prior", "{tmp}/absent", "--out", "{tmp}/grid.png"], r"prior folder not found: {tmp}/absent"),
    ("zero samples", ["sample-prior", "{tmp}", "--n", "0", "--out", "{tmp}/grid.png"], r"--n must be >= 1; got 0"),
    ("percentiles reversed", ["train-prior", "--data", "{tmp}", "--percentiles", "90", "10", "--out", "{tmp}/p"], r"--percentiles must satisfy 0 <= LOW < HIGH <= 100"),
]


@pytest.mark.parametrize("argv, message", [case[1:] for case in USER_ERRORS], ids=[case[0] for case in USER_ERRORS])
def test_user_error_exits_2(tmp_path, caplog, argv, message):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    with caplog.at_level(logging.ERROR, logger="ppm"):
        assert main(argv) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert re.search(message.format(tmp=re.escape(str(tmp_path))), errors[0]), errors[0]


def test_invalid_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["train-prior", "--synthetic", "blobs"])
    assert excinfo.value.code == 2
    assert "--out" in capsys.readouterr().err

    with pytest.raises(SystemExit) as excinfo:
        main(["train-prior", "--synthetic", "nope", "--out", str(tmp_path)])
    assert excinfo.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as excinfo:
        main(["train-prior", "--synthetic", "blobs", "--out", str(tmp_path), "--channel-mults", "1,x"])
    assert excinfo.value.code == 2
    assert "--channel-mults must be comma-separated integers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# read_image


def test_read_image_formats(tmp_path):
    import tifffile
    from astropy.io import fits

    data = np.arange(12 * 10, dtype=np.float32).reshape(12, 10)
    tifffile.imwrite(tmp_path / "image.tif", data[None])
    fits.PrimaryHDU(data.astype(np.float64)).writeto(tmp_path / "image.fits")
    Image.fromarray(data.astype(np.uint8)).save(tmp_path / "gray.png")
    rgb = np.stack([data, data + 1, data + 2], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "color.png")

    # A singleton leading axis is dropped; every format comes back as float32.
    for name in ("image.tif", "image.fits", "gray.png"):
        image = read_image(tmp_path / name)
        assert image.dtype == np.float32, name
        np.testing.assert_array_equal(image, data, err_msg=name)
    color = read_image(tmp_path / "color.png")
    assert color.shape == (3, 12, 10)
    np.testing.assert_array_equal(color[2], data + 2)


def _nan_tiff(path: Path) -> None:
    import tifffile

    data = np.ones((8, 8), dtype=np.float32)
    data[2, 3] = np.inf
    tifffile.imwrite(path, data)


def _truncated_tiff(path: Path) -> None:
    import tifffile

    tifffile.imwrite(path, np.ones((32, 32), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:600])


def _table_only_fits(path: Path) -> None:
    from astropy.io import fits

    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=np.ones(3))])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)


BAD_IMAGES = [
    ("empty", "image.tif", lambda path: path.write_bytes(b""), r"image file is empty"),
    ("infinite TIFF", "image.tif", _nan_tiff, r"contains NaN or infinite values"),
    ("truncated TIFF", "image.tif", _truncated_tiff, r"cannot read image"),
    ("text as PNG", "image.png", lambda path: path.write_text("not a png"), r"cannot read image"),
    ("garbage FITS", "image.fits", lambda path: path.write_bytes(bytes(range(256)) * 12), r"cannot read image"),
    ("FITS without image", "image.fits", _table_only_fits, r"FITS file has no image HDU"),
    ("1-D TIFF", "image.tif", lambda path: __import__("tifffile").imwrite(path, np.ones(5, dtype=np.float32)), r"must be 2-D \(H, W\) or 3-D"),
    ("unknown suffix", "image.bmp", lambda path: path.write_bytes(b"BM" + bytes(64)), r"unsupported image suffix '.bmp'"),
]


@pytest.mark.parametrize("name, write, match", [case[1:] for case in BAD_IMAGES], ids=[case[0] for case in BAD_IMAGES])
def test_read_image_invalid_raises(tmp_path, name, write, match):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=match) as excinfo:
        read_image(path)
    assert str(path) in str(excinfo.value)


def test_read_image_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.tif"))):
        read_image(tmp_path / "absent.tif")


# ------------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_path_keeps_file_on_error(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("original")

    with pytest.raises(RuntimeError, match="write failed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("write failed")

    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"], "the temporary file was left behind"


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "result.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["result.txt"]

    # The file gets the permissions open() would give it, not mkstemp's 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_png_round_trip(tmp_path):
    image = np.linspace(0, 1, 6 * 5).reshape(6, 5)
    path = save_png(tmp_path / "image.png", image)
    with Image.open(path) as png:
        values = np.asarray(png)
    np.testing.assert_array_equal(values, (image * 255 + 0.5).astype(np.uint8))



def test_train_prior_keeps_existing_prior(prior_dir, caplog):
    before = (prior_dir / "model.safetensors").read_bytes()
    with caplog.at_level(logging.ERROR, logger="ppm"):
        assert main(["train-prior", "--synthetic", "blobs", "--out", str(prior_dir), *TINY_TRAIN_ARGS]) == 2
    assert "already contains a prior; pass --resume" in caplog.text
    assert (prior_dir / "model.safetensors").read_bytes() == before


def test_output_paths_checked_before_work(prior_dir, tmp_path, caplog):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.ERROR, logger="ppm"):
        assert main(["train-prior", "--synthetic", "blobs", "--out", str(blocker / "sub"), *TINY_TRAIN_ARGS]) == 2
        assert main(["sample-prior", str(prior_dir), "--n", "1", "--size", "8", "--steps", "2", "--out", str(tmp_path / "g.png"), "--tiff", str(blocker / "x.tif")]) == 2
    assert f"{blocker} is not a writable folder" in caplog.text
    assert not (tmp_path / "g.png").exists()


def test_prior_files_readable_by_others(prior_dir):
    # Files are written through a 0600 temporary file and must end with the umask's permissions.
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (prior_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_sample_prior_requires_png(prior_dir, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="ppm"):
        assert main(["sample-prior", str(prior_dir), "--n", "1", "--size", "8", "--steps", "2", "--out", str(tmp_path / "grid.jpg")]) == 2
    assert "--out must be a .png file" in caplog.text
