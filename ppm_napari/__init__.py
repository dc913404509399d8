"""PPM Imaging for microscopy: PSF models, the super-resolution forward model, the filament prior,
and the napari plugin.

Everything outside ``ppm_napari.widget`` is free of Qt and napari, so scripts and the ``ppm micro``
command use it without a display.
"""
