"""Image <-> tensor conversion (diffusers' VaeImageProcessor) keeps the reference code's definition exactly."""

import numpy as np
import torch
from PIL import Image

from attencraft_core.images import image_to_tensor, tensor_to_image


def test_image_to_tensor_is_bicubic_resize_then_minus_one_to_one():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = torch.from_numpy(resized / 127.5 - 1.0).permute(2, 0, 1)[None]
    assert torch.equal(image_to_tensor(image, 64), expected)


def test_tensor_to_image_rounds_and_clamps_as_before():
    tensor = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    expected = ((tensor[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), expected)
    assert np.array_equal(np.asarray(tensor_to_image(tensor[0])), expected)  # [3, H, W] too
