"""`safemerge-ray report`: one self-contained HTML page (images embedded, opens offline) that shows, for
the fleet's current state or one run: a heatmap of rho per adapter x layer (modules grouped by type,
repaired cells outlined, the colour scale centred on tau), a histogram of rho against tau, and one row
per adapter.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..core import natural_key
from ..store import PublishedState, repaired_rho


@dataclass(frozen=True)
class AdapterRow:
    adapter: str
    run_id: str
    repaired: int
    modules: int
    lowest_rho: float
    tau: float
    state: str = PublishedState.PUBLISHED
    repaired_rho: tuple[float, float] | None = None  # mean rho of repaired layers, before and after


def _module_order(modules: set[str]) -> list[str]:
    """Grouped by type (q_proj, k_proj, ...), then by layer within a type."""
    def key(m: str):
        kind = m.rsplit(".", 1)[-1]
        return (kind, natural_key(m))
    return sorted(modules, key=key)


def _short(module: str) -> str:
    layer = re.search(r"layers\.(\d+)\.", module)
    return f"{module.rsplit('.', 1)[-1]}.{layer.group(1)}" if layer else module.rsplit(".", 1)[-1]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def render(rows: list[dict], title: str, states: Mapping[str, str] | None = None,
           held: dict[str, str] | None = None, made: str = "") -> tuple[str, list[AdapterRow], list[str]]:
    """The page for these decision rows (one per adapter x module, with `run_id`); also its table's rows
    and the heatmap's columns (modules, in order). `held`: adapters the gate held back, and why; `made`: when
    and from what the page was made, for its first line."""
    adapters = sorted({r["adapter"] for r in rows})
    modules = _module_order({r["module"] for r in rows})
    taus = sorted({r["tau"] for r in rows})
    tau = taus[0] if len(taus) == 1 else sorted(r["tau"] for r in rows)[len(rows) // 2]
    heatmap, histogram = _heatmap(rows, adapters, modules, tau), _histogram(rows, taus, len(adapters))
    table = []
    for a in adapters:
        mine = [r for r in rows if r["adapter"] == a]
        table.append(AdapterRow(a, mine[0]["run_id"], sum(r["merged"] for r in mine), len(mine),
                                min(r["rho"] for r in mine), mine[0]["tau"],
                                (states or {}).get(a, PublishedState.PUBLISHED), repaired_rho(mine)))
    return _page(title, made, heatmap, histogram, table, held or {}), table, modules


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _heatmap(rows: list[dict], adapters: list[str], modules: list[str], tau: float) -> str:
    """rho per adapter x layer, the colour scale centred on tau, repaired cells outlined: a base64 PNG."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    cell = {(r["adapter"], r["module"]): r for r in rows}
    grid = [[cell[(a, m)]["rho"] if (a, m) in cell else float("nan") for m in modules] for a in adapters]
    width = min(28.0, 2.5 + 0.22 * len(modules))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.32 * len(adapters)))
    lo = min(min(r["rho"] for r in rows), tau - 1e-6)
    hi = max(max(r["rho"] for r in rows), tau + 1e-6)
    image = ax.imshow(grid, aspect="auto", cmap="RdYlGn", norm=TwoSlopeNorm(vmin=lo, vcenter=tau, vmax=hi))
    for i, a in enumerate(adapters):
        for j, m in enumerate(modules):
            if cell.get((a, m), {}).get("merged"):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
    ax.set_yticks(range(len(adapters)), adapters)
    ax.set_xticks(range(len(modules)), [_short(m) for m in modules], rotation=90, fontsize=7)
    ax.set_title(f"rho per adapter x layer (colour centred on tau = {tau:g}; outlined: repaired)")
    fig.colorbar(image, ax=ax, label="rho")
    png = _png(fig)
    plt.close(fig)
    return png


def _histogram(rows: list[dict], taus: list[float], n_adapters: int) -> str:
    """A histogram of rho with each tau marked: a base64 PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist([r["rho"] for r in rows], bins=40, color="#4a78b5")
    for t in taus:
        ax.axvline(t, color="#c0392b", linestyle="--", label=f"tau = {t:g}")
    ax.set_xlabel("rho")
    ax.set_ylabel("layers")
    ax.legend()
    ax.set_title(f"rho of {len(rows)} layers in {n_adapters} adapters")
    png = _png(fig)
    plt.close(fig)
    return png


LEGEND = (
    "<b>rho</b> is, for one layer of one fine-tune, the cosine between its LoRA update and that update projected "
    "onto the model's safety subspace (what alignment changed: the aligned minus the unaligned weights): near 1, "
    "the update stays in that subspace; near 0, it has left it. A layer whose rho is below <b>tau</b> (the "
    "policy's threshold; or one of the K lowest, with top_k / fraction) is <b>repaired</b>: merged with the "
    "safety adapter's layer (SafeMERGE) or projected onto the subspace (SafeLoRA). Outlined cells are repaired "
    "layers. A repair's rho afterwards can be higher or lower: PEFT's linear merge adds cross terms.")


def _page(title: str, made: str, heatmap: str, histogram: str, table: list[AdapterRow], held: dict[str, str]) -> str:
    body = "\n".join(
        f"<tr><td>{html.escape(t.adapter)}</td><td>{html.escape(t.state)}</td><td>{html.escape(t.run_id)}</td>"
        f"<td>{t.repaired}/{t.modules}</td><td>{t.lowest_rho:.4f}</td><td>{t.tau:g}</td>"
        f"<td>{f'{t.repaired_rho[0]:.3f} &rarr; {t.repaired_rho[1]:.3f}' if t.repaired_rho else '-'}</td></tr>"
        for t in table)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
img {{ max-width: 100%; display: block; margin: 1em 0; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p id="made">{html.escape(made)}</p>
<p id="legend">{LEGEND}</p>
<img id="heatmap" alt="rho per adapter and layer" src="data:image/png;base64,{heatmap}">
<img id="histogram" alt="histogram of rho against tau" src="data:image/png;base64,{histogram}">
<table id="adapters"><thead><tr><th>adapter</th><th>state</th><th>run</th><th>repaired</th><th>lowest rho</th>
<th>tau</th><th>repaired layers' mean rho: before &rarr; after repair</th></tr></thead><tbody>
{body}
</tbody></table>
{_held_section(held)}
</body></html>
"""


def _held_section(held: dict[str, str]) -> str:
    if not held:
        return ""
    rows = "\n".join(f"<tr><td>{html.escape(name)}</td><td>{html.escape(why)}</td></tr>"
                     for name, why in sorted(held.items()))
    return (f'<h2>Held back by the gate</h2>\n<table id="held"><thead><tr><th>adapter</th><th>why</th></tr></thead>'
            f"<tbody>\n{rows}\n</tbody></table>")
