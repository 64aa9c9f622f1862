"""Tables, the one renderer: every table a command prints or a report holds is made here.

`format_table` aligns its columns for a terminal (and is valid Markdown); `markdown_table` writes the compact
`| a | b |` form the reports use. Cells are given as strings (or ints, which `format_table` groups by
thousands); escaping user text (`cprec.data.cleaning.markdown_text`) is the caller's, who knows which cells
hold it.
"""

from __future__ import annotations


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[str(c) for c in header]] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
              for r in cells[1:]]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A compact Markdown table as lines: the header, the rule, a line per row."""
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(str, row)) + " |" for row in rows]


def stream_table(index: dict) -> tuple[list[str], list[list]]:
    itemsize = 2 if index["dtype"] == "uint16" else 4
    rows = []
    for name, st in index["streams"].items():
        raw = st["rows"] * index["seq_len"] * itemsize
        rows.append([name, st["kind"], st["rows"], st["tokens"], st["documents"], st["split_documents"],
                     f"{st['slot_use']:.2%}", f"{st['bytes'] / 2**20:.2f}", f"{raw / max(st['bytes'], 1):.1f}x"])
    streams = index["streams"].values()
    total_rows, total_tokens = sum(s["rows"] for s in streams), sum(s["tokens"] for s in streams)
    total_bytes = sum(s["bytes"] for s in streams)
    rows.append(["(all)", "", total_rows, total_tokens, sum(s["documents"] for s in streams),
                 sum(s["split_documents"] for s in streams),
                 f"{total_tokens / max(total_rows * index['seq_len'], 1):.2%}", f"{total_bytes / 2**20:.2f}",
                 f"{total_rows * index['seq_len'] * itemsize / max(total_bytes, 1):.1f}x"])
    return ["stream", "kind", "rows", "tokens", "documents", "split", "slot use", "MB", "compression"], rows
