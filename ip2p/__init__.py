"""InstructPix2Pix on Stable Diffusion XL: convert data, train, edit photos.

The package holds every stage's logic; the top-level scripts only parse arguments and call it.
"""

__version__ = "0.1.0"
