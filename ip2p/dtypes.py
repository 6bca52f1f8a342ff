"""Precision names as the flags spell them, and their torch dtypes: one table for every stage.

`no` is accelerate's name for "no mixed precision" (fp32); the long names are torch's own.
`INFERENCE_DTYPES` are the names inference and evaluation take for --dtype.
"""

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "no": torch.float32,
          "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
INFERENCE_DTYPES = tuple(name for name in DTYPES if name != "no")
