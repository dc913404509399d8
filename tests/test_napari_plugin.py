"""The napari plugin, headless: manifest, reader/writer round trip, widget runs, Cancel, bad input.

Needs napari with a Qt binding and a display (Xvfb; `make test` provides one). Without them the
module is skipped with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install -e '.[napari]')")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")
if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
    pytest.skip("no display: run under xvfb-run (make test does), or set QT_QPA_PLATFORM=offscreen", allow_module_level=True)


def _qt_starts() -> str:
    """Start a Qt application in a subprocess; return its error output ('' when it works).

    A missing xcb library makes Qt abort the whole process, which must not take pytest down.
    """
    import subprocess
    import sys

    probe = "from qtpy.QtWidgets import QApplication; QApplication([])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return "" if result.returncode == 0 else (result.stderr.strip().splitlines() or ["unknown error"])[-1]


_QT_ERROR = _qt_starts()
if _QT_ERROR:
    pytest.skip(f"Qt cannot start here ({_QT_ERROR}); install the packages in scripts/headless_deps.sh", allow_module_level=True)

import tifffile  # noqa: E402

from ppm_napari._reader import get_reader  # noqa: E402
from ppm_napari._writer import write_result_layers  # noqa: E402
from ppm_napari.io import read_result, write_result  # noqa: E402
from ppm_napari.widget import STACK_CHOICES, ReconstructionWidget  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WF09 = ROOT / "sample_data" / "biosr_mt" / "MT_Cell001_crop007_rawSIM_level09.tif"



@pytest.fixture()
def errors(monkeypatch) -> list[str]:
    """Messages passed to napari's show_error by the widget."""
    shown: list[str] = []
    import napari.utils.notifications as notifications

    monkeypatch.setattr(notifications, "show_error", lambda message: shown.append(str(message)))
    return shown


def _widefield(size=24) -> np.ndarray:
    return tifffile.imread(WF09).astype(np.float32).mean(0)[40 : 40 + size, 30 : 30 + size]


def _widget(viewer, prior: Path, **values) -> ReconstructionWidget:
    widget = ReconstructionWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.prior.value = str(prior)
    for name, value in values.items():
        getattr(widget, name).value = value
    return widget


def test_manifest_is_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT / "ppm_napari" / "napari.yaml")
    assert manifest.name == "ppm-imaging"
    assert {w.display_name for w in manifest.contributions.widgets} == {"PPM super-resolution"}
    assert [s.key for s in manifest.contributions.sample_data] == ["biosr-microtubules"]


def test_reader_sets_scale_and_writer_round_trips(tmp_path):
    image = np.random.default_rng(0).random((16, 20)).astype(np.float32)
    tifffile.imwrite(tmp_path / "wf.tif", image, imagej=True, resolution=(1 / 0.0626, 1 / 0.0626), metadata={"unit": "um"})
    ((data, meta, kind),) = get_reader(str(tmp_path / "wf.tif"))(str(tmp_path / "wf.tif"))
    assert kind == "image"
    assert meta["scale"] == pytest.approx((0.0626, 0.0626))
    np.testing.assert_array_equal(data, image)

    samples = np.random.default_rng(1).random((3, 32, 40)).astype(np.float32)
    parameters = {"method": "ppm", "scale": 2, "steps": 10}
    write_result(tmp_path / "r.ome.tif", samples.mean(0), samples.std(0), samples, 31.3, parameters)
    layers = get_reader(str(tmp_path / "r.ome.tif"))(str(tmp_path / "r.ome.tif"))
    assert [m["metadata"]["ppm_role"] for _, m, _ in layers] == ["mean", "std", "samples"]
    assert layers[0][1]["scale"] == pytest.approx((0.0313, 0.0313))
    assert layers[0][1]["metadata"]["parameters"] == parameters
    written = write_result_layers(str(tmp_path / "again.ome.tif"), layers)
    again = read_result(written[0])
    np.testing.assert_array_equal(again["samples"], samples)
    assert again["pixel_size_nm"] == pytest.approx(31.3)
    assert again["parameters"] == parameters
    with pytest.raises(ValueError, match="not a PPM result layer"):
        write_result_layers(str(tmp_path / "x.ome.tif"), [(image, {"name": "wf", "metadata": {}}, "image")])


def test_widget_run_adds_scaled_layers(make_napari_viewer, qtbot, tiny_prior, errors):
    viewer = make_napari_viewer()
    source = viewer.add_image(_widefield(), name="wf", scale=(0.0626, 0.0626), translate=(1.0, 2.0))
    widget = _widget(viewer, tiny_prior, method="red-diff", samples=3, steps=6)
    assert widget.pixel_size.value == pytest.approx(62.6)
    worker = widget.run()
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert errors == []
    names = [layer.name for layer in viewer.layers]
    assert names == ["wf", "wf mean", "wf std", "wf samples"]
    mean, std, samples = (viewer.layers[n] for n in ("wf mean", "wf std", "wf samples"))
    assert mean.data.shape == (48, 48)
    assert samples.data.shape == (3, 48, 48)
    np.testing.assert_allclose(mean.scale, (0.0313, 0.0313))
    # Fine pixel 0 is centred a quarter of a camera pixel before camera pixel 0's centre.
    np.testing.assert_allclose(mean.translate, (1.0 - 0.0626 / 4, 2.0 - 0.0626 / 4))
    np.testing.assert_allclose(samples.scale[-2:], (0.0313, 0.0313))
    assert std.colormap.name == "inferno"
    assert std.contrast_limits[1] > 0
    assert mean.metadata["parameters"]["method"] == "red-diff"
    np.testing.assert_array_equal(source.data, _widefield())

    # Running again replaces this input's result layers and leaves other layers alone.
    viewer.add_image(np.zeros((4, 4)), name="other")
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert sorted(layer.name for layer in viewer.layers) == sorted(["wf", "other", "wf mean", "wf std", "wf samples"])


