"""napari sample data: the bundled BioSR widefield image (mean of 9 raw SIM frames, 62.6 nm pixels)."""

from __future__ import annotations

from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data" / "biosr_mt"


def biosr_widefield() -> list[tuple]:
    from .io import read_widefield

    path = SAMPLE_DATA / "MT_Cell001_crop007_rawSIM_level09.tif"
    if not path.is_file():
        raise FileNotFoundError(f"sample data not found at {path}; it ships with the source checkout (sample_data/)")
    image, frames = read_widefield(path)
    meta = {
        "name": "BioSR microtubules, widefield",
        "scale": (0.0626, 0.0626),
        "metadata": {"pixel_size_nm": 62.6, "source_file": str(path), "frames_averaged": frames,
                     "citation": "Qiao et al., Nat. Methods 18, 194-202 (2021), BioSR"},
    }
    return [(image.astype("float32"), meta, "image")]
