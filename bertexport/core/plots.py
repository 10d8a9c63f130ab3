"""What the report plots (benchmark.png, search.png) share so they stay readable: every
candidate is a numbered point whose number is placed where it overlaps no other number,
its full name is in a key beside the plot (never on it, never cut), and latency is on a
log axis so a 10x spread stays legible."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only backend (ImportError when matplotlib is absent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_latency_axis(ax, which: str = "x", label: str = "latency p50 (ms)") -> None:
    """A log latency axis labelled in plain milliseconds (1, 2, 5, 10, 20, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    (ax.set_xlabel if which == "x" else ax.set_ylabel)(label + ", log scale")


# where a number may go around its point, nearest first: (direction x, direction y, alignment)
_AROUND = [(1, 1, "left", "bottom"), (-1, 1, "right", "bottom"), (1, -1, "left", "top"), (-1, -1, "right", "top"),
           (1, 0, "left", "center"), (-1, 0, "right", "center"), (0, 1, "center", "bottom"), (0, -1, "center", "top")]


def place_numbers(ax, points: list[tuple], fontsize: float = 8) -> list:
    """Write each point's number beside it (``(x, y, number[, colour])``): the first of the
    eight places around the point where it overlaps no number already placed, then the same
    eight places further out, with a thin leader line. Returns the text artists.

    Call it last, once everything else (the key included) is on the figure: the placement
    is measured on the final layout, and the numbers themselves do not change it."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()  # positions in display space need a renderer, final limits and layout
    renderer = fig.canvas.get_renderer()
    placed: list = []
    texts = []
    for x, y, n, *colour in points:
        style = {"fontsize": fontsize, "fontweight": "bold", "zorder": 5, "annotation_clip": False,
                 "color": colour[0] if colour else "k", "in_layout": False, "textcoords": "offset points"}
        t = None
        for ring in range(12):
            for dx, dy, ha, va in _AROUND:
                if t is not None:
                    t.remove()
                d = 3 + 8 * ring
                leader = {"arrowprops": {"arrowstyle": "-", "linewidth": 0.5, "color": "0.4", "shrinkA": 0, "shrinkB": 3}} if ring else {}
                t = ax.annotate(str(n), (x, y), xytext=(dx * d, dy * d), ha=ha, va=va, **style, **leader)
                t.update_positions(renderer)
                box = Text.get_window_extent(t, renderer).expanded(1.2, 1.2)  # the number, not its leader
                if not any(box.overlaps(b) for b in placed):
                    break
            else:
                continue
            break
        placed.append(box)
        texts.append(t)
    return texts


def key_columns(entries: int) -> int:
    return 1 if entries <= 6 else 2


def key_height(entries: int) -> float:
    """Inches the key under the plot takes (its title and one line per row of entries), to add
    to a figure's height: a fixed-size figure with a long key (an optimize search with a
    student grid names 40+ candidates) squeezed its axes to nothing."""
    return 0.4 + 0.19 * -(-entries // key_columns(entries)) if entries else 0.0


def key(fig, entries: list[tuple[int, str, str]], title: str = "candidates") -> None:
    """The key under the plot: one line per candidate, its number (coloured as its point) and full name."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="None", marker=f"${n}$", markersize=7 + 2 * len(str(n)), color=colour,
                      label=label) for n, label, colour in entries]
    fig.legend(handles=handles, loc="outside lower center", ncols=key_columns(len(entries)), fontsize=8,
               title=title, title_fontsize=8, frameon=False, handletextpad=0.6)


def save(fig, path: str | Path) -> Path:
    plt = pyplot()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