def test_cancel_stops_and_adds_nothing(make_napari_viewer, qtbot, tiny_prior, errors):
    viewer = make_napari_viewer()
    viewer.add_image(_widefield(32), name="wf", scale=(0.0626, 0.0626))
    widget = _widget(viewer, tiny_prior, method="ppm", samples=2, steps=100_000)
    widget.run()
    qtbot.waitUntil(lambda: "iteration" in widget.status.value, timeout=120_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == ["wf"]
    assert widget.status.value == "cancelled"
    assert errors == []
    np.testing.assert_array_equal(viewer.layers["wf"].data, _widefield(32))


@pytest.mark.parametrize("case", ["rgb", "stack", "psf-pixel-size"])
def test_bad_input_shows_a_notification_and_adds_nothing(make_napari_viewer, tiny_prior, errors, case):
    viewer = make_napari_viewer()
    if case == "rgb":
        viewer.add_image(np.random.default_rng(0).random((24, 24, 3)), name="wf", rgb=True)
        expected = "RGB"
    elif case == "stack":
        viewer.add_image(tifffile.imread(WF09)[:, :24, :24].astype(np.float32), name="wf", scale=(1, 0.0626, 0.0626))
        expected = "stack of 9 planes"
    else:
        viewer.add_image(_widefield(), name="wf", scale=(0.0626, 0.0626))
        from ppm_napari.psf import airy_psf

        viewer.add_image(airy_psf(1.3, 525, 20.0, size=31), name="bead", scale=(0.02, 0.02))
        expected = "does not match the 20 nm"
    widget = _widget(viewer, tiny_prior, method="red-diff", steps=2)
    widget.image.value = viewer.layers["wf"]
    widget.pixel_size.value = 62.6
    if case == "psf-pixel-size":
        widget.psf_source.value = "PSF image layer"
        widget.psf_layer.value = viewer.layers["bead"]
        widget.psf_pixel_size.value = 40.0
    before = [layer.name for layer in viewer.layers]
    assert widget.run() is None
    assert len(errors) == 1
    assert expected in errors[0]
    assert [layer.name for layer in viewer.layers] == before


def test_stack_with_a_chosen_plane_runs(make_napari_viewer, qtbot, tiny_prior, errors):
    viewer = make_napari_viewer()
    viewer.add_image(tifffile.imread(WF09)[:, :24, :24].astype(np.float32), name="wf", scale=(1, 0.0626, 0.0626))
    widget = _widget(viewer, tiny_prior, method="bicubic")
    widget.stack.value = STACK_CHOICES[2]
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert errors == []
    assert viewer.layers["wf mean"].data.shape == (48, 48)


def test_sample_data_opens_with_its_pixel_size():
    from ppm_napari._sample_data import biosr_widefield

    ((data, meta, _),) = biosr_widefield()
    assert data.shape == (128, 128)
    assert meta["scale"] == (0.0626, 0.0626)


def test_npe2_validate_command():
    import subprocess
    import sys

    pytest.importorskip("npe2")
    result = subprocess.run([sys.executable, "-m", "npe2", "validate", "ppm-imaging"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_widget_trains_and_applies_model(make_napari_viewer, qtbot, tiny_prior, errors, tmp_path):
    frames = tifffile.imread(WF09).astype(np.float32)[:3, 40:60, 30:54]
    viewer = make_napari_viewer()
    viewer.add_image(frames, name="movie", scale=(1.0, 0.0626, 0.0626))
    widget = _widget(viewer, tiny_prior, psf_source="Gaussian (FWHM)", fwhm=250.0, tile_size=16, train_steps=2, samples=3)
    widget.model_folder.value = str(tmp_path / "model")
    assert widget.train() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert errors == []
    assert (tmp_path / "model" / "config.json").is_file()
    assert "trained for 2 steps" in widget.status.value

    # A second training into the same folder is rejected, and the model stays.
    assert widget.train() is None
    assert "already contains a model" in errors[-1]
    errors.clear()

    assert widget.apply() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert errors == []
    mean, std, samples = (viewer.layers[f"movie {role}"] for role in ("mean", "std", "samples"))
    assert mean.data.shape == std.data.shape == (3, 40, 48)
    assert samples.data.shape == (3, 3, 40, 48)
    np.testing.assert_allclose(mean.scale, (1.0, 0.0313, 0.0313))
    np.testing.assert_allclose(samples.scale, (1.0, 1.0, 0.0313, 0.0313))
    assert mean.metadata["parameters"]["method"] == "ppm-amortized"
    assert mean.metadata["parameters"]["frames"] == 3
    assert viewer.layers["movie"].data.shape == (3, 20, 24)

    # Without a model folder, apply shows what is missing.
    widget.model_folder.value = str(tmp_path / "nothing")
    assert widget.apply() is None
    assert "amortized model folder not found" in errors[-1]
