"""Prior training: loss decrease, exact resume, image folders, stop requests and DDP under torchrun."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ppm_core.priors import DiffusionPrior, UNetConfig, load_prior
from ppm_core.training import FolderSource, SyntheticSource, TrainConfig, edm_loss, train_prior
from ppm_core.training.data import _gaussian_blobs

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = UNetConfig(base_channels=8, channel_mults=[1, 2], blocks_per_level=1, embedding_dim=32)
# Torchrun runs start three Python processes that import torch; a hang should fail, not block CI.
SUBPROCESS_TIMEOUT_S = 300


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_config(steps: int, **changes) -> TrainConfig:
    settings = dict(steps=steps, batch_size=4, crop_size=16, lr=1e-3, warmup_steps=2, ema_halflife=2.0, log_every=1000)
    return TrainConfig(**(settings | changes))


def _per_sample_loss(prior: DiffusionPrior, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Return the EDM loss of each item of the batch, shape ``(batch,)``."""
    with torch.no_grad():
        return torch.stack([edm_loss(prior, x0[i : i + 1], sigma[i : i + 1], eps[i : i + 1], prior.sigma_data) for i in range(x0.shape[0])])


# ------------------------------------------------------------------------------------------------
# Synthetic data: the loss decreases, resume is exact, stop requests


def test_training_lowers_loss(tmp_path):
    # A fixed evaluation batch: 64 blob crops mapped to [-1, 1], with EDM's log-normal sigma.
    generator = torch.Generator().manual_seed(123)
    x0 = (_gaussian_blobs(64, 32, generator) - 0.5) / 0.5
    sigma = (torch.randn(64, generator=generator) * 1.2 - 1.2).exp()
    eps = torch.randn(x0.shape, generator=generator)

    config = TrainConfig(steps=150, batch_size=8, crop_size=32, lr=1e-3, warmup_steps=20, ema_halflife=20.0, log_every=1000)
    unet_config = UNetConfig(base_channels=16)
    trained = train_prior(SyntheticSource("blobs"), tmp_path, unet_config, config)
    untrained = DiffusionPrior(unet_config, trained.sigma_data).eval()

    before = _per_sample_loss(untrained, x0, sigma, eps)
    after = _per_sample_loss(trained, x0, sigma, eps)
    with torch.no_grad():
        torch.testing.assert_close(edm_loss(trained, x0, sigma, eps, trained.sigma_data), after.mean(), rtol=1e-5, atol=0)

    # The Monte-Carlo standard error of each batch mean is std / sqrt(64). The untrained
    # denoiser c_skip x has a loss near 1.1, and 150 steps bring it to about 0.2, a drop of
    # about 20 standard errors.
    standard_error = float(torch.sqrt(before.var() / 64 + after.var() / 64))
    decrease = float(before.mean() - after.mean())
    assert decrease > 10 * standard_error, f"loss fell by {decrease:.4f}; 10 standard errors are {10 * standard_error:.4f}"


def test_resume_is_exact(tmp_path):
    source = SyntheticSource("blobs")
    straight_losses, resumed_losses = {}, {}

    def record(losses):
        return lambda state: losses.__setitem__(state["step"], state["loss"])

    train_prior(source, tmp_path / "straight", TINY_UNET, _tiny_config(8), callback=record(straight_losses))
    train_prior(source, tmp_path / "resumed", TINY_UNET, _tiny_config(4), callback=record(resumed_losses))
    assert json.loads((tmp_path / "resumed" / "training_state" / "state.json").read_text())["step"] == 4
    train_prior(source, tmp_path / "resumed", None, _tiny_config(8), resume=True, callback=record(resumed_losses))

    assert resumed_losses == straight_losses
    for name in ("model.safetensors", "training_state/state.safetensors"):
        straight = load_file(str(tmp_path / "straight" / name))
        resumed = load_file(str(tmp_path / "resumed" / name))
        assert straight.keys() == resumed.keys()
        differing = [key for key in straight if not torch.equal(straight[key], resumed[key])]
        assert not differing, f"{name}: resumed run differs in {differing[:5]}"

    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert config["trained_steps"] == 8


def test_resume_without_state_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prior folder not found"):
        train_prior(SyntheticSource("blobs"), tmp_path / "absent", TINY_UNET, _tiny_config(2), resume=True)


