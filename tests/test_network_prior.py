"""DiffusionPrior: shapes, EDM preconditioning and safetensors checkpoints."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ppm_core.priors import DiffusionPrior, UNetConfig, load_prior
from ppm_core.priors.network import CONFIG_NAME, WEIGHTS_NAME

TINY = dict(base_channels=8, channel_mults=[1, 2, 2], blocks_per_level=1, embedding_dim=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize(prior: DiffusionPrior, seed: int = 0) -> DiffusionPrior:
    """Replace every weight with small random values, so the zero-initialized output layer no longer hides the network."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in prior.net.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return prior.eval()


# ------------------------------------------------------------------------------------------------
# Shapes and the preconditioned denoiser


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 64, 64), (2, 1, 37, 50), (3, 1, 1, 1), (2, 1, 3, 5), (1, 1, 8, 4)],
    ids=["64x64", "37x50 padded", "1x1 pixel", "3x5 replicate-padded", "8x4"],
)
def test_denoiser_output_shape(shape):
    prior = _randomize(DiffusionPrior(UNetConfig(**TINY)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = prior.denoiser(x, 0.7)
    assert out.shape == x.shape
    assert bool(torch.isfinite(out).all())


def test_denoiser_multichannel_shape():
    prior = _randomize(DiffusionPrior(UNetConfig(in_channels=3, **TINY)))
    x = torch.randn(2, 3, 21, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert prior.denoiser(x, torch.tensor([0.1, 3.0])).shape == x.shape


def test_padding_reflects_then_crops():
    prior = _randomize(DiffusionPrior(UNetConfig(**TINY), sigma_data=0.4))
    x = torch.randn(2, 1, 37, 50, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.3, 2.0])

    # The downsampling factor is 4, so 37x50 is reflect-padded to 40x52 on the bottom and right.
    c_skip, c_out, c_in, c_noise = prior.preconditioning(sigma.reshape(-1, 1, 1, 1))
    padded = F.pad(c_in * x, (0, 2, 0, 3), mode="reflect")
    with torch.no_grad():
        expected = c_skip * x + c_out * prior.net(padded, c_noise.reshape(-1))[..., :37, :50]
        actual = prior.denoiser(x, sigma)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (2, 1, 37, 50), (3, 1, 1, 1)], ids=["64x64", "37x50", "1x1"])
def test_untrained_denoiser_is_c_skip_x(shape):
    # The output convolution is zero-initialized, so F = 0 and D(x, sigma) = c_skip x exactly.
    prior = DiffusionPrior(UNetConfig(**TINY), sigma_data=0.5).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    sigma = torch.linspace(0.05, 20.0, shape[0])
    with torch.no_grad():
        out = prior.denoiser(x, sigma)
    c_skip = 0.25 / (sigma**2 + 0.25)
    assert torch.equal(out, c_skip.reshape(-1, 1, 1, 1) * x)


@pytest.mark.parametrize("sigma_data", [0.5, 0.37])
def test_preconditioning_matches_edm(sigma_data):
    prior = DiffusionPrior(UNetConfig(**TINY), sigma_data=sigma_data)
    sigmas = [0.002, 0.1, 1.0, 80.0]
    c_skip, c_out, c_in, c_noise = prior.preconditioning(torch.tensor(sigmas, dtype=torch.float64).reshape(-1, 1, 1, 1))

    # Karras et al. (2022), Table 1, written out in plain floats.
    for i, s in enumerate(sigmas):
        sd = sigma_data
        assert float(c_skip[i]) == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert float(c_out[i]) == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert float(c_in[i]) == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert float(c_noise[i]) == pytest.approx(math.log(s) / 4, rel=1e-12)


def test_float64_input_keeps_dtype():
    prior = _randomize(DiffusionPrior(UNetConfig(**TINY)))
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out = prior.denoiser(x, 0.5)
    assert out.dtype == torch.float64
    assert out.shape == x.shape


def test_wrong_channel_count_raises():
    prior = DiffusionPrior(UNetConfig(**TINY))
    with pytest.raises(ValueError, match=r"x must have 1 channel\(s\)"):
        prior.denoiser(torch.zeros(2, 3, 16, 16), 1.0)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _saved_prior(directory: Path, seed: int = 0, **unet) -> DiffusionPrior:
    prior = _randomize(
        DiffusionPrior(
            UNetConfig(**(TINY | unet)),
            sigma_data=0.37,
            normalization={"method": "percentile", "low": 0.1, "high": 99.9},
            data_description={"source": "test"},
        ),
        seed,
    )
    prior.save(directory)
    return prior


def test_checkpoint_round_trip_exact(tmp_path):
    prior = _saved_prior(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME], "temporary files were left behind"

    loaded = load_prior(tmp_path)
    assert loaded.unet_config == prior.unet_config
    assert loaded.sigma_data == prior.sigma_data
    assert loaded.normalization == prior.normalization
    assert loaded.data_description == prior.data_description
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())

    original_state = prior.net.state_dict()
    loaded_state = loaded.net.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, value in original_state.items():
        assert torch.equal(loaded_state[name], value), f"weight {name} changed in the round trip"

    x = torch.randn(3, 1, 24, 20, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.01, 0.5, 30.0])
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(x, sigma), prior.denoiser(x, sigma))


