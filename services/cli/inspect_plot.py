"""Pictures of an ``InspectResponse`` with matplotlib's Agg backend (no display, no pyplot state).

One PNG, top to bottom:

* **attention**: a heatmap per requested layer and head (rows: layers, columns: heads); row ``t``
  of a heatmap is where token ``t`` looks (keys on the x axis, queries on the y axis), dark = 0,
  bright = 1; the upper triangle is empty because the mask hides the future. One layer and one
  head are drawn large with the token pieces on both axes;
* **surprise**: a bar per token, ``-log2 p`` of that token given the ones before it (the first
  token has none: nothing predicted it);
* **logit lens** (when asked for): depth x position, colored by the top token's probability and
  labeled with it while the text is short enough to read.
"""

from __future__ import annotations

import warnings

from .inspect import label

DPI = 100
LABELS_UP_TO = 40  # tokens: beyond this, axes carry positions instead of pieces


def default_size(n_rows: int, n_cols: int, single: bool, lens_rows: int) -> tuple[int, int]:
    """Pixels: 2.2 in per heatmap (8 in for one head), 2 in for the surprise strip, the lens below."""
    if single:
        w_in, h_in = 9.0, 9.0
    else:
        w_in, h_in = max(8.0, 2.2 * n_cols + 1.2), 2.2 * n_rows + 0.8
    h_in += 2.2
    if lens_rows:
        h_in += 0.4 * lens_rows + 1.4
    return int(w_in * DPI), int(h_in * DPI)


def render_png(resp, path, size: tuple[int, int] | None = None, lens: bool = False) -> tuple[int, int]:
    """Draw ``resp`` into ``path``; returns the image's ``(width, height)`` in pixels."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from services.inference.inspection import unpack_attention

    pieces = [label(t.text, 10) for t in resp.tokens]
    T = len(pieces)
    layers = list(resp.attention)
    heads = list(layers[0].heads) if layers else []
    single = len(layers) == 1 and len(heads) == 1
    lens_rows = len(resp.logit_lens) if lens else 0
    n_rows, n_cols = (1, 1) if single else (max(1, len(layers)), max(1, len(heads)))
    width, height = size or default_size(n_rows, n_cols, single, lens_rows)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ratios = [2.2 * n_rows if not single else 9.0, 2.2] + ([0.4 * lens_rows + 1.4] if lens_rows else [])
    outer = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
    show_pieces = T <= LABELS_UP_TO
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs a font lacks (CJK pieces): drawn as boxes, not an error
        if layers:
            grid = outer[0].subgridspec(n_rows, n_cols)
            image = None
            for r, layer in enumerate(layers):
                weights = unpack_attention(layer)  # (H, T, T)
                for c, head in enumerate(layer.heads):
                    ax = fig.add_subplot(grid[r, c])
                    image = ax.imshow(weights[c], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
                    ax.set_title(f"layer {layer.layer} head {head}", fontsize=12 if single else 8)
                    if single and show_pieces:
                        ax.set_xticks(range(T), pieces, rotation=90, fontsize=8)
                        ax.set_yticks(range(T), pieces, fontsize=8)
                        ax.set_xlabel("attends to (keys)")
                        ax.set_ylabel("token (queries)")
                    else:
                        ax.set_xticks([])
                        ax.set_yticks([])
            fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention weight")
        ax = fig.add_subplot(outer[1])
        bits = np.array([0.0] + [p.surprise_bits for p in resp.positions[:-1]])  # token t's surprise
        colors = [(0.85, 0.85, 0.85)] + [(min(1.0, b / 12), 0.3, 1.0 - min(1.0, b / 12)) for b in bits[1:]]
        ax.bar(range(T), bits, color=colors)
        ax.set_ylabel("surprise (bits)")
        ax.set_title("how surprised the model was by each token (-log2 p given the tokens before it)", fontsize=9)
        ax.set_xlim(-0.5, T - 0.5)
        if show_pieces:
            ax.set_xticks(range(T), pieces, rotation=90, fontsize=8)
        if lens_rows:
            ax = fig.add_subplot(outer[2])
            probs = np.array([list(row.probs) for row in resp.logit_lens])  # (L+1, T)
            ax.imshow(probs, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            ax.set_yticks(range(lens_rows), ["emb"] + [f"after {row.layer}" for row in resp.logit_lens[1:]],
                          fontsize=8)
            ax.set_title("logit lens: the top next token at each depth (color: its probability)", fontsize=9)
            if show_pieces:
                ax.set_xticks(range(T), pieces, rotation=90, fontsize=8)
                if T <= 24:
                    for d, row in enumerate(resp.logit_lens):
                        for t in range(T):
                            ax.text(t, d, label(row.tokens[t], 6), ha="center", va="center", fontsize=6,
                                    color="white" if row.probs[t] < 0.5 else "black")
            else:
                ax.set_xticks([])
        fig.savefig(path, dpi=DPI, format="png")
    return width, height
