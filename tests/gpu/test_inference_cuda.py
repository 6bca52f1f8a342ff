"""inference.py on CUDA in each precision it offers, and with CPU offload."""

import numpy as np
import pytest
from PIL import Image

from gpu.conftest import GPU

pytestmark = GPU


@pytest.mark.parametrize("flags", [["--dtype", "bf16"], ["--dtype", "fp16"],
                                   ["--dtype", "bf16", "--enable_model_cpu_offload"]], ids=["bf16", "fp16", "offload"])
def test_edit_on_cuda(tiny_ip2p, tmp_path, flags):
    from inference import main

    photo, out = tmp_path / "photo.png", tmp_path / "out.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 64), Image.NEAREST).save(photo)
    assert main(["--model_path", str(tiny_ip2p), "--input_image", str(photo), "--instruction", "make it blue",
                 "--output_path", str(out), "--num_inference_steps", "2", "--resolution", "64", "--device", "cuda",
                 *flags]) == 0
    pixels = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0  # NaNs (an fp16 overflow) decode to one colour
