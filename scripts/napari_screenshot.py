"""Take docs/napari.png: a real napari viewer with the widget and a finished PPM result on the
BioSR sample. Run under a display, e.g.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/napari_screenshot.py docs/napari.png
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(out: str) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from ppm_core.io import atomic_path
    from ppm_napari._sample_data import biosr_widefield
    from ppm_napari.widget import ReconstructionWidget

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    ((data, meta, _),) = biosr_widefield()
    viewer.add_image(data, **meta)
    widget = ReconstructionWidget(viewer)
    viewer.window.add_dock_widget(widget, name="PPM super-resolution", area="right")
    widget.psf_source.value = "OTF file"
    widget.otf_file.value = str(Path(__file__).resolve().parents[1] / "sample_data" / "biosr_mt" / "TIRF488_cam1_0_z30_OTF2d.mrc")
    widget.run()
    app = QApplication.instance()
    while widget.worker is not None:
        app.processEvents()
        time.sleep(0.05)
    name = meta["name"]
    for layer_name in (f"{name} samples", name):
        viewer.layers[layer_name].visible = False
    viewer.layers[f"{name} std"].visible = False
    viewer.grid.enabled = False
    viewer.reset_view()
    app.processEvents()
    image = viewer.screenshot(canvas_only=False, flash=False)
    from PIL import Image

    with atomic_path(out) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/napari.png"))
