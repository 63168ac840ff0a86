"""difusion: diffusion models from the noise schedule to text-to-image."""

__version__ = "0.1.0"

from .pipeline import Pipeline  # noqa: E402

__all__ = ["Pipeline", "__version__"]
