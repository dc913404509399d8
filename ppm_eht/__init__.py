"""PPM Imaging for VLBI: ehtim data products, differentiable closure operators, black-hole priors.

The data products and operators are built and checked against ehtim. The prior, the ``ppm eht``
command and the M87 demo are not built yet.
"""
