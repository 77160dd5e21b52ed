"""What a person reads: the decision table `merge` prints, and the self-contained report.html.

    tables       the repaired layers of one adapter, as a terminal table
    report_page  report.html: rho heatmap, histogram and one row per adapter (images embedded)
"""

from .report_page import AdapterRow, render
from .tables import format_table

__all__ = [
    "AdapterRow", "format_table", "render",
]
