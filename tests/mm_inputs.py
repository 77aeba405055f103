"""Builders of multimodal prompts in Hugging Face's input format for the tiny test vocabularies."""

from __future__ import annotations

import numpy as np

from hf_models import SPECIAL

IMG, VID, VS, VE = (SPECIAL[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id"))
TEXT_VOCAB = 290  # ordinary tokens are drawn below the special ids


def patch_dim(hf_cfg) -> int:
    v = hf_cfg.vision_config
    return v.in_channels * v.temporal_patch_size * v.patch_size ** 2


class PromptBuilder:
    """Accumulates one sequence: text, images and videos (one <vision_start> pads <vision_end> run
    per image, and per temporal step of a video with a timestamp-like text before it)."""

    def __init__(self, rng: np.random.RandomState, merge: int = 2):
        self.rng, self.merge = rng, merge
        self.ids: list[int] = []
        self.image_grids: list[tuple[int, int, int]] = []
        self.video_grids: list[tuple[int, int, int]] = []

    def text(self, n: int) -> "PromptBuilder":
        self.ids += list(self.rng.randint(0, TEXT_VOCAB, size=n))
        return self

    def image(self, h: int, w: int) -> "PromptBuilder":
        self.image_grids.append((1, h, w))
        self.ids += [VS] + [IMG] * (h * w // self.merge ** 2) + [VE]
        return self

    def video(self, t: int, h: int, w: int) -> "PromptBuilder":
        self.video_grids.append((t, h, w))
        for _ in range(t):
            self.text(3)  # stands in for "<1.5 seconds>"
            self.ids += [VS] + [VID] * (h * w // self.merge ** 2) + [VE]
        return self


def batch_inputs(builders: list[PromptBuilder], dim: int, rng: np.random.RandomState, pad_side: str = "left"):
    """HF-style numpy inputs for a batch of prompts, padded with token 0."""
    t = max(len(b.ids) for b in builders)
    ids = np.zeros((len(builders), t), np.int64)
    mask = np.zeros_like(ids)
    for i, b in enumerate(builders):
        n = len(b.ids)
        sl = slice(t - n, t) if pad_side == "left" else slice(0, n)
        ids[i, sl] = b.ids
        mask[i, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask,
           "mm_token_type_ids": np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))}
    img = [g for b in builders for g in b.image_grids]
    vid = [g for b in builders for g in b.video_grids]
    if img:
        out["image_grid_thw"] = np.array(img, np.int64)
        out["pixel_values"] = rng.uniform(-1, 1, size=(int(np.prod(img, -1).sum()), dim)).astype(np.float32)
    if vid:
        out["video_grid_thw"] = np.array(vid, np.int64)
        out["pixel_values_videos"] = rng.uniform(-1, 1, size=(int(np.prod(vid, -1).sum()), dim)).astype(np.float32)
    return out


def torch_logits(model, inputs: dict) -> np.ndarray:
    import torch

    kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**kwargs).logits.numpy()
