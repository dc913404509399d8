"""PPM Imaging core: diffusion priors, forward operators and posterior inference."""

from .inference import Posterior, ReconstructionCancelled, reconstruct

__version__ = "0.1.0"
__all__ = ["Posterior", "ReconstructionCancelled", "reconstruct", "__version__"]
