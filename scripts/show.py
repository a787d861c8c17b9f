"""Print `dbt show --output json` results as an aligned table (full width, no truncation)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    text = sys.stdin.read()
    start = text.find("{")
    doc = json.loads(text[start:]) if start >= 0 else {}
    rows = doc.get("show", [])
    if not rows:
        print("(no rows)")
        return
    cols = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
