"""PNG rendering for the technologist console: slice thumbnails, heat-map overlays, montages.

Pure numpy + Pillow, so the web side never imports TensorFlow. Inputs are preprocess output
(already windowed, float in [0, 1]) and HeatMapper maps (float in [0, 1]).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A hot ramp (violet, crimson, orange, yellow, pale yellow) whose luminance rises at every step,
# so stronger heat always reads as brighter (unlike jet, whose cyan outshines its red).
_RAMP_AT = np.array([0.0, 0.35, 0.65, 0.85, 1.0])
_RAMP_RGB = np.array(
    [[60, 20, 130], [200, 30, 60], [250, 120, 20], [255, 210, 40], [255, 255, 200]], np.float64
)


def _plane(image: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, 1] -> float32 [H, W] clipped to [0, 1] (NaN as 0)."""
    a = np.asarray(image, np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"expected a [H, W] or [H, W, 1] image, got shape {a.shape}")
    return np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Float resize to size x size (Lanczos in mode "F": no 8-bit rounding before filtering;
    its slight ringing is clipped)."""
    a = _plane(image)
    if a.shape != (size, size):
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.LANCZOS))
    return np.clip(a, 0.0, 1.0)


def _colours(heat: np.ndarray) -> np.ndarray:
    """[..] heat in [0, 1] -> [.., 3] RGB in 0..255 (float) along the ramp."""
    return np.stack([np.interp(heat, _RAMP_AT, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)


def _to_byte(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def thumbnail_png(image: np.ndarray, size: int) -> bytes:
    """8-bit greyscale PNG of a windowed slice, resized to size x size."""
    return _png(_to_byte(_resize(image, size) * 255.0))


def heatmap_png(heat: np.ndarray, size: int, alpha_max: float = 0.6) -> bytes:
    """RGBA PNG to lay over the thumbnail (CSS): colour along the ramp, opacity proportional to
    the heat (fully transparent where there is none), at most ``alpha_max``."""
    h = _resize(heat, size)
    rgba = np.concatenate([_colours(h), (255.0 * alpha_max * h)[..., None]], axis=-1)
    return _png(_to_byte(rgba))


def montage_png(
    tiles: list[np.ndarray],
    heats: list[np.ndarray] | None,
    columns: int,
    tile: int,
    alpha_max: float = 0.6,
) -> bytes:
    """RGB PNG grid of slices, row by row, each tile x tile, with the heat blended in as
    heatmap_png would show it. min(columns, len(tiles)) columns; empty cells stay black."""
    if not tiles or columns < 1 or tile < 1:
        raise ValueError(f"montage of {len(tiles)} tiles, {columns} columns, {tile} px each")
    if heats is not None and len(heats) != len(tiles):
        raise ValueError(f"{len(heats)} heat maps for {len(tiles)} tiles")
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    canvas = np.zeros((rows * tile, cols * tile, 3), np.float64)
    for i, image in enumerate(tiles):
        rgb = np.repeat(_resize(image, tile)[..., None] * 255.0, 3, axis=-1)
        if heats is not None:
            h = _resize(heats[i], tile)[..., None]
            alpha = alpha_max * h
            rgb = rgb * (1.0 - alpha) + _colours(h[..., 0]) * alpha
        r, c = divmod(i, cols)
        canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = rgb
    return _png(_to_byte(canvas))
