"""The inputs tests/multihost_worker.py feeds every process (identical on each): a batch of two
rows, the first with an image, the second shorter (left padding), and the same batch with labels."""

from __future__ import annotations

import numpy as np


def batch(config) -> dict:
    rng = np.random.default_rng(0)
    v = config.vision
    grid = (1, 4, 4)  # one image of 4 x 4 patches: 4 tokens after the 2 x 2 merge
    n_img = grid[1] * grid[2] // v.spatial_merge_size ** 2
    row0 = ([*rng.integers(3, 300, 3)] + [config.vision_start_token_id] + [config.image_token_id] * n_img
            + [config.vision_end_token_id] + [*rng.integers(3, 300, 4)])
    row1 = [*rng.integers(3, 300, 8)]
    t = len(row0)
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros_like(ids)
    ids[0], mask[0] = row0, 1
    ids[1, t - len(row1):], mask[1, t - len(row1):] = row1, 1
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    pixels = rng.standard_normal((grid[1] * grid[2], patch)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_grid_thw": np.array([grid], np.int64)}


def train_batch(config) -> dict:
    b = batch(config)
    labels = np.where(b["attention_mask"] > 0, b["input_ids"], -100)
    labels[1, np.argmax(b["attention_mask"][1])] = -100  # the first real token of a padded row: no prediction
    return dict(b, labels=labels)
