"""``ppm micro reconstruct``: outputs, metadata, metrics and every bad-input path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ppm_core.cli import main
from ppm_core.priors import DiffusionPrior, UNetConfig
from ppm_napari import metrics
from ppm_napari.cli import DEFAULT_PRIOR
from ppm_napari.io import read_result
from ppm_napari.psf import airy_psf
from ppm_napari.superres import super_resolve

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "biosr_mt"
WF09 = DATA / "MT_Cell001_crop007_rawSIM_level09.tif"
GT = DATA / "MT_Cell001_crop007_SIM_GT.tif"
OTF = DATA / "TIRF488_cam1_0_z30_OTF2d.mrc"

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture()
def widefield(tmp_path) -> Path:
    """A 24x20 crop of the real level-09 stack (odd-free but non-square), mean of 9 frames inside."""
    stack = tifffile.imread(WF09)[:, 40:64, 30:50]
    path = tmp_path / "wf.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    return path


def _run(*args) -> int:
    return main([str(a) for a in args])


def test_richardson_lucy_on_the_real_pair_writes_metrics(tmp_path):
    out, scores = tmp_path / "rl.ome.tif", tmp_path / "m.json"
    code = _run("micro", "reconstruct", WF09, "--pixel-size", 62.6, "--otf", OTF, "--method", "richardson-lucy",
                "--out", out, "--truth", GT, "--metrics-json", scores)
    assert code == 0
    result = read_result(out)
    assert result["mean"].shape == (256, 256)
    assert result["samples"].shape == (1, 256, 256)
    assert result["pixel_size_nm"] == pytest.approx(31.3)
    assert result["parameters"]["psf"]["kind"] == "otf"
    assert result["parameters"]["frames_averaged"] == 9
    values = json.loads(scores.read_text())
    truth = np.squeeze(tifffile.imread(GT)).astype(float)
    # The JSON agrees with the metrics recomputed from the written file.
    assert values["psnr_fitted"] == pytest.approx(metrics.psnr(result["mean"], truth, "fitted"), abs=1e-3)
    assert values["coverage_90"] is None
    # Deconvolution sharpens: min-max PSNR above bicubic upsampling of the same widefield image.
    wf = tifffile.imread(WF09).astype(float).mean(0)
    bicubic = super_resolve(wf, airy_psf(1.3, 525, 31.3), None, method="bicubic").mean
    assert values["psnr_minmax"] > metrics.psnr(bicubic, truth, "minmax")


def test_posterior_run_writes_samples_std_and_parameters(tmp_path, widefield, tiny_prior):
    out = tmp_path / "r.ome.tif"
    code = _run("micro", "reconstruct", widefield, "--pixel-size", 62.6, "--na", 1.3, "--wavelength", 525,
                "--method", "red-diff", "--samples", 3, "--steps", 3, "--prior", tiny_prior, "--out", out)
    assert code == 0
    result = read_result(out)
    assert result["samples"].shape == (3, 48, 40)
    np.testing.assert_allclose(result["mean"], result["samples"].mean(0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(result["std"], result["samples"].std(0, ddof=1), rtol=1e-4, atol=1e-3)
    p = result["parameters"]
    assert p["method"] == "red-diff"
    assert p["steps"] == 3
    assert p["n_samples"] == 3
    assert p["scale"] == 2
    assert p["psf"] == {"kind": "airy", "na": 1.3, "wavelength_nm": 525.0}
    assert p["input_pixel_size_nm"] == 62.6
    assert p["pixel_size_nm"] == pytest.approx(31.3)
    assert p["peak_memory_mb"] > 0


def test_tiles_cover_the_image(tmp_path, widefield, tiny_prior):
    out = tmp_path / "t.ome.tif"
    code = _run("micro", "reconstruct", widefield, "--pixel-size", 62.6, "--gaussian-fwhm", 200, "--method", "red-diff",
                "--samples", 2, "--steps", 2, "--prior", tiny_prior, "--tile-size", 16, "--tile-overlap", 6, "--out", out)
    assert code == 0
    result = read_result(out)
    assert result["parameters"]["tiles"] == 4
    assert result["mean"].shape == (48, 40)
    assert np.all(np.isfinite(result["samples"]))


def test_pixel_size_from_metadata(tmp_path, tiny_prior):
    stack = tifffile.imread(WF09)[:, :20, :20]
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / 0.0626, 1 / 0.0626), metadata={"unit": "um", "axes": "ZYX"})
    out = tmp_path / "r.ome.tif"
    assert _run("micro", "reconstruct", path, "--na", 1.3, "--wavelength", 525, "--method", "bicubic", "--out", out) == 0
    assert read_result(out)["pixel_size_nm"] == pytest.approx(31.3)


def _bad_tiff(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.tif"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"II*\x00" + b"\x00" * 20)
    elif kind == "nan":
        image = np.ones((32, 32), np.float32)
        image[5, 5] = np.nan
        tifffile.imwrite(path, image)
    elif kind == "constant":
        tifffile.imwrite(path, np.ones((32, 32), np.float32))
    elif kind == "tiny":
        tifffile.imwrite(path, np.random.default_rng(0).random((4, 4)).astype(np.float32))
    return path


@pytest.mark.parametrize(
    "kind, message",
    [("empty", "empty"), ("corrupt", "corrupt.tif"), ("nan", "NaN"), ("constant", "constant"), ("tiny", "at least 8x8")],
)
def test_bad_widefield_files(tmp_path, caplog, kind, message):
    out = tmp_path / "r.ome.tif"
    code = _run("micro", "reconstruct", _bad_tiff(tmp_path, kind), "--pixel-size", 62.6, "--na", 1.3, "--wavelength", 525,
                "--method", "bicubic", "--out", out)
    assert code == 2
    assert message in caplog.text
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give exactly one PSF source"),
        (["--na", 1.3, "--otf", OTF], "give exactly one PSF source"),
        (["--na", 1.3], "needs both --na and --wavelength"),
        (["--na", 3, "--wavelength", 525], "na must be at most 1.7"),
        (["--otf", "missing.mrc"], "OTF file not found"),
        (["--gaussian-fwhm", -5], "--gaussian-fwhm must be a positive width in nm"),
        (["--na", 1.3, "--wavelength", 525, "--noise", "gaussian"], "--noise gaussian needs a positive --noise-std"),
        (["--na", 1.3, "--wavelength", 525, "--noise", "poisson-gaussian"], "needs a positive --gain"),
        (["--na", 1.3, "--wavelength", 525, "--metrics-json", "m.json"], "--metrics-json needs --truth"),
        (["--na", 1.3, "--wavelength", 525, "--truth", GT], "expected (48, 40)"),
        (["--na", 1.3, "--wavelength", 525, "--scale", 0], "--scale must be a positive integer"),
    ],
)
def test_bad_options(tmp_path, widefield, caplog, extra, message):
    out = tmp_path / "r.ome.tif"
    code = _run("micro", "reconstruct", widefield, "--pixel-size", 62.6, "--method", "bicubic", "--out", out, *extra)
    assert code == 2
    assert message in caplog.text
    assert not out.exists()


def test_missing_pixel_size_and_bad_output_name(tmp_path, widefield, caplog):
    assert _run("micro", "reconstruct", widefield, "--na", 1.3, "--wavelength", 525, "--method", "bicubic", "--out", tmp_path / "r.ome.tif") == 2
    assert "pass --pixel-size" in caplog.text
    assert _run("micro", "reconstruct", widefield, "--pixel-size", 62.6, "--na", 1.3, "--wavelength", 525, "--out", tmp_path / "r.tif") == 2
    assert "--out must end in .ome.tif" in caplog.text


def test_measured_psf_needs_its_pixel_size(tmp_path, widefield, caplog):
    bead = tmp_path / "bead.tif"
    tifffile.imwrite(bead, (airy_psf(1.3, 525, 20.0, size=41) * 1e4).astype(np.float32))
    out = tmp_path / "r.ome.tif"
    assert _run("micro", "reconstruct", widefield, "--pixel-size", 62.6, "--psf", bead, "--method", "bicubic", "--out", out) == 2
    assert "pass --psf-pixel-size" in caplog.text
    assert _run("micro", "reconstruct", widefield, "--pixel-size", 62.6, "--psf", bead, "--psf-pixel-size", 20,
                "--method", "bicubic", "--out", out) == 0
    assert read_result(out)["parameters"]["psf"]["kind"] == "measured"


def test_prior_that_does_not_fit_the_image(tmp_path, widefield, caplog):
    config = UNetConfig(in_channels=3, base_channels=8, channel_mults=[1], blocks_per_level=1, embedding_dim=16)
    rgb = tmp_path / "rgb"
    DiffusionPrior(config, sigma_data=0.5).save(rgb)
    code = _run("micro", "reconstruct", widefield, "--pixel-size", 62.6, "--na", 1.3, "--wavelength", 525,
                "--method", "red-diff", "--steps", 1, "--prior", rgb, "--out", tmp_path / "r.ome.tif")
    assert code == 2
    assert "3 channels" in caplog.text


def test_shipped_prior_loads_and_describes_itself():
    from ppm_core.priors.network import read_config

    config = read_config(DEFAULT_PRIOR)
    assert config["training_data"]["generator"] == "filaments"
    assert config["normalization"] == {"method": "percentile", "low": 0.1, "high": 99.9}
    size = sum(p.stat().st_size for p in DEFAULT_PRIOR.iterdir())
    assert size < 30e6


def test_given_camera_noise_is_divided_by_frames(tmp_path, widefield, tiny_prior):
    out = tmp_path / "r.ome.tif"
    code = _run("micro", "reconstruct", widefield, "--pixel-size", 62.6, "--na", 1.3, "--wavelength", 525, "--method", "red-diff",
                "--steps", 1, "--samples", 2, "--prior", tiny_prior, "--noise", "poisson-gaussian", "--gain", 2.0,
                "--offset", 100, "--read-noise", 3.0, "--out", out)
    assert code == 0
    noise = read_result(out)["parameters"]["noise"]
    # The input stack has 9 frames; the mean of 9 frames has 1/9 of one frame's variance.
    assert noise["slope"] == pytest.approx(2.0 / 9)
    assert noise["intercept"] == pytest.approx((3.0**2 - 2.0 * 100) / 9)


def test_outputs_never_overwrite_inputs(tmp_path, widefield, caplog):
    common = ["--pixel-size", 62.6, "--na", 1.3, "--wavelength", 525, "--method", "bicubic"]
    out = tmp_path / "r.ome.tif"
    before = widefield.read_bytes()
    assert _run("micro", "reconstruct", widefield, *common, "--out", out, "--truth", GT, "--metrics-json", out) == 2
    assert "--metrics-json and --out are the same file" in caplog.text
    assert _run("micro", "reconstruct", widefield, *common, "--out", widefield.with_suffix(".ome.tif")) == 0
    same = tmp_path / "in.ome.tif"
    same.write_bytes(before)
    assert _run("micro", "reconstruct", same, *common, "--out", same) == 2
    assert same.read_bytes() == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pixel-size", 0.0626, "--na", 1.3, "--wavelength", 525], "between 1 and 100000"),
        (["--pixel-size", 62.6, "--gaussian-fwhm", 1e6], "check that the pixel size, wavelength and FWHM are all in nm"),
        (["--pixel-size", 62.6, "--na", 1.3, "--wavelength", 525, "--frames-averaged", 0], "--frames-averaged must be >= 1"),
    ],
)
def test_unit_mistakes_are_reported(tmp_path, widefield, caplog, extra, message):
    assert _run("micro", "reconstruct", widefield, "--method", "bicubic", "--out", tmp_path / "r.ome.tif", *extra) == 2
    assert message in caplog.text


def test_rgb_channels_and_anisotropic_inputs_are_rejected(tmp_path, caplog):
    rng = np.random.default_rng(0)
    common = ["--pixel-size", 62.6, "--na", 1.3, "--wavelength", 525, "--method", "bicubic", "--out", tmp_path / "r.ome.tif"]
    tifffile.imwrite(tmp_path / "rgb.tif", (rng.random((32, 32, 3)) * 255).astype(np.uint8), photometric="rgb")
    assert _run("micro", "reconstruct", tmp_path / "rgb.tif", *common) == 2
    assert "colour (RGB)" in caplog.text
    tifffile.imwrite(tmp_path / "cyx.ome.tif", rng.random((3, 32, 32)).astype(np.float32), ome=True, metadata={"axes": "CYX"})
    assert _run("micro", "reconstruct", tmp_path / "cyx.ome.tif", *common) == 2
    assert "has 3 channels" in caplog.text
    tifffile.imwrite(tmp_path / "aniso.ome.tif", rng.random((32, 32)).astype(np.float32), ome=True,
                     metadata={"PhysicalSizeX": 62.6, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 100.0, "PhysicalSizeYUnit": "nm"})
    assert _run("micro", "reconstruct", tmp_path / "aniso.ome.tif", *common[2:]) == 2
    assert "non-square pixels" in caplog.text


def test_read_result_rejects_other_ome_files(tmp_path):
    tifffile.imwrite(tmp_path / "plain.ome.tif", np.ones((32, 32), np.float32), ome=True)
    with pytest.raises(ValueError, match="is not a PPM result"):
        read_result(tmp_path / "plain.ome.tif")
