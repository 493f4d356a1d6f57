"""The model card's picture of the per-layer error: a heat map, decoder layers x module kinds.

Each cell is one quantized Linear (say layer 7's down_proj), coloured by its
error as the manifest records it: the relative output error
||(W - Q) X||^2 / ||W X||^2 on the calibration inputs (the relative weight
error ||W - Q||^2 / ||W||^2 for a method without calibration). The colour
scale is logarithmic when the errors span more than a factor of 20, and a
colour bar gives its values. Pure: manifest in, standalone SVG text out.
"""

from __future__ import annotations

import math
import re
from html import escape

LAYER_ERRORS_FILE = "layer_errors.svg"
OUTPUT_ERROR = "relative output error ||(W-Q)X||² / ||WX||² on the calibration inputs"
WEIGHT_ERROR = "relative weight error ||W-Q||² / ||W||² (no calibration inputs)"
ERROR_MEANING = f"{OUTPUT_ERROR} (without calibration: {WEIGHT_ERROR.split(' (')[0]})"
# rows in the order a decoder layer runs them; kinds not listed follow, alphabetically
KIND_ORDER = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"]
# viridis, reversed: low error light yellow, high error dark purple
COLOUR_STOPS = ["#fde725", "#5ec962", "#21918c", "#3b528b", "#440154"]
NO_VALUE = "#eeeeee"
LOG_SCALE_SPAN = 20.0  # max / min above this: colour by log(error)


def layer_errors(manifest: dict) -> list[tuple[str, float]]:
    """(module name, error) in the manifest's (quantization) order, finite errors only."""
    out = []
    for name, info in (manifest.get("layers") or {}).items():
        error = info.get("error") if isinstance(info, dict) else None
        if isinstance(error, (int, float)) and math.isfinite(error):
            out.append((name, float(error)))
    return out


def split_name(module: str) -> tuple[int | None, str]:
    """'model.layers.7.mlp.down_proj' -> (7, 'mlp.down_proj'); no layer number -> (None, name)."""
    match = re.search(r"\.(\d+)\.(.+)$", module)
    return (int(match.group(1)), match.group(2)) if match else (None, module)


def kind_order(kind: str) -> tuple[int, str]:
    last = kind.rsplit(".", 1)[-1]
    return (KIND_ORDER.index(last) if last in KIND_ORDER else len(KIND_ORDER), kind)


def colour(fraction: float) -> str:
    """The colour at fraction 0..1 along COLOUR_STOPS, linearly interpolated."""
    fraction = min(max(fraction, 0.0), 1.0) * (len(COLOUR_STOPS) - 1)
    low = min(int(fraction), len(COLOUR_STOPS) - 2)
    a, b = COLOUR_STOPS[low], COLOUR_STOPS[low + 1]
    t = fraction - low
    channels = [round(int(a[i : i + 2], 16) * (1 - t) + int(b[i : i + 2], 16) * t) for i in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in channels)


def error_scale(errors: list[float]):
    """(fraction of an error along the colour bar, whether the scale is logarithmic)."""
    positive = [e for e in errors if e > 0]
    low, high = (min(positive), max(positive)) if positive else (0.0, 1.0)
    logarithmic = bool(positive) and high / low > LOG_SCALE_SPAN
    if logarithmic:
        span = math.log(high / low)
        return (lambda e: math.log(max(e, low) / low) / span), True
    low, high = (min(errors), max(errors)) if errors else (0.0, 1.0)
    return (lambda e: (e - low) / (high - low) if high > low else 0.5), False


def layer_error_svg(manifest: dict, method_name: str = "") -> str:
    errors = layer_errors(manifest)
    cells = {split_name(name): (name, error) for name, error in errors}
    layers = sorted({layer for layer, _ in cells if layer is not None})
    kinds = sorted({kind for _, kind in cells}, key=kind_order)
    cell_w = max(8, min(28, 620 // max(len(layers), 1)))
    cell_h = 22
    left, top = 130, 44
    grid_w, grid_h = cell_w * max(len(layers), 1), cell_h * max(len(kinds), 1)
    width = max(left + grid_w + 30, 520)
    height = top + grid_h + 120
    title = "Per-layer quantization error" + (f" ({method_name})" if method_name else "")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<text x="{width / 2}" y="34" text-anchor="middle" fill="#444">each cell: one Linear; '
        'colour: its error (darker = larger)</text>',
    ]
    if not errors:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no per-layer errors recorded</text>')
        return "\n".join(parts + ["</svg>"]) + "\n"

    fraction, logarithmic = error_scale([error for _, error in errors])
    for row, kind in enumerate(kinds):
        y = top + row * cell_h
        parts.append(f'<text x="{left - 6}" y="{y + cell_h / 2 + 4}" text-anchor="end">{escape(kind)}</text>')
        for col, layer in enumerate(layers or [None]):
            name, error = cells.get((layer, kind), (None, None))
            fill = NO_VALUE if error is None else colour(fraction(error))
            tip = f"<title>{escape(name)}: {error:.4g}</title>" if name else ""
            parts.append(f'<rect x="{left + col * cell_w}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" '
                         f'fill="{fill}">{tip}</rect>')
    axis_y = top + grid_h + 14
    label_every = max(1, math.ceil(len(layers) / 16))
    for col, layer in enumerate(layers):
        last = col == len(layers) - 1
        if (col % label_every == 0 and not (col + label_every > len(layers) - 1 and not last)) or last:
            parts.append(f'<text x="{left + col * cell_w + cell_w / 2}" y="{axis_y}" text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{left + grid_w / 2}" y="{axis_y + 16}" text-anchor="middle">decoder layer</text>')
    parts += _colour_bar([error for _, error in errors], fraction, logarithmic, left, axis_y + 34)
    meaning = OUTPUT_ERROR if isinstance(manifest.get("calibration"), dict) else WEIGHT_ERROR
    parts.append(f'<text x="10" y="{height - 8}" fill="#444">error = {escape(meaning)}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def _colour_bar(errors: list[float], fraction, logarithmic: bool, x: int, y: float) -> list[str]:
    """The legend: a strip of the colour scale with the smallest, middle and largest error under it."""
    width, steps = 300, 30
    parts = [f'<text x="{x - 6}" y="{y + 11}" text-anchor="end">error{" (log scale)" if logarithmic else ""}</text>']
    parts += [f'<rect x="{x + i * width / steps:.1f}" y="{y}" width="{width / steps + 0.5:.1f}" height="14" '
              f'fill="{colour(i / (steps - 1))}"/>' for i in range(steps)]
    low, high = min(errors), max(errors)
    middle = math.sqrt(low * high) if logarithmic else (low + high) / 2
    for value in (low, middle, high):
        tick = x + width * fraction(value)
        parts.append(f'<text x="{tick:.1f}" y="{y + 28}" text-anchor="middle">{value:.3g}</text>')
    return parts