def test_callback_stops_training(tmp_path):
    calls = []

    def stop_at_three(state: dict) -> bool:
        calls.append(state["step"])
        return state["step"] == 3

    config = _tiny_config(100, checkpoint_every=1000)
    train_prior(SyntheticSource("blobs"), tmp_path, TINY_UNET, config, callback=stop_at_three)

    assert calls == [1, 2, 3]
    assert json.loads((tmp_path / "config.json").read_text())["trained_steps"] == 3
    assert json.loads((tmp_path / "training_state" / "state.json").read_text())["step"] == 3
    assert load_prior(tmp_path).unet_config == TINY_UNET


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"steps": 0}, r"steps must be >= 1; got 0"),
        ({"batch_size": 0}, r"batch_size must be >= 1; got 0"),
        ({"crop_size": -1}, r"crop_size must be >= 1; got -1"),
        ({"lr": 0.0}, r"lr must be a positive finite number; got 0.0"),
        ({"lr": float("nan")}, r"lr must be a positive finite number; got nan"),
        ({"ema_halflife": -5.0}, r"ema_halflife must be positive; got -5.0"),
    ],
)
def test_invalid_train_config_raises(tmp_path, changes, match):
    config = dataclasses.replace(_tiny_config(2), **changes)
    with pytest.raises(ValueError, match=match):
        train_prior(SyntheticSource("blobs"), tmp_path, TINY_UNET, config)


def test_channel_mismatch_raises(tmp_path):
    with pytest.raises(ValueError, match=r"in_channels \(3\) must match the training images' channels \(1\)"):
        train_prior(SyntheticSource("blobs"), tmp_path, UNetConfig(in_channels=3, base_channels=8), _tiny_config(2))


@pytest.mark.parametrize("name", ["blobs", "gaussian-field"])
def test_synthetic_source_range(name):
    batch = SyntheticSource(name).sample(6, 20, torch.Generator().manual_seed(0))
    assert batch.shape == (6, 1, 20, 20)
    assert float(batch.min()) >= -1.0
    assert float(batch.max()) <= 1.0


def test_unknown_generator_raises():
    with pytest.raises(ValueError, match=r"unknown synthetic generator 'nope'; available: blobs, filaments, gaussian-field, rings"):
        SyntheticSource("nope")


# ------------------------------------------------------------------------------------------------
# Image folders


