"""Reading images and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
FITS_SUFFIXES = (".fits", ".fit", ".fts")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + FITS_SUFFIXES + RASTER_SUFFIXES


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and an existing file survives a failed write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates mode 0600 (and writers may recreate the file): give the result the
        # permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF, FITS or PNG/JPEG image as a float32 array.

    Returns
    -------
    (H, W) or (C, H, W) ndarray
        Singleton axes are dropped; RGB(A) rasters come back channel-first.

    Raises
    ------
    FileNotFoundError, ValueError
        When the file is missing, empty, corrupt, not an image or contains NaN/inf.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty: {path}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported image suffix {suffix!r} for {path}; allowed: {', '.join(IMAGE_SUFFIXES)}")
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            data = tifffile.imread(path)
        elif suffix in FITS_SUFFIXES:
            from astropy.io import fits

            with fits.open(path, memmap=False) as hdul:
                hdu = next((h for h in hdul if h.data is not None and h.is_image), None)
                data = None if hdu is None else np.asarray(hdu.data)
        else:
            from PIL import Image

            with Image.open(path) as img:
                data = np.asarray(img)
            if data.ndim == 3:
                data = np.moveaxis(data, -1, 0)
    except Exception as exc:  # the readers raise many types for corrupt files, ValueError among them
        raise ValueError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if data is None:
        raise ValueError(f"FITS file has no image HDU: {path}")

    data = np.squeeze(np.asarray(data))
    if data.ndim not in (2, 3) or data.size == 0:
        raise ValueError(f"image {path} must be 2-D (H, W) or 3-D (C, H, W) after dropping singleton axes; got shape {data.shape}")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise ValueError(f"image {path} has non-numeric dtype {data.dtype}")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise ValueError(f"image {path} contains NaN or infinite values")
    return data


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a (H, W) or (H, W, 3) array in [0, 1] as an 8-bit PNG, atomically."""
    from PIL import Image

    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    with atomic_path(path) as tmp:
        Image.fromarray((image * 255 + 0.5).astype(np.uint8)).save(tmp, format="PNG")
    return Path(path)
