"""Shared pieces for comparing our preprocessing with transformers': the real Qwen3-VL-2B processor
configs, a one-line-error assertion, and a stand-in for the torchvision functions transformers'
video pipeline calls (torchvision does not import beside the CPU torch wheel)."""

from __future__ import annotations

import enum
import types

import numpy as np
import pytest
import torch
from PIL import Image

# Qwen3-VL-2B-Instruct's preprocessor_config.json / video_preprocessor_config.json.
IMAGE_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
VIDEO_CONFIG = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}
HF_VIDEO_KWARGS = {k: v for k, v in VIDEO_CONFIG.items() if not k.endswith(("_class", "_type"))}


def one_line_error(exc, fn, pattern):
    """fn() raises exc with a message matching pattern, on one line."""
    with pytest.raises(exc, match=pattern) as err:
        fn()
    assert "\n" not in str(err.value)
    return err.value


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def pil_resize(x, size, interpolation, antialias=True):
    """torchvision's resize, done with PIL's bicubic (what our video path uses)."""
    assert interpolation is InterpolationMode.BICUBIC and x.dtype == torch.uint8
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    frames = x.reshape(-1, c, h, w).permute(0, 2, 3, 1).numpy()
    out = np.stack([np.asarray(Image.fromarray(f).resize((size[1], size[0]), resample=3)) for f in frames])
    return torch.from_numpy(out).permute(0, 3, 1, 2).reshape(*lead, c, *size)


def _normalize(x, mean, std, inplace=False):  # torchvision.transforms.v2.functional.normalize
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x.sub_(mean) if inplace else x.sub(mean)).div_(std)


def _grayscale_to_rgb(x):
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x


def install_torchvision_stand_in(monkeypatch, resize=pil_resize):
    import transformers.image_processing_backends as hf_backends
    import transformers.video_processing_utils as hf_video_utils

    tvf = types.SimpleNamespace(InterpolationMode=InterpolationMode, resize=resize, normalize=_normalize,
                                grayscale_to_rgb=_grayscale_to_rgb)
    monkeypatch.setattr(hf_backends, "tvF", tvf, raising=False)
    monkeypatch.setattr(hf_video_utils, "tvF", tvf, raising=False)
    monkeypatch.setattr(hf_backends, "pil_torch_interpolation_mapping", {3: InterpolationMode.BICUBIC})
