"""The napari widget: super-resolution with posterior samples, run in a thread worker.

The widget only collects settings, checks them and shows results; the work is
:func:`ppm_napari.superres.super_resolve`, the same function as ``ppm micro reconstruct``.
Its amortized section trains a model on every plane of the chosen layer
(:func:`ppm_napari.amortized.train_on_stack`, as ``ppm train-amortized micro``) and applies a
model to every plane (:func:`ppm_napari.amortized.apply_to_frames`), which adds mean, std and
samples layers with the planes as their first axis.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox

from .cli import DEFAULT_PRIOR
from .superres import METHODS

logger = logging.getLogger(__name__)

PSF_SOURCES = ("Airy (NA, wavelength)", "PSF image layer", "OTF file", "Gaussian (FWHM)")
STACK_CHOICES = ("(choose for stacks)", "current plane", "mean of all planes")
METHOD_LABELS = {"ppm": "PPM", "red-diff": "RED-Diff", "dps": "DPS", "richardson-lucy": "Richardson-Lucy",
                 "bicubic": "bicubic", "rlsd": "RLSD", "ikl": "IKL", "ppm-sim": "PPM (first network only)"}
PREVIEW_EVERY = 5  # iterations between preview updates


class ReconstructionWidget(Container):
    """Dock widget: input layer, PSF, prior and method settings, Run and Cancel."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.stack = ComboBox(label="stack", choices=STACK_CHOICES, value=STACK_CHOICES[0])
        self.pixel_size = FloatSpinBox(label="pixel size (nm)", value=0.0, min=0.0, max=1e5, step=0.1)
        self.psf_source = ComboBox(label="PSF", choices=PSF_SOURCES, value=PSF_SOURCES[0])
        self.na = FloatSpinBox(label="NA", value=1.3, min=0.05, max=1.7, step=0.05)
        self.wavelength = FloatSpinBox(label="emission (nm)", value=525.0, min=200.0, max=2000.0, step=1.0)
        self.refractive_index = FloatSpinBox(label="refractive index", value=1.518, min=1.0, max=2.0, step=0.001)
        self.psf_layer = ComboBox(label="PSF layer", choices=self._image_layers, nullable=True)
        self.psf_pixel_size = FloatSpinBox(label="PSF pixel size (nm)", value=0.0, min=0.0, max=1e5, step=0.1)
        self.otf_file = FileEdit(label="OTF file", filter="*.mrc", mode="r", value="")
        self.fwhm = FloatSpinBox(label="FWHM (nm)", value=220.0, min=1.0, max=1e4, step=1.0)
        self.scale = SpinBox(label="scale factor", value=2, min=1, max=8)
        self.prior = FileEdit(label="prior folder", mode="d", value=str(DEFAULT_PRIOR))
        self.method = ComboBox(label="method", choices=[(METHOD_LABELS[m], m) for m in METHODS], value="ppm")
        self.samples = SpinBox(label="samples", value=8, min=1, max=256)
        self.steps = SpinBox(label="steps (0: default)", value=0, min=0, max=100000)
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.tile_size = SpinBox(label="tile size (0: whole)", value=0, min=0, max=100000)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.model_folder = FileEdit(label="amortized model", mode="d", value="")
        self.train_steps = SpinBox(label="training steps", value=1000, min=1, max=10**7)
        self.train_button = PushButton(text="Train on this stack")
        self.apply_button = PushButton(text="Apply to all frames")
        self.status = Label(value="")
        super().__init__(widgets=[
            self.image, self.stack, self.pixel_size, self.psf_source, self.na, self.wavelength, self.refractive_index,
            self.psf_layer, self.psf_pixel_size, self.otf_file, self.fwhm, self.scale, self.prior, self.method,
            self.samples, self.steps, self.seed, self.tile_size, self.run_button, self.cancel_button,
            Label(value="Amortized: train once, then one pass per frame"), self.model_folder, self.train_steps,
            self.train_button, self.apply_button, self.status,
        ])  # fmt: skip
        self.worker = None
        self._cancel = threading.Event()
        self.image.changed.connect(self._prefill_pixel_size)
        self.psf_source.changed.connect(self._show_psf_fields)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.train_button.clicked.connect(self.train)
        self.apply_button.clicked.connect(self.apply)
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        self._show_psf_fields()
        self._prefill_pixel_size()

    # -------------------------------------------------------------------------------------------
    # Choices and prefills

    def _image_layers(self, _widget=None) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and "ppm_role" not in layer.metadata]

    def _refresh_choices(self, _event=None) -> None:
        self.image.reset_choices()
        self.psf_layer.reset_choices()

    def _prefill_pixel_size(self, _value=None) -> None:
        layer = self.image.value
        if layer is None:
            return
        from_metadata = layer.metadata.get("pixel_size_nm")
        if from_metadata:
            self.pixel_size.value = float(from_metadata)
        elif float(layer.scale[-1]) != 1.0:
            self.pixel_size.value = float(layer.scale[-1]) * 1e3  # napari scale in micrometres

    def _show_psf_fields(self, _value=None) -> None:
        source = self.psf_source.value
        for widget in (self.na, self.wavelength, self.refractive_index):
            widget.visible = source == PSF_SOURCES[0]
        self.psf_layer.visible = self.psf_pixel_size.visible = source == PSF_SOURCES[1]
        self.otf_file.visible = source == PSF_SOURCES[2]
        self.fwhm.visible = source == PSF_SOURCES[3]

    # -------------------------------------------------------------------------------------------
    # Checking settings (everything here raises ValueError with a message for the user)

    def _input_layer(self):
        """Return the input layer and its data as float64, checked to be a single-channel image."""
        layer = self.image.value
        if layer is None:
            raise ValueError("choose an input image layer")
        if layer.rgb:
            raise ValueError(f"layer {layer.name!r} is an RGB image; super-resolution needs a single-channel widefield image")
        return layer, np.asarray(layer.data, dtype=np.float64)

    def _input_image(self) -> np.ndarray:
        layer, data = self._input_layer()
        if data.ndim == 3:
            if self.stack.value == STACK_CHOICES[1]:
                plane = int(self.viewer.dims.current_step[0]) if len(self.viewer.dims.current_step) >= 3 else 0
                data = data[min(plane, data.shape[0] - 1)]
            elif self.stack.value == STACK_CHOICES[2]:
                data = data.mean(axis=0)
            else:
                raise ValueError(f"layer {layer.name!r} is a stack of {data.shape[0]} planes; set 'stack' to the current plane or the mean of all planes")
        if data.ndim != 2:
            raise ValueError(f"layer {layer.name!r} has {data.ndim} dimensions; a 2-D image or a 3-D stack is expected")
        return data

    def _psf(self, fine_pixel: float) -> tuple[np.ndarray, dict]:
        from . import psf as models

        source = self.psf_source.value
        if source == PSF_SOURCES[0]:
            if self.na.value > self.refractive_index.value:
                raise ValueError(f"NA {self.na.value} exceeds the refractive index {self.refractive_index.value} of the immersion medium")
            return models.airy_psf(self.na.value, self.wavelength.value, fine_pixel), {
                "kind": "airy", "na": self.na.value, "wavelength_nm": self.wavelength.value, "refractive_index": self.refractive_index.value}
        if source == PSF_SOURCES[1]:
            layer = self.psf_layer.value
            if layer is None:
                raise ValueError("choose a PSF image layer")
            given = self.psf_pixel_size.value or None
            from_layer = layer.metadata.get("pixel_size_nm") or (float(layer.scale[-1]) * 1e3 if float(layer.scale[-1]) != 1.0 else None)
            if given and from_layer and abs(given - from_layer) > 0.01 * given:
                raise ValueError(f"PSF pixel size {given:g} nm does not match the {from_layer:g} nm of layer {layer.name!r}")
            return models.measured_psf(np.asarray(layer.data), given or from_layer, fine_pixel), {
                "kind": "measured", "layer": layer.name, "pixel_size_nm": given or from_layer}
        if source == PSF_SOURCES[2]:
            path = Path(str(self.otf_file.value))
            if not path.is_file():
                raise ValueError(f"OTF file not found: {path}")
            return models.psf_from_otf(path, fine_pixel), {"kind": "otf", "file": str(path)}
        return models.gaussian_psf(self.fwhm.value / fine_pixel), {"kind": "gaussian", "fwhm_nm": self.fwhm.value}

    def _input_frames(self) -> np.ndarray:
        """Return every plane of the input layer as ``(T, H, W)``."""
        layer, data = self._input_layer()
        if data.ndim not in (2, 3):
            raise ValueError(f"layer {layer.name!r} has {data.ndim} dimensions; a 2-D image or a 3-D stack is expected")
        return data.reshape(-1, *data.shape[-2:])

    def _layer_geometry(self) -> dict[str, Any]:
        layer = self.image.value
        return {"source": layer.name, "scale": self.scale.value, "layer_scale": tuple(float(s) for s in layer.scale[-2:]),
                "layer_translate": tuple(float(t) for t in layer.translate[-2:])}

    def settings(self) -> dict[str, Any]:
        """Everything the run needs, checked; raises ``ValueError`` naming what is wrong."""
        image = self._input_image()
        if self.pixel_size.value <= 0:
            raise ValueError("set the pixel size (nm): the layer has no physical scale")
        fine_pixel = self.pixel_size.value / self.scale.value
        psf, psf_info = self._psf(fine_pixel)
        method = self.method.value
        prior = None
        if method not in ("richardson-lucy", "bicubic"):
            from ppm_core.priors import load_prior

            prior = load_prior(Path(str(self.prior.value)))
        layer = self.image.value
        return {
            "image": image, "psf": psf, "psf_info": psf_info, "prior": prior, "method": method,
            "scale": self.scale.value, "n_samples": self.samples.value, "steps": self.steps.value or None,
            "seed": self.seed.value, "tile_size": self.tile_size.value or None, "fine_pixel": fine_pixel,
            "source": layer.name, "layer_scale": tuple(float(s) for s in layer.scale[-2:]),
            "layer_translate": tuple(float(t) for t in layer.translate[-2:]),
        }  # fmt: skip

    # -------------------------------------------------------------------------------------------
    # Running

    def run(self, _value=None):
        """Start a reconstruction in a thread worker; returns the worker (``None`` when settings are bad)."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        if self.worker is not None:
            show_error("a reconstruction is already running; cancel it first")
            return None
        try:
            settings = self.settings()
        except (ValueError, OSError) as exc:
            show_error(str(exc))
            return None
        self._cancel.clear()
        total = (settings["steps"] or _default_steps(settings["method"])) if settings["method"] not in ("richardson-lucy", "bicubic") else 1
        worker = create_worker(_reconstruct, settings, self._cancel, _progress={"total": total, "desc": f"PPM: {settings['method']}"})
        worker.yielded.connect(lambda state: self._on_progress(state, settings))
        worker.returned.connect(lambda result: self._on_result(result, settings))
        worker.errored.connect(self._on_error)
        worker.finished.connect(lambda: self._on_finished(settings["source"]))
        self.worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "running"
        worker.start()
        return worker

    def cancel(self, _value=None) -> None:
        """Stop the running reconstruction within one iteration; nothing is added."""
        if self.worker is not None:
            self._cancel.set()
            self.worker.quit()
            self.status.value = "cancelling"

    def train(self, _value=None):
        """Train an amortized model on every plane of the input layer, in a thread worker; returns the worker."""
        from napari.utils.notifications import show_error

        from ppm_core.priors import load_prior
        from ppm_core.training.amortized import AmortizedConfig

        try:
            frames = self._input_frames()
            if self.pixel_size.value <= 0:
                raise ValueError("set the pixel size (nm): the layer has no physical scale")
            folder = Path(str(self.model_folder.value))
            if not str(self.model_folder.value).strip() or folder == Path("."):
                raise ValueError("choose a folder for the amortized model")
            if (folder / "config.json").exists():
                raise ValueError(f"{folder} already contains a model; choose an empty folder (or continue it with ppm train-amortized --resume)")
            fine_pixel = self.pixel_size.value / self.scale.value
            psf, psf_info = self._psf(fine_pixel)
            prior = load_prior(Path(str(self.prior.value)))
            tile = self.tile_size.value or min(32, *frames.shape[-2:])  # 32 camera pixels, or the whole frame when smaller
            job = {"frames": frames, "psf": psf, "prior": prior, "out_dir": folder, "scale": self.scale.value, "tile_size": tile,
                   "tile_overlap": tile // 2, "config": AmortizedConfig(steps=self.train_steps.value, seed=self.seed.value),
                   "description": {"input_pixel_size_nm": self.pixel_size.value, "pixel_size_nm": fine_pixel, "psf_source": psf_info,
                                   "layer": self.image.value.name}}
        except (ValueError, OSError) as exc:
            show_error(str(exc))
            return None
        return self._start(_train, job, total=self.train_steps.value, desc="PPM: amortized training",
                           on_progress=lambda state: setattr(self.status, "value", f"step {state['step']}/{state['steps']}, loss {state['loss']:.4g}"),
                           on_result=self._on_trained)

    def apply(self, _value=None):
        """Apply the amortized model to every plane of the input layer; adds mean, std and samples over the planes."""
        from napari.utils.notifications import show_error

        from .amortized import load_model

        try:
            frames = self._input_frames()
            model = load_model(Path(str(self.model_folder.value)))
            info = model.config["description"]
            trained_pixel = info.get("input_pixel_size_nm")
            if self.pixel_size.value > 0 and trained_pixel and abs(self.pixel_size.value / trained_pixel - 1) > 0.01:
                raise ValueError(f"the layer's pixel size ({self.pixel_size.value:g} nm) differs from the model's ({trained_pixel:g} nm)")
            geometry = self._layer_geometry() | {"scale": int(info["scale"]), "fine_pixel": (trained_pixel or 0) / int(info["scale"])}
            job = {"model": model, "frames": frames, "n_samples": self.samples.value, "seed": self.seed.value}
        except (ValueError, OSError) as exc:
            show_error(str(exc))
            return None
        return self._start(_apply, job, total=len(frames), desc="PPM: amortized",
                           on_progress=lambda state: setattr(self.status, "value", f"frame {state['frame']}/{state['frames']}"),
                           on_result=lambda results: self._on_applied(results, geometry))

    def _start(self, function, job: dict, total: int, desc: str, on_progress, on_result):
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        if self.worker is not None:
            show_error("a reconstruction is already running; cancel it first")
            return None
        self._cancel.clear()
        worker = create_worker(function, job, self._cancel, _progress={"total": total, "desc": desc})
        worker.yielded.connect(on_progress)
        worker.returned.connect(on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(lambda: self._on_finished(""))
        self.worker = worker
        for button in (self.run_button, self.train_button, self.apply_button):
            button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "running"
        worker.start()
        return worker

    def _on_trained(self, model) -> None:
        if model is None:
            return
        steps = model.config.get("trained_steps")
        self.status.value = f"model trained for {steps} steps, saved in {self.model_folder.value}"

    def _on_applied(self, results, geometry: dict) -> None:
        from ._reader import result_layers

        if results is None:
            return
        self._remove_layers(geometry["source"])
        scale, translate = _fine_geometry(geometry)
        seconds = sum(r.seconds for r in results)
        parameters = results[0].parameters | {"frames": len(results), "seconds": round(seconds, 3), "pixel_size_nm": geometry["fine_pixel"]}
        parameters.pop("frame", None)
        stacked = {"mean": np.stack([r.mean for r in results]), "std": np.stack([r.std for r in results]),
                   "samples": np.stack([r.samples for r in results]), "parameters": parameters}
        for data, meta, _ in result_layers(stacked, geometry["source"], scale=scale, translate=translate):
            self.viewer.add_image(data, **meta)
        self.status.value = f"{len(results)} frame(s) in {seconds:.1f} s"

    def _on_progress(self, state: dict, settings: dict) -> None:
        if state.get("iteration", 0) % PREVIEW_EVERY and state.get("iteration") != state.get("steps"):
            return
        name = f"{settings['source']} preview"
        preview = state["preview"]
        scale, translate = _fine_geometry(settings)
        top, left = state["origin"]
        translate = (translate[0] + top * scale[0], translate[1] + left * scale[1])
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = preview
            layer.translate = translate
        else:
            self.viewer.add_image(preview, name=name, scale=scale, translate=translate, metadata={"ppm_role": "preview", "ppm_source": settings["source"]})
        self.status.value = f"tile {state['tile']}/{state['tiles']}, iteration {state['iteration']}/{state['steps']}"

    def _on_result(self, result, settings: dict) -> None:
        from ._reader import result_layers

        if result is None:  # cancelled
            return
        self._remove_layers(settings["source"])
        scale, translate = _fine_geometry(settings)
        parameters = result.parameters | {"psf": settings["psf_info"], "pixel_size_nm": settings["fine_pixel"],
                                          "seconds": round(result.seconds, 2), "peak_memory_mb": round(result.peak_memory_mb, 1)}
        layers = result_layers({"mean": result.mean, "std": result.std, "samples": result.samples, "parameters": parameters},
                               settings["source"], scale=scale, translate=translate)
        for data, meta, _ in layers:
            self.viewer.add_image(data, **meta)
        self.status.value = f"done in {result.seconds:.0f} s"

    def _on_error(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        show_error(str(exc))
        self.status.value = "failed"

    def _on_finished(self, source: str) -> None:
        # The run's own input, which may no longer be the one selected in the widget.
        if self._cancel.is_set():
            name = f"{source} preview"
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            self.status.value = "cancelled"
        self.worker = None
        for button in (self.run_button, self.train_button, self.apply_button):
            button.enabled = True
        self.cancel_button.enabled = False

    def _remove_layers(self, source: str) -> None:
        """Remove earlier result and preview layers of this input (only this input's)."""
        for layer in list(self.viewer.layers):
            if layer.metadata.get("ppm_source") == source and "ppm_role" in layer.metadata:
                self.viewer.layers.remove(layer)


def _default_steps(method: str) -> int:
    from ppm_core.inference.api import DEFAULTS

    from .superres import MICROSCOPY_DEFAULTS

    return MICROSCOPY_DEFAULTS.get(method, {}).get("steps", DEFAULTS.get(method, {}).get("steps", 1))


def _fine_geometry(settings: dict) -> tuple[tuple[float, float], tuple[float, float]]:
    """Compute the scale and translate of the fine grid so that it overlays the input layer.

    Input pixel ``i`` is centred at ``translate + i * scale`` and covers half a pixel each side.
    Fine pixel ``j`` is centred ``(j + 1/2) / factor - 1/2`` input pixels from the first centre.
    """
    factor = settings["scale"]
    scale = tuple(s / factor for s in settings["layer_scale"])
    translate = tuple(t - 0.5 * s * (1 - 1 / factor) for t, s in zip(settings["layer_translate"], settings["layer_scale"]))
    return scale, translate


def _reconstruct(settings: dict, cancel: threading.Event):
    """Generator run in the worker thread: yields progress states, returns the result (``None`` if cancelled)."""
    from .superres import super_resolve

    return (yield from _threaded(lambda callback: super_resolve(
        settings["image"], settings["psf"], settings["prior"], scale=settings["scale"], method=settings["method"],
        n_samples=settings["n_samples"], steps=settings["steps"], seed=settings["seed"], tile_size=settings["tile_size"],
        callback=callback), cancel))  # fmt: skip


def _train(job: dict, cancel: threading.Event):
    """Worker generator of "Train on this stack": yields training states, returns the model (saved when stopped)."""
    from .amortized import train_on_stack

    return (yield from _threaded(lambda callback: train_on_stack(callback=callback, **job), cancel))


def _apply(job: dict, cancel: threading.Event):
    """Worker generator of "Apply to all frames": yields after each frame, returns the per-frame results."""
    from .amortized import apply_to_frames

    return (yield from _threaded(lambda callback: apply_to_frames(callback=callback, **job), cancel))


def _threaded(work_function, cancel: threading.Event):
    """Run ``work_function(callback)`` in a nested thread, yield each state it reports, return its result.

    The nested thread lets this generator yield progress to the GUI; ``callback`` returns
    ``True`` once ``cancel`` is set, which stops the work at its next report. A run stopped by
    :class:`ReconstructionCancelled` returns ``None``.
    """
    from ppm_core.inference import ReconstructionCancelled

    updates: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def callback(state: dict) -> bool:
        updates.put(state)
        return cancel.is_set()

    def work() -> None:
        try:
            outcome["result"] = work_function(callback)
        except ReconstructionCancelled:
            outcome["cancelled"] = True
        except BaseException as exc:  # handed to the GUI thread below
            outcome["error"] = exc
        finally:
            updates.put(None)

    thread = threading.Thread(target=work, name="ppm-reconstruct", daemon=True)
    thread.start()
    drained = False
    try:
        while True:
            state = updates.get()
            if state is None:
                drained = True
                break
            yield state
    finally:
        if not drained:  # the worker was stopped while the work ran: stop it too
            cancel.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
