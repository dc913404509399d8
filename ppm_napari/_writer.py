"""napari writer: the mean, std and samples layers of one PPM result as one OME-TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_result_layers(path: str, layer_data: list[tuple]) -> list[str]:
    """Write the result layers (identified by ``metadata["ppm_role"]``) with their pixel size and run parameters.

    Raises ``ValueError`` when the layers are not one complete PPM result.
    """
    from .io import write_result

    roles = {}
    for data, meta, _ in layer_data:
        role = (meta.get("metadata") or {}).get("ppm_role")
        if role is None:
            raise ValueError(f"layer {meta.get('name')!r} is not a PPM result layer; select the mean, std and samples layers of one run")
        roles[role] = (np.asarray(data), meta)
    missing = {"mean", "std", "samples"} - set(roles)
    if missing:
        raise ValueError(f"a PPM result needs its mean, std and samples layers; missing: {', '.join(sorted(missing))}")
    sources = {m["metadata"].get("ppm_source") for _, m in roles.values()}
    if len(sources) != 1:
        raise ValueError(f"the selected layers come from different runs: {sorted(map(str, sources))}")
    mean, meta = roles["mean"]
    scale = meta.get("scale") or (1.0, 1.0)
    pixel_nm = float(scale[-1]) * 1e3
    parameters = dict(meta["metadata"].get("parameters") or {})
    written = write_result(Path(path), mean, roles["std"][0], roles["samples"][0], pixel_nm, parameters)
    return [str(written)]
