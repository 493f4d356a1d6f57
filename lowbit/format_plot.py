"""The model card's picture of what a size budget (`--target-bpw`) chose: decoder layers x module kinds,
each cell one Linear coloured by its format (bits, group size, or left in 16 bits), with a legend.

Pure: manifest in (its "layers" entries carry "bits" and "group_size" once a budget chose), SVG text out.
"""

from __future__ import annotations

from html import escape

from lowbit.error_plot import kind_order, split_name

FORMATS_FILE = "formats.svg"
# light to dark as a format spends more bits: the base is the palest
PALETTE = ["#f7fbff", "#9ecae1", "#4292c6", "#08519c", "#08306b", "#000000"]


def chosen_formats(manifest: dict) -> dict[str, tuple[int, int | None]]:
    """Module -> (bits, group size) as the budget chose; empty when the run had no budget."""
    if (manifest.get("settings") or {}).get("target_bpw") is None:
        return {}
    return {name: (info["bits"], info.get("group_size")) for name, info in (manifest.get("layers") or {}).items()
            if isinstance(info, dict) and "bits" in info}


def format_label(bits: int, group_size: int | None, method: str = "gptq") -> str:
    if bits == 16:
        return "16-bit (unquantized)"
    if method in ("nf4", "fp4"):
        return f"{method.upper()}"
    return f"{bits}-bit, group {group_size}" if group_size != -1 else f"{bits}-bit, one group"


def legend_order(formats: set[tuple[int, int | None]]) -> list[tuple[int, int | None]]:
    """Cheapest first: fewer bits, then coarser groups (-1 is coarsest)."""
    return sorted(formats, key=lambda f: (f[0], -(f[1] if f[1] and f[1] > 0 else 10**9)))


def format_map_svg(manifest: dict) -> str:
    formats = chosen_formats(manifest)
    method = manifest.get("method", "gptq")
    cells = {split_name(name): fmt for name, fmt in formats.items()}
    layers = sorted({layer for layer, _ in cells if layer is not None})
    kinds = sorted({kind for _, kind in cells}, key=kind_order)
    order = legend_order(set(formats.values()))
    fill = {fmt: PALETTE[min(i, len(PALETTE) - 1)] for i, fmt in enumerate(order)}
    cell_w = max(8, min(28, 620 // max(len(layers), 1)))
    cell_h, left, top = 22, 130, 44
    grid_w, grid_h = cell_w * max(len(layers), 1), cell_h * max(len(kinds), 1)
    width = max(left + grid_w + 30, 520)
    height = top + grid_h + 50 + 18 * len(order)
    bpw = manifest.get("bits_per_weight")
    target = (manifest.get("settings") or {}).get("target_bpw")
    subtitle = f"budget {target:g} bits per weight, {bpw:.3f} used" if target and bpw else "each cell: one Linear"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">Format of each Linear</text>',
        f'<text x="{width / 2}" y="34" text-anchor="middle" fill="#444">{escape(subtitle)}</text>',
    ]
    for row, kind in enumerate(kinds):
        y = top + row * cell_h
        parts.append(f'<text x="{left - 6}" y="{y + cell_h / 2 + 4}" text-anchor="end">{escape(kind)}</text>')
        for col, layer in enumerate(layers):
            fmt = cells.get((layer, kind))
            colour = "#eeeeee" if fmt is None else fill[fmt]
            tip = f"<title>layer {layer} {escape(kind)}: {escape(format_label(*fmt, method))}</title>" if fmt else ""
            parts.append(f'<rect x="{left + col * cell_w}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" '
                         f'fill="{colour}" stroke="#cccccc" stroke-width="0.5">{tip}</rect>')
    axis_y = top + grid_h + 14
    label_every = max(1, -(-len(layers) // 16))
    for col, layer in enumerate(layers):
        if col % label_every == 0 or col == len(layers) - 1:
            parts.append(f'<text x="{left + col * cell_w + cell_w / 2}" y="{axis_y}" text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{left + grid_w / 2}" y="{axis_y + 16}" text-anchor="middle">decoder layer</text>')
    for i, fmt in enumerate(order):
        y = axis_y + 30 + 18 * i
        count = sum(1 for f in formats.values() if f == fmt)
        parts.append(f'<rect x="{left}" y="{y}" width="14" height="14" fill="{fill[fmt]}" stroke="#888"/>')
        base = " (base)" if fmt[0] == (manifest.get("settings") or {}).get("bits", 4) and (
            method in ("nf4", "fp4") or fmt[1] == (manifest.get("settings") or {}).get("group_size")) else ""
        parts.append(f'<text x="{left + 20}" y="{y + 11}">{escape(format_label(*fmt, method))}{base}: '
                     f'{count} Linears</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def format_table(manifest: dict) -> list[str]:
    """Markdown rows: one per decoder layer, one column per module kind, each cell the format's bits
    (and group size where it differs from the base's)."""
    formats = chosen_formats(manifest)
    cells = {split_name(name): fmt for name, fmt in formats.items()}
    layers = sorted({layer for layer, _ in cells if layer is not None})
    kinds = sorted({kind for _, kind in cells}, key=kind_order)
    settings = manifest.get("settings") or {}
    base_group = settings.get("group_size")

    def text(fmt):
        if fmt is None:
            return ""
        bits, group = fmt
        return str(bits) if bits == 16 or group == base_group or manifest.get("method") in ("nf4", "fp4") \
            else f"{bits} (g{group})"

    lines = ["| layer | " + " | ".join(kind.rsplit(".", 1)[-1] for kind in kinds) + " |",
             "|---" * (len(kinds) + 1) + "|"]
    lines += [f"| {layer} | " + " | ".join(text(cells.get((layer, kind))) for kind in kinds) + " |" for layer in layers]
    return lines


def format_text_table(formats: dict[str, dict[str, str]]) -> list[str]:
    """Layers x Linears, each cell its format (4g128: 4-bit codes in groups of 128; 16: unquantized)."""
    modules = list(next(iter(formats.values())))
    header = ["layer", *(m.rsplit(".", 1)[-1] for m in modules)]
    rows = [[layer, *(formats[layer][m] for m in modules)] for layer in formats]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    return ["formats by layer:"] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                                    for row in [header, *rows]]
