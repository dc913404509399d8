"""Amortized microscopy and VLBI: training on stacks and coverages, one-pass reconstruction, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from ppm_core.cli import main
from ppm_napari.amortized import apply_to_frames, load_model, stack_tiles, train_on_stack
from ppm_napari.io import read_result
from ppm_napari.psf import gaussian_psf

ROOT = Path(__file__).resolve().parents[1]
WF09 = ROOT / "sample_data" / "biosr_mt" / "MT_Cell001_crop007_rawSIM_level09.tif"
M87 = ROOT / "sample_data" / "eht" / "SR1_M87_2017_101_hi_hops_netcal_StokesI.uvfits"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture()
def stack(tmp_path) -> Path:
    """Three 40x36 crops of real level-09 raw SIM frames, as a small time series."""
    frames = tifffile.imread(WF09)[:3, 40:80, 30:66]
    path = tmp_path / "frames.tif"
    tifffile.imwrite(path, frames, photometric="minisblack")
    return path


def test_stack_tiles_cover_every_frame():
    frames = np.arange(2 * 40 * 36, dtype=float).reshape(2, 40, 36)
    tiles = stack_tiles(frames, 16, 8)
    # Row starts 0, 8, 16, 24 and column starts 0, 7, 13, 20 (evenly spread, overlap >= 8): 16 tiles per frame.
    assert tiles.shape == (32, 16, 16)
    np.testing.assert_array_equal(tiles[1], frames[0, :16, 7:23])
    np.testing.assert_array_equal(tiles[-1], frames[1, 24:40, 20:36])
    with pytest.raises(ValueError, match="must not exceed the frames' smaller side"):
        stack_tiles(frames, 48, 8)


def test_train_and_apply_keep_units_and_shapes(stack, tiny_prior, tmp_path):
    from ppm_core.priors import load_prior
    from ppm_core.training.amortized import AmortizedConfig

    frames = tifffile.imread(stack).astype(np.float64)
    prior = load_prior(tiny_prior)
    model = train_on_stack(frames, gaussian_psf(2.5), prior, tmp_path / "model", scale=2, tile_size=16, tile_overlap=8,
                           config=AmortizedConfig(steps=2, batch_size=4))
    info = model.config["description"]
    assert info["tiles"] == 3 * 16
    loaded = load_model(tmp_path / "model")
    results = apply_to_frames(loaded, frames, n_samples=3, seed=0)
    assert len(results) == 3
    assert results[0].samples.shape == (3, 80, 72)
    assert results[0].mean.shape == results[0].std.shape == (80, 72)
    assert all(np.isfinite(r.samples).all() for r in results)

    # One tile per frame: the result is the generator's output mapped back to camera units.
    offset, unit = info["normalization"]["offset"], info["normalization"]["scale"]
    crop = frames[:, 5:21, 7:23]
    (single,) = apply_to_frames(loaded, crop[:1], n_samples=4, seed=3)
    y = torch.as_tensor((crop[0] - offset) / unit)[None, None]
    expected = loaded.sample_many(y, 4, seed=3)[0, :, 0].double().numpy() * unit + offset
    np.testing.assert_allclose(single.samples, expected, rtol=1e-6, atol=1e-6 * abs(unit))
    np.testing.assert_allclose(single.std, expected.std(0, ddof=1), rtol=1e-5, atol=1e-6 * abs(unit))

    bad = frames.copy()
    bad[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="frame 1: widefield contains NaN"):
        apply_to_frames(loaded, bad)
    with pytest.raises(ValueError, match="tiles of 16x16 camera pixels"):
        apply_to_frames(loaded, frames[:, :12, :12])


def test_cli_train_then_reconstruct_each_frame(stack, tiny_prior, tmp_path):
    model = tmp_path / "model"
    code = _run("train-amortized", "micro", stack, "--pixel-size", 62.6, "--gaussian-fwhm", 250, "--prior", tiny_prior,
                "--tile-size", 16, "--tile-overlap", 8, "--steps", 2, "--batch-size", 4, "--out", model)
    assert code == 0
    assert _run("train-amortized", "micro", stack, "--pixel-size", 62.6, "--gaussian-fwhm", 250, "--prior", tiny_prior,
                "--tile-size", 16, "--steps", 2, "--out", model) == 2  # rejected: the folder has a model and --resume is not given
    out = tmp_path / "series.ome.tif"
    assert _run("micro", "reconstruct", stack, "--pixel-size", 62.6, "--amortized", model, "--each-frame", "--samples", 3, "--out", out) == 0
    result = read_result(out)
    assert result["mean"].shape == (3, 80, 72)
    assert result["samples"].shape == (3, 3, 80, 72)
    assert result["pixel_size_nm"] == pytest.approx(31.3)
    assert result["parameters"]["method"] == "ppm-amortized"
    assert result["parameters"]["frames"] == 3
    # The napari reader gives the time series layers with a leading time axis.
    from ppm_napari._reader import get_reader

    layers = get_reader(str(out))(str(out))
    assert [meta["metadata"]["ppm_role"] for _, meta, _ in layers] == ["mean", "std", "samples"]
    assert layers[0][1]["scale"] == pytest.approx((1.0, 0.0313, 0.0313))
    assert layers[2][1]["scale"] == pytest.approx((1.0, 1.0, 0.0313, 0.0313))
    single = tmp_path / "single.ome.tif"
    assert _run("micro", "reconstruct", stack, "--pixel-size", 62.6, "--amortized", model, "--samples", 2, "--out", single) == 0
    assert read_result(single)["samples"].shape == (2, 80, 72)
    # A pixel size other than the training one, --each-frame without a model, a prior folder as model.
    assert _run("micro", "reconstruct", stack, "--pixel-size", 80, "--amortized", model, "--out", single) == 2
    assert _run("micro", "reconstruct", stack, "--pixel-size", 62.6, "--gaussian-fwhm", 250, "--each-frame", "--out", single) == 2
    assert _run("micro", "reconstruct", stack, "--pixel-size", 62.6, "--amortized", tiny_prior, "--out", single) == 2


# ---------------------------------------------------------------------------------------------
# VLBI


@pytest.fixture(scope="module")
def closure_problem_m87():
    pytest.importorskip("ehtim", reason="ehtim is not installed (pip install -e '.[eht]')")
    from ppm_core.priors import load_prior
    from ppm_eht.data import load_uvfits
    from ppm_eht.reconstruct import DEFAULT_PRIOR, closure_problem

    return closure_problem(load_uvfits(M87), load_prior(DEFAULT_PRIOR), 64, 160.0)


def test_closure_likelihood_of_given_measurements(closure_problem_m87):
    """``nll(x, y)`` compares x with the closures in y: zero for y = A(x), the data's own value for y = the data."""
    from ppm_eht.amortized import synthetic_observations

    operator = closure_problem_m87.operator
    truths, ys = synthetic_observations(closure_problem_m87, 3, seed=5)
    with torch.no_grad():
        exact = operator.A(truths)
        assert float(operator.nll(truths, exact).abs().max()) < 1e-9
        torch.testing.assert_close(operator.nll(truths, operator.measurement()), operator.nll(truths))
        # With noise of the data's sigmas, each reduced chi-square is about 1 (2 terms, ~140 products each).
        nll = operator.nll(truths, ys)
        n_products = ys.shape[-1]
        assert float((2 * nll / n_products).mean()) == pytest.approx(1.0, abs=0.3)
    with pytest.raises(ValueError, match="y must have shape"):
        operator.nll(truths, ys[:2])


