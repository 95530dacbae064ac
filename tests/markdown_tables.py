"""Reading the generated markdown (REPORT.md, COMPARISON.md) back for the report tests."""
from __future__ import annotations

import pandas as pd


def md_tables(text: str) -> list[pd.DataFrame]:
    """Every markdown table in ``text`` as a DataFrame of strings (header row, separator, body)."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append(pd.DataFrame(block[2:], columns=block[0]))
            block = []
    return tables