def test_save_extra_config(tmp_path):
    prior = DiffusionPrior(UNetConfig(**TINY))
    prior.save(tmp_path, extra_config={"trained_steps": 7})
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["trained_steps"] == 7
    assert config["kind"] == "edm-unet"
    assert config["architecture"]["base_channels"] == TINY["base_channels"]


class _TouchOnUnpickle:
    """Pickle payload that creates a file when unpickled, to detect any use of pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _torch_pickle(path: Path) -> None:
    torch.save(DiffusionPrior(UNetConfig(**TINY)).net.state_dict(), path)


CORRUPT_WEIGHTS = [
    ("truncated", _truncate),
    ("garbage bytes", _garbage),
    ("torch.save pickle", _torch_pickle),
    ("too short", lambda path: path.write_bytes(b"abc")),
]


@pytest.mark.parametrize("corrupt", [case[1] for case in CORRUPT_WEIGHTS], ids=[case[0] for case in CORRUPT_WEIGHTS])
def test_corrupt_weights_raise(tmp_path, corrupt):
    _saved_prior(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    corrupt(weights)
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        load_prior(tmp_path)


def test_weights_never_unpickled(tmp_path):
    _saved_prior(tmp_path)
    marker = tmp_path / "unpickled"
    (tmp_path / WEIGHTS_NAME).write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))

    with pytest.raises(ValueError, match=re.escape(str(tmp_path / WEIGHTS_NAME))):
        load_prior(tmp_path)
    assert not marker.exists(), "load_prior unpickled the weights file"


def test_weights_of_other_architecture_raise(tmp_path):
    _saved_prior(tmp_path / "small")
    _saved_prior(tmp_path / "wide", base_channels=16)
    (tmp_path / "small" / WEIGHTS_NAME).write_bytes((tmp_path / "wide" / WEIGHTS_NAME).read_bytes())

    with pytest.raises(ValueError, match=r"do not match the architecture") as excinfo:
        load_prior(tmp_path / "small")
    assert str(tmp_path / "small" / WEIGHTS_NAME) in str(excinfo.value)


def test_non_finite_weights_raise(tmp_path):
    prior = _saved_prior(tmp_path)
    with torch.no_grad():
        prior.net.conv_out.weight[0, 0, 0, 0] = math.nan
    prior.save(tmp_path)
    with pytest.raises(ValueError, match=r"NaN or infinite values in \['conv_out.weight'\]"):
        load_prior(tmp_path)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prior folder not found"):
        load_prior(tmp_path / "absent")

    _saved_prior(tmp_path / "no_config")
    (tmp_path / "no_config" / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "no_config" / CONFIG_NAME))):
        load_prior(tmp_path / "no_config")

    _saved_prior(tmp_path / "no_weights")
    (tmp_path / "no_weights" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "no_weights" / WEIGHTS_NAME))):
        load_prior(tmp_path / "no_weights")


INVALID_CONFIGS = [
    ("not JSON", b"{not json", r"is not valid JSON"),
    ("not UTF-8", b"\xff\xfe\x00garbage", r"is not valid JSON"),
    ("JSON array", b"[1, 2]", r"must be a JSON object; got list"),
]


@pytest.mark.parametrize("content, match", [case[1:] for case in INVALID_CONFIGS], ids=[case[0] for case in INVALID_CONFIGS])
def test_invalid_config_file_raises(tmp_path, content, match):
    _saved_prior(tmp_path)
    config_path = tmp_path / CONFIG_NAME
    config_path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as excinfo:
        load_prior(tmp_path)
    assert str(config_path) in str(excinfo.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"kind": "pickle"}, r"config 'kind' must be 'edm-unet'; got 'pickle'"),
        ({"architecture": {"base_channels": 8, "attention": True}}, r"invalid 'architecture'/'sigma_data'"),
        ({"sigma_data": None}, r"invalid 'architecture'/'sigma_data'"),
    ],
    ids=["wrong kind", "unknown architecture key", "sigma_data null"],
)
def test_invalid_config_values_raise(tmp_path, change, match):
    _saved_prior(tmp_path)
    config_path = tmp_path / CONFIG_NAME
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | change))
    with pytest.raises(ValueError, match=match):
        load_prior(tmp_path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sigma_data": 0}, "sigma_data' must be a positive finite number"),
        ({"sigma_data": "nan"}, "sigma_data' must be a positive finite number"),
        ({"normalization": {"method": "weird"}}, "normalization method must be one of"),
        ({"architecture": {"in_channels": "one"}}, "in_channels must be a positive integer"),
        ({"architecture": {"base_channels": 0}}, "base_channels must be a positive integer"),
    ],
)
def test_invalid_config_values_rejected(tmp_path, change, match):
    prior = DiffusionPrior(UNetConfig(base_channels=8, channel_mults=[1, 2], blocks_per_level=1, embedding_dim=16))
    prior.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if "architecture" in change:
        config["architecture"] |= change["architecture"]
    else:
        config |= change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_prior(tmp_path)
