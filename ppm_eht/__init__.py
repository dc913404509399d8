"""PPM Imaging for VLBI: black-hole imaging with posterior uncertainty from uvfits files.

``reconstruct_uvfits(path)`` draws posterior samples of the Stokes I image from the closure
phases and log closure amplitudes of an observation under the shipped ring prior, and returns
them with ehtim ``Image`` views, per-sample chi-squares and ring features. The command line is
``ppm eht reconstruct | rml | simulate``.
"""

from .features import RingFeatures, ring_features
from .reconstruct import VLBIPosterior, reconstruct_obs, reconstruct_uvfits

__all__ = ["RingFeatures", "VLBIPosterior", "reconstruct_obs", "reconstruct_uvfits", "ring_features"]