def _image(seed: int, shape=(40, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 + 50 * rng.standard_normal(shape)).astype(np.float32)


def _write_tiff(path: Path, data: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, data)


def _write_fits(path: Path, data: np.ndarray) -> None:
    from astropy.io import fits

    fits.PrimaryHDU(data).writeto(path)


def _write_png(path: Path, data: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(data, 0, 255).astype(np.uint8)).save(path)


def _image_folder(folder: Path) -> Path:
    """Write one TIFF, one FITS and one PNG (in a subfolder) of 40x48 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_tiff(folder / "a.tif", _image(0))
    _write_fits(folder / "b.fits", _image(1))
    _write_png(folder / "nested" / "c.png", _image(2))
    return folder


def test_folder_source_trains(tmp_path):
    source = FolderSource(_image_folder(tmp_path / "images"))
    assert [p.name for p in source.paths] == ["a.tif", "b.fits", "c.png"]
    assert source.channels == 1

    # Percentile normalization maps each image's 0.1 and 99.9 percentiles to -1 and 1.
    for image in source.images:
        low, high = np.percentile(image.numpy(), [0.1, 99.9])
        assert low == pytest.approx(-1.0, abs=1e-5)
        assert high == pytest.approx(1.0, abs=1e-5)

    prior = train_prior(source, tmp_path / "prior", TINY_UNET, _tiny_config(3))
    assert prior.data_description == {"source": "folder", "path": str(tmp_path / "images"), "n_images": 3}
    loaded = load_prior(tmp_path / "prior")
    assert loaded.normalization == {"method": "percentile", "low": 0.1, "high": 99.9}
    assert loaded.data_description["n_images"] == 3


def test_folder_without_images_raises(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"no images found in {re.escape(str(empty))}"):
        FolderSource(empty)

    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=rf"no images found in {re.escape(str(empty))}"):
        FolderSource(empty)

    with pytest.raises(FileNotFoundError, match=r"training folder not found"):
        FolderSource(tmp_path / "absent")


def _nan_tiff(path: Path) -> None:
    data = _image(3)
    data[5, 7] = np.nan
    _write_tiff(path, data)


def _truncated_tiff(path: Path, keep: int | None = None) -> None:
    _write_tiff(path, _image(4))
    data = path.read_bytes()
    path.write_bytes(data[: keep or len(data) // 2])


BAD_FILES = [
    ("NaN TIFF", "bad.tif", _nan_tiff, r"contains NaN or infinite values"),
    ("empty file", "bad.tif", lambda path: path.write_bytes(b""), r"image file is empty"),
    ("truncated TIFF", "bad.tif", _truncated_tiff, r"cannot read image"),
    ("corrupt TIFF directory", "bad.tif", lambda path: _truncated_tiff(path, keep=100), r"cannot read image"),
    ("corrupt FITS", "bad.fits", lambda path: path.write_bytes(b"SIMPLE  = garbage" * 10), r"cannot read image"),
    ("corrupt PNG", "bad.png", lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), r"cannot read image"),
]


@pytest.mark.parametrize("name, write, match", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_image_file_raises(tmp_path, name, write, match):
    folder = tmp_path / "images"
    folder.mkdir()
    _write_tiff(folder / "good.tif", _image(0))
    write(folder / name)
    with pytest.raises(ValueError, match=match) as excinfo:
        FolderSource(folder)
    assert str(folder / name) in str(excinfo.value)


def test_crop_larger_than_images_raises(tmp_path):
    source = FolderSource(_image_folder(tmp_path / "images"))
    with pytest.raises(ValueError, match=r"crop_size 64 is larger than image\(s\)"):
        train_prior(source, tmp_path / "prior", TINY_UNET, _tiny_config(2, crop_size=64))


def test_mixed_channel_counts_raise(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _write_tiff(folder / "gray.tif", _image(0))
    rgb = np.stack([_image(1), _image(2), _image(3)], axis=-1)
    _write_png(folder / "color.png", rgb)
    with pytest.raises(ValueError, match=r"same number of channels; found \[1, 3\]"):
        FolderSource(folder)


# ------------------------------------------------------------------------------------------------
# Distributed data parallel under torchrun (two CPU processes, gloo)


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


def test_ddp_ranks_agree(tmp_path):
    result = _torchrun([str(REPO_ROOT / "tests" / "ddp_worker.py"), str(tmp_path)], tmp_path)
    assert result.returncode == 0, f"torchrun failed:\n{result.stderr[-4000:]}"

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    differing = [key for key in ranks[0] if not torch.equal(ranks[0][key], ranks[1][key])]
    assert not differing, f"ranks 0 and 1 differ in {differing[:5]}"

    # Every parameter moved from its initial value; only the Fourier frequencies are a fixed buffer.
    weights = ranks[0]
    names = [key.removeprefix("raw.") for key in weights if key.startswith("raw.")]
    unchanged = [name for name in names if torch.equal(weights[f"raw.{name}"], weights[f"init.{name}"])]
    assert unchanged == ["embedding.freqs"]
    assert not bool(weights["init.conv_out.weight"].any()), "the output layer should start at zero"
    assert bool(weights["ema.conv_out.weight"].any())

    # Rank 0 wrote the checkpoint: raw weights in the training state, EMA weights as the prior.
    state = load_file(str(tmp_path / "prior" / "training_state" / "state.safetensors"))
    prior = load_file(str(tmp_path / "prior" / "model.safetensors"))
    for name in names:
        assert torch.equal(state[f"net.{name}"], weights[f"raw.{name}"]), name
        assert torch.equal(prior[name], weights[f"ema.{name}"]), name
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert config["trained_steps"] == 5


def test_cli_under_torchrun(tmp_path):
    out = tmp_path / "prior"
    cli_args = ["train-prior", "--synthetic", "blobs", "--out", str(out), "--steps", "4", "--batch-size", "4", "--crop-size", "16", "--base-channels", "8"]
    result = _torchrun(["-m", "ppm_core.cli", *cli_args], tmp_path)
    assert result.returncode == 0, f"torchrun failed:\n{result.stderr[-4000:]}"

    config = json.loads((out / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert config["trained_steps"] == 4
    assert load_prior(out).unet_config.base_channels == 8


def test_constant_image_rejected_by_percentiles(tmp_path):
    import tifffile

    from ppm_core.training import FolderSource

    folder = tmp_path / "flat"
    folder.mkdir()
    sparse = np.zeros((64, 64), dtype=np.float32)
    sparse[[5, 30, 50], [7, 33, 60]] = 100.0  # 3 of 4096 pixels: the 0.1 and 99.9 percentiles are both 0
    tifffile.imwrite(folder / "sparse.tif", sparse)
    with pytest.raises(ValueError, match=r"sparse\.tif: the 0\.1 and 99\.9 percentiles of the image are equal \(0\)"):
        FolderSource(folder)
    source = FolderSource(folder, {"method": "none"})
    assert float(source.images[0].max()) == 100.0


def test_resume_records_new_training_data(tmp_path, caplog):
    from ppm_core.training import SyntheticSource

    train_prior(SyntheticSource("blobs"), tmp_path, TINY_UNET, _tiny_config(2))
    with caplog.at_level(logging.WARNING, logger="ppm_core.training.train"):
        train_prior(SyntheticSource("gaussian-field"), tmp_path, None, _tiny_config(4), resume=True)
    assert "resuming on different training data" in caplog.text
    recorded = json.loads((tmp_path / "config.json").read_text())["training_data"]
    assert recorded["generator"] == "blobs"
    assert recorded["resumed_with"]["generator"] == "gaussian-field"
