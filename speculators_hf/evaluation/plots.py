"""Line charts as PNG files, with no plotting library: a numpy canvas, a 5x7 bitmap font and a zlib PNG encoder.

matplotlib is not a dependency of this package (nor of vLLM), and an eval card should have its plots wherever
`speculators-hf evaluate --grid` runs, so the few charts the eval card needs are drawn here: lines with markers, axes
with ticks, a legend, a dashed reference line. `line_chart` draws one panel; `write_figure` lays panels side by side.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils import atomic_path

# The classic 5x7 LCD font, ASCII 32..126: 5 columns per glyph, bit 0 = top row.
_FONT = bytes.fromhex(
    "0000000000"
    "00005f0000"
    "0007000700"
    "147f147f14"
    "242a7f2a12"
    "2313086462"
    "3649552250"
    "0005030000"
    "001c224100"
    "0041221c00"
    "082a1c2a08"
    "08083e0808"
    "0050300000"
    "0808080808"
    "0060600000"
    "2010080402"
    "3e5149453e"
    "00427f4000"
    "4261514946"
    "2141454b31"
    "1814127f10"
    "2745454539"
    "3c4a494930"
    "0171090503"
    "3649494936"
    "064949291e"
    "0036360000"
    "0056360000"
    "0008142241"
    "1414141414"
    "4122140800"
    "0201510906"
    "324979413e"
    "7e1111117e"
    "7f49494936"
    "3e41414122"
    "7f4141221c"
    "7f49494941"
    "7f09090101"
    "3e41415132"
    "7f0808087f"
    "00417f4100"
    "2040413f01"
    "7f08142241"
    "7f40404040"
    "7f0204027f"
    "7f0408107f"
    "3e4141413e"
    "7f09090906"
    "3e4151215e"
    "7f09192946"
    "4649494931"
    "01017f0101"
    "3f4040403f"
    "1f2040201f"
    "7f2018207f"
    "6314081463"
    "0304780403"
    "6151494543"
    "00007f4141"
    "0204081020"
    "41417f0000"
    "0402010204"
    "4040404040"
    "0001020400"
    "2054545478"
    "7f48444438"
    "3844444420"
    "384444487f"
    "3854545418"
    "087e090102"
    "081454543c"
    "7f08040478"
    "00447d4000"
    "2040443d00"
    "007f102844"
    "00417f4000"
    "7c0418047c"
    "7c08040478"
    "3844444438"
    "7c14141408"
    "081414187c"
    "7c08040408"
    "4854545420"
    "043f444020"
    "3c4040207c"
    "1c2040201c"
    "3c4030403c"
    "4428102844"
    "0c5050503c"
    "4464544c44"
    "0008364100"
    "00007f0000"
    "0041360800"
    "08082a1c08"
)
GLYPH_W, GLYPH_H = 5, 7
# Colours of the lines, in order (colour-blind safe: Okabe-Ito).
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0)]
INK, GRID, MUTED, WHITE = (34, 34, 34), (226, 226, 226), (120, 120, 120), (255, 255, 255)


def _glyph(char: str) -> np.ndarray:
    """The `[7, 5]` bool bitmap of a character ('?' for one outside ASCII 32..126)."""
    code = ord(char) if 32 <= ord(char) <= 126 else ord("?")
    columns = _FONT[(code - 32) * GLYPH_W : (code - 31) * GLYPH_W]
    return np.array([[(col >> row) & 1 for col in columns] for row in range(GLYPH_H)], dtype=bool)


def text_mask(text: str, scale: int = 2) -> np.ndarray:
    """The bool mask `[7 * scale, 6 * scale * len(text)]` of a line of text (one blank column between glyphs)."""
    if not text:
        return np.zeros((GLYPH_H * scale, 0), dtype=bool)
    cells = [np.pad(_glyph(c), ((0, 0), (0, 1))) for c in text]
    return np.kron(np.concatenate(cells, axis=1), np.ones((scale, scale), dtype=bool)).astype(bool)


class Canvas:
    """An RGB image `[height, width, 3]` (uint8) with the few drawing operations a line chart needs."""

    def __init__(self, width: int, height: int, background=WHITE):
        self.pixels = np.empty((height, width, 3), dtype=np.uint8)
        self.pixels[:] = background

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    def fill(self, x0: float, y0: float, x1: float, y1: float, color) -> None:
        """Fill the rectangle `[x0, x1) x [y0, y1)`, clipped to the canvas."""
        x0, x1 = sorted((max(0, int(round(x0))), min(self.width, int(round(x1)))))
        y0, y1 = sorted((max(0, int(round(y0))), min(self.height, int(round(y1)))))
        self.pixels[y0:y1, x0:x1] = color

    def _stamp(self, xs: np.ndarray, ys: np.ndarray, radius: float, color) -> None:
        """A disk of `radius` pixels at each point `(xs[i], ys[i])`."""
        r = int(math.ceil(radius))
        dx, dy = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1))
        inside = dx**2 + dy**2 <= radius**2 + 0.25
        px = (np.rint(xs)[:, None] + dx[inside][None, :]).astype(int).ravel()
        py = (np.rint(ys)[:, None] + dy[inside][None, :]).astype(int).ravel()
        keep = (px >= 0) & (px < self.width) & (py >= 0) & (py < self.height)
        self.pixels[py[keep], px[keep]] = color

    def dot(self, x: float, y: float, radius: float, color) -> None:
        self._stamp(np.array([x]), np.array([y]), radius, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: float = 2, dash: int = 0) -> None:
        """A straight line of `width` pixels; `dash` > 0 draws dashes (and gaps) of that many pixels."""
        steps = max(1, int(math.hypot(x1 - x0, y1 - y0) * 2))  # two samples per pixel of length
        i = np.arange(steps + 1)
        if dash:
            i = i[(i // (2 * dash)) % 2 == 0]
        t = i / steps
        self._stamp(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, width / 2, color)

    def text(self, x: float, y: float, text: str, color=INK, scale: int = 2, align: str = "left", rotate=False):
        """Draw `text` with its top-left corner at (x, y) (`align` center/right moves it); `rotate`: bottom to top."""
        mask = text_mask(text, scale)
        if rotate:
            mask = np.rot90(mask)
        h, w = mask.shape
        if align == "center":
            x -= w / 2 if not rotate else 0
            y -= h / 2 if rotate else 0
        elif align == "right":
            x -= w
        x, y = int(round(x)), int(round(y))
        ys, xs = np.nonzero(mask)
        ys, xs = ys + y, xs + x
        keep = (xs >= 0) & (xs < self.width) & (ys >= 0) & (ys < self.height)
        self.pixels[ys[keep], xs[keep]] = color

    def paste(self, other: Canvas, x: int, y: int) -> None:
        self.pixels[y : y + other.height, x : x + other.width] = other.pixels

    def png(self) -> bytes:
        return encode_png(self.pixels)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an `[H, W, 3]` uint8 image (8-bit RGB, no interlace, filter 0 on every row)."""
    height, width, _ = rgb.shape
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgb.reshape(height, width * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    """The `[H, W, 3]` pixels of a PNG written by `encode_png` (for tests and checks; not a general decoder)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, 1 + width * 3)
    assert not rows[:, 0].any(), "only filter 0 rows are supported"
    return rows[:, 1:].reshape(height, width, 3)


# ------------------------------------------------------------------------------------------------------ charts


@dataclass
class Series:
    """One line of a chart: `label` in the legend, points `(x, y)` (a `None` y is skipped)."""

    label: str
    xs: list[float]
    ys: list[float | None]
    dash: int = 0


@dataclass
class Chart:
    """One panel: title, axis labels, lines, x ticks at the given values (log2-spaced with `log_x`) and an optional
    dashed horizontal reference line (e.g. speed-up 1: break-even)."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    xticks: list[float]
    log_x: bool = False
    reference_y: float | None = None
    ymin: float | None = None
    notes: list[str] = field(default_factory=list)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering `[lo, hi]` (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks, value = [], first
    while value < hi + step * 0.999:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _label(value: float) -> str:
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def draw_chart(chart: Chart, width: int = 560, height: int = 400, scale: int = 2) -> Canvas:
    """Render one `Chart` on its own canvas."""
    canvas = Canvas(width, height)
    char_w, char_h = 6 * scale, GLYPH_H * scale
    small = max(1, scale - 1)
    top = 8 + char_h + 6  # title
    if chart.notes:
        canvas.text(width / 2, top, "; ".join(chart.notes), MUTED, small, align="center")
        top += GLYPH_H * small + 6
    legend_y, top = top + 2, top + char_h + 14  # legend: one row under the title
    left, right, bottom = 8 * char_w, 16, 3 * char_h + 14
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area, y grows downwards
    canvas.text(width / 2, 8, chart.title, scale=scale, align="center")

    ys = [y for s in chart.series for y in s.ys if y is not None]
    ys += [chart.reference_y] if chart.reference_y is not None else []
    lo = min(ys, default=0.0) if chart.ymin is None else min(chart.ymin, min(ys, default=chart.ymin))
    hi = max(ys, default=1.0)
    pad = (hi - lo) * 0.08 or 0.5
    yticks = nice_ticks(lo - (pad if chart.ymin is None else 0), hi + pad)
    ylo, yhi = yticks[0], yticks[-1]

    def tx(value: float) -> float:
        values = [math.log2(v) for v in chart.xticks] if chart.log_x else chart.xticks
        v = math.log2(value) if chart.log_x else value
        lo_x, hi_x = min(values), max(values)
        span = (hi_x - lo_x) or 1.0
        margin = 0.06 * (x1 - x0)
        return x0 + margin + (v - lo_x) / span * (x1 - x0 - 2 * margin)

    def ty(value: float) -> float:
        return y1 - (value - ylo) / ((yhi - ylo) or 1.0) * (y1 - y0)

    for tick in yticks:  # grid, y tick labels
        canvas.line(x0, ty(tick), x1, ty(tick), GRID, width=1)
        canvas.text(x0 - 6, ty(tick) - char_h / 2, _label(tick), MUTED, scale, align="right")
    for tick in chart.xticks:
        canvas.line(tx(tick), y1, tx(tick), y1 + 5, INK, width=1)
        canvas.text(tx(tick), y1 + 8, _label(tick), MUTED, scale, align="center")
    canvas.line(x0, y0, x0, y1, INK, width=1)
    canvas.line(x0, y1, x1, y1, INK, width=1)
    canvas.text((x0 + x1) / 2, height - char_h - 6, chart.xlabel, scale=scale, align="center")
    canvas.text(6, (y0 + y1) / 2, chart.ylabel, scale=scale, align="center", rotate=True)
    if chart.reference_y is not None:
        canvas.line(x0, ty(chart.reference_y), x1, ty(chart.reference_y), MUTED, width=1, dash=4)

    entries = [36 + char_w * len(s.label) + 18 for s in chart.series]  # legend entry widths
    lx = (x0 + x1) / 2 - sum(entries) / 2
    for i, s in enumerate(chart.series):
        color = PALETTE[i % len(PALETTE)]
        points = [(tx(x), ty(y)) for x, y in zip(s.xs, s.ys) if y is not None]
        for (ax, ay), (bx, by) in zip(points, points[1:]):
            canvas.line(ax, ay, bx, by, color, width=2.5, dash=s.dash)
        for px, py in points:
            canvas.dot(px, py, 4, color)
        mid = legend_y + char_h / 2
        canvas.line(lx, mid, lx + 28, mid, color, width=2.5, dash=s.dash)
        canvas.dot(lx + 14, mid, 4, color)
        canvas.text(lx + 36, legend_y, s.label, INK, scale)
        lx += entries[i]
    return canvas


def write_figure(path: str | Path, charts: list[Chart], width: int = 560, height: int = 400) -> Path:
    """Draw `charts` side by side and write them as one PNG (atomically)."""
    panels = [draw_chart(c, width, height) for c in charts]
    figure = Canvas(sum(p.width for p in panels), height)
    x = 0
    for panel in panels:
        figure.paste(panel, x, 0)
        x += panel.width
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(figure.png())
    return path
