"""difusion: diffusion models from the noise schedule to text-to-image."""

__version__ = "0.1.0"