def test_gradient_embedding_has_unit_rms(closure_problem_m87):
    """Closure data have no adjoint: b(y) is the likelihood's gradient at a compact source, scaled to unit RMS."""
    from ppm_core.inference.amortized import MeasurementEmbedding
    from ppm_eht.amortized import compact_source, synthetic_observations

    operator = closure_problem_m87.operator
    _, ys = synthetic_observations(closure_problem_m87, 6, seed=4)
    reference = compact_source(closure_problem_m87).double()
    embedding = MeasurementEmbedding.fit(operator, ys, reference=reference)
    assert embedding.kind == "likelihood-gradient"
    torch.testing.assert_close(embedding.reference, reference)
    b = embedding(ys)
    assert float(b.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-9)
    # Different closures give different views.
    assert float((b[0] - b[1]).abs().max()) > 0


def test_cli_train_then_reconstruct_eht(tmp_path):
    pytest.importorskip("ehtim", reason="ehtim is not installed (pip install -e '.[eht]')")
    from ppm_eht.io import read_posterior_fits

    model = tmp_path / "model"
    assert _run("train-amortized", "eht", M87, "--observations", 8, "--steps", 2, "--batch-size", 4, "--out", model) == 0
    config = json.loads((model / "config.json").read_text())
    assert config["description"]["task"] == "vlbi closure imaging"
    out, summary = tmp_path / "post.fits", tmp_path / "s.json"
    assert _run("eht", "reconstruct", M87, "--amortized", model, "--samples", 4, "--out", out, "--summary-json", summary) == 0
    posterior = read_posterior_fits(out)
    assert len(posterior["samples"]) == 4
    assert json.loads(summary.read_text())["parameters"]["method"] == "ppm-amortized"
    # A model for another coverage is rejected: other closure counts, or other (u, v) points.
    from ppm_eht.amortized import model_problem
    from ppm_eht.data import load_uvfits

    edited = json.loads(json.dumps(config))
    edited["description"]["coverage"]["sha256"] = "0" * 64
    (model / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"\(u, v\) points or closure sets differ"):
        model_problem(model, load_uvfits(M87))
    config["description"]["n_cphase"] += 1
    (model / "config.json").write_text(json.dumps(config))
    assert _run("eht", "reconstruct", M87, "--amortized", model, "--out", out) == 2
