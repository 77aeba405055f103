"""3-D rotary positions (t, h, w) for mixed text / image / video prompts, computed on the host.

Text tokens advance all three axes together. A run of vision tokens (one image, or one temporal step
of a video: each step is its own run because the prompt puts a timestamp between steps) takes
positions start + (t, row, col) over its merged grid, and the text after it resumes at
start + max(rows, cols). Padding (attention_mask == 0) is skipped and gets position 0.
`rope_delta` = max position + 1 - number of real tokens: decoding continues at cache index + delta.
"""

from __future__ import annotations

import numpy as np

from qvl_jax.errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """HF's mm_token_type_ids: 0 text, 1 image pad, 2 video pad."""
    return np.where(input_ids == image_token_id, IMAGE, np.where(input_ids == video_token_id, VIDEO, TEXT))


def _runs(types: np.ndarray) -> list[tuple[int, int, int]]:
    """(type, start, end) of each maximal run of equal token types."""
    if len(types) == 0:
        return []
    cuts = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(types)]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def rope_index(mm_token_type_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray | None,
               video_grid_thw: np.ndarray | None, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """positions [3, b, t] int32 and rope_delta [b] int32.

    Image grids are consumed in order by the image runs of the whole batch (row-major), video grids by
    the video runs, one temporal step per run; a run whose length does not match its grid is an error.
    """
    b, t = mm_token_type_ids.shape
    grids = {
        IMAGE: list(image_grid_thw) if image_grid_thw is not None else [],
        # Timestamps split a video into one run per temporal step.
        VIDEO: [(1, h, w) for (n, h, w) in video_grid_thw for _ in range(n)] if video_grid_thw is not None else [],
    }
    used = {IMAGE: 0, VIDEO: 0}
    names = {IMAGE: "image", VIDEO: "video"}
    positions = np.zeros((3, b, t), np.int64)
    deltas = np.zeros(b, np.int64)
    m = spatial_merge_size
    for row in range(b):
        real = attention_mask[row].astype(bool)
        types = mm_token_type_ids[row][real]
        pieces, cur = [], 0
        for kind, start, end in _runs(types):
            n = end - start
            if kind == TEXT:
                pieces.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
                cur += n
                continue
            if used[kind] >= len(grids[kind]):
                raise InputError(f"the prompt has more {names[kind]} placeholder runs than {names[kind]} grids "
                                 f"({len(grids[kind])} given)")
            gt, gh, gw = (int(v) for v in grids[kind][used[kind]])
            used[kind] += 1
            lt, lh, lw = gt, gh // m, gw // m
            if lt * lh * lw != n:
                raise InputError(f"{names[kind]} {used[kind] - 1}: {n} placeholder tokens in the prompt but its grid "
                                 f"{[gt, gh, gw]} gives {lt * lh * lw} features")
            tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
            cur += max(lh, lw)
        pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, row, real] = pos
        deltas[row] = (pos.max() + 1 if pos.size else 0) - int(real.sum())
    for kind in (IMAGE, VIDEO):
        if used[kind] != len(grids[kind]):
            raise InputError(f"{len(grids[kind])} {names[kind]} grid(s) given but the prompt has placeholder "
                             f"runs for {used[kind]}")
    return positions.astype(np.int32), deltas.astype(np.int32)
