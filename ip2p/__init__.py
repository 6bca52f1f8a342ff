"""InstructPix2Pix on Stable Diffusion XL: convert data, train, edit photos.

The package holds every stage's logic; the top-level scripts only parse arguments and call it.
"""

__version__ = "0.1.0"

from ip2p.quiet import install as _quiet_third_party

_quiet_third_party()  # before any stage imports the libraries whose start-up messages it drops
