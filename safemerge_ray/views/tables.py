"""Tables a person reads in a terminal."""

from __future__ import annotations


def format_table(rows: list[dict], limit: int = 40) -> str:
    """The repaired modules, one line each, lowest rho first."""
    repaired = sorted((r for r in rows if r["merged"]), key=lambda r: r["rho"])
    lines = [f"{'module':<48} {'rho':>8} {'tau':>6}  action"]
    for r in repaired[:limit]:
        lines.append(f"{r['module']:<48} {r['rho']:>8.4f} {r['tau']:>6.3f}  {r['action']}")
    if len(repaired) > limit:
        lines.append(f"... and {len(repaired) - limit} more (see decisions.parquet)")
    if not repaired:
        lines.append("(no module needed repair)")
    return "\n".join(lines)
