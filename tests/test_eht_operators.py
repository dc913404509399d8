"""VLBI data products and operators against ehtim's own chi-squares, on real EHT uvfits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ehtim", reason="ehtim is not installed (pip install -e '.[eht]')")

from ppm_eht.data import closure_data, estimate_total_flux, import_ehtim, load_uvfits, preprocess, quiet  # noqa: E402
from ppm_eht.operators import ClosureOperator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
M87 = ROOT / "sample_data" / "eht" / "SR1_M87_2017_101_hi_hops_netcal_StokesI.uvfits"
MODEL = ROOT / "sample_data" / "eht" / "avery_sgra_eofn.txt"
SHARED_EHT = ROOT.parent / "shared" / "data" / "eht"
OTHER_DAYS = sorted(SHARED_EHT.glob("SR1_M87_2017_09*_StokesI.uvfits")) if SHARED_EHT.is_dir() else []


@pytest.fixture(scope="module")
def observation():
    return preprocess(load_uvfits(M87))


def _model_image(obs, data):
    eh = import_ehtim()
    image = quiet(eh.image.load_txt, str(MODEL))
    image.ra, image.dec, image.rf, image.mjd = obs.ra, obs.dec, obs.rf, obs.mjd
    image = quiet(image.regrid_image, data.template.fovx(), data.npix)
    image.imvec *= 0.6 / image.total_flux()
    return image


@pytest.mark.parametrize("dtype", ["vis", "amp", "cphase", "logcamp"])
def test_chisq_equals_ehtim(observation, dtype):
    data = closure_data(observation, 32, 160.0, total_flux=0.6)
    image = _model_image(observation, data)
    op = ClosureOperator(data).double()
    x = torch.from_numpy(image.imvec.reshape(1, 1, 32, 32))
    ours = float(op.chisq(x, dtype))
    reference = quiet(observation.chisq, image, dtype=dtype, ttype="direct")
    assert ours == pytest.approx(reference, rel=1e-6)


@pytest.mark.skipif(not OTHER_DAYS, reason=f"other M87 days not found under {SHARED_EHT}")
@pytest.mark.parametrize("path", OTHER_DAYS, ids=lambda p: p.name[:18])
def test_closure_chisq_on_other_days(path):
    obs = preprocess(load_uvfits(path))
    data = closure_data(obs, 32, 160.0, total_flux=0.6)
    image = _model_image(obs, data)
    op = ClosureOperator(data).double()
    x = torch.from_numpy(image.imvec.reshape(1, 1, 32, 32))
    for dtype in ("cphase", "logcamp"):
        assert float(op.chisq(x, dtype)) == pytest.approx(quiet(obs.chisq, image, dtype=dtype, ttype="direct"), rel=1e-6)


def test_nll_gradient_matches_finite_differences(observation):
    data = closure_data(observation, 16, 160.0, total_flux=0.6)
    op = ClosureOperator(data).double()
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 1, 16, 16, generator=generator, dtype=torch.float64) * 0.01).requires_grad_(True)
    (grad,) = torch.autograd.grad(op.nll(x).sum(), x)
    direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    h = 1e-7
    numeric = (op.nll(x + h * direction) - op.nll(x - h * direction)) / (2 * h)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-5)


def test_total_flux_from_short_baselines():
    obs = load_uvfits(M87)
    flux = estimate_total_flux(obs)
    amps = obs.unpack(["uvdist", "amp"])
    expected = np.median(amps["amp"][amps["uvdist"] < 0.1e9])
    assert flux == pytest.approx(expected)
    assert 0.3 < flux < 2.0  # M87 at 230 GHz: about 1 Jy on the intra-site baselines


def test_bad_uvfits_files(tmp_path):
    empty = tmp_path / "empty.uvfits"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_uvfits(empty)
    corrupt = tmp_path / "corrupt.uvfits"
    corrupt.write_bytes(b"SIMPLE  = T" + b" " * 100)
    with pytest.raises(ValueError, match="cannot read"):
        load_uvfits(corrupt)


def test_field_of_view_smaller_than_beam(observation):
    with pytest.raises(ValueError, match="smaller than the nominal beam"):
        closure_data(observation, 16, 10.0)


def test_no_closure_triangles(observation):
    two_stations = quiet(observation.flag_sites, [s for s in observation.tarr["site"] if s not in ("AA", "LM")])
    with pytest.raises(ValueError, match="no closure triangles"):
        closure_data(two_stations, 16, 160.0)


def test_ring_generator_and_model_images():
    from ppm_eht.rings import model_images, ring_images

    images = ring_images(12, 32, torch.Generator().manual_seed(0))
    assert images.shape == (12, 1, 32, 32)
    assert float(images.min()) >= 0
    assert torch.allclose(images.amax(dim=(1, 2, 3)), torch.ones(12))
    (avery, avery_fov), (jason, jason_fov) = model_images()
    # The file headers: FOVX 100 pix 0.000160 as and 150 pix 0.000130 as; total fluxes as ehtim reports them.
    assert avery.shape == (100, 100)
    assert jason.shape == (150, 150)
    assert (avery_fov, jason_fov) == pytest.approx((160.0, 130.0))
    assert (avery.sum(), jason.sum()) == pytest.approx((2.488, 4.104), abs=0.01)
