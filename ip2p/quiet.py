"""Third-party messages that mean nothing to this kit's users, dropped where they are logged.

Each is a known, harmless message of a library the kit imports, printed at every start:
- bitsandbytes: its optional 4-bit CPU kernels are missing (the kit never quantises to 4 bit);
- DeepSpeed, when installed on a machine without a GPU: it picked its CPU accelerator;
- transformers without torchvision: it uses the PIL image processor (what the kit wants);
- diffusers: a cast "should keep [] in float32", an empty list (nothing is affected).
Only these exact messages are dropped; everything else those loggers say still shows.
"""

from __future__ import annotations

import logging

NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "DeepSpeed": ("Setting accelerator to CPU",),
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
}


class DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def install() -> None:
    """Attach the filters to the exact loggers (a filter on a parent logger does not see the
    records its children log), before the libraries are imported; safe to call twice."""
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(fragments))
