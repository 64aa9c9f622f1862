"""The unified prompt template: one text shape for pre-training, fine-tuning and evaluation.

A document is a header line naming the scope, then one line per item, oldest first:

    User behaviour in Comedy, oldest first:
    Toy Story (1995)
    Heat (1995)

A mixed (all-domain) document tags every line with the item's domain:

    User behaviour in all domains, oldest first:
    [Comedy] Toy Story (1995)
    [Action] Heat (1995)

A downstream example is a single-domain document whose last line is the target: the prompt is everything
before it, so the target line (title + end marker "\\n") is exactly what a model continues with, and the
loss can be put on it alone. Histories longer than the character budget are cut into windows at item
boundaries; the newest items are always kept. The version below is recorded in every manifest downstream:
change it whenever the rendered text changes.
"""

from __future__ import annotations

TEMPLATE_VERSION = "cprec-template-v1"
MIXED_SCOPE = "all domains"
END_MARKER = "\n"  # ends every item line; evaluation scores a title plus this marker


def header(scope: str) -> str:
    return f"User behaviour in {scope}, oldest first:\n"


def item_line(title: str, domain: str | None = None) -> str:
    return f"[{domain}] {title}{END_MARKER}" if domain else f"{title}{END_MARKER}"


def windows(lines: list[str], budget: int, cost=len) -> list[list[str]]:
    """Cut `lines` into consecutive windows of at most `budget` (by `cost`), the newest window complete.

    Cutting runs from the newest line backwards, so only the oldest window may be short. `cost` measures a
    line: characters by default, tokens when prepare is given a tokenizer (item lines tokenize
    independently, since every line ends with a newline). A single line over the budget gets a window of its
    own (titles are capped upstream, so this is rare).
    """
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for line in reversed(lines):
        n = cost(line)
        if current and size + n > budget:
            out.append(current[::-1])
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        out.append(current[::-1])
    return out[::-1]


def render_documents(scope: str, titles: list[str], domains: list[str] | None, budget: int,
                     cost=len) -> list[str]:
    """Documents for one user's sequence: one per window, each within `budget` (header included)."""
    head = header(scope)
    lines = [item_line(t, d) for t, d in zip(titles, domains)] if domains else [item_line(t) for t in titles]
    return [head + "".join(w) for w in windows(lines, budget - cost(head), cost)]


def render_example(domain: str, history: list[str], target: str | None, budget: int,
                   cost=len) -> tuple[str, int]:
    """A next-item example: (text, prompt_chars). The prompt keeps the newest history that fits the budget
    together with the target line; with target None the text is the prompt alone (for evaluation)."""
    head = header(domain)
    target_line = item_line(target) if target is not None else ""
    room = budget - cost(head) - (cost(target_line) if target_line else 0)
    kept: list[str] = []
    size = 0
    for title in reversed(history):
        line = item_line(title)
        n = cost(line)
        if size + n > room:
            break
        kept.append(line)
        size += n
    prompt = head + "".join(reversed(kept))
    return prompt + target_line, len(prompt)


def parse_document(text: str) -> tuple[str, list[tuple[str | None, str]]]:
    """Inverse of the rendering: (scope, [(domain or None, title)]). Used by inspection and tests."""
    first, _, body = text.partition("\n")
    prefix, suffix = "User behaviour in ", ", oldest first:"
    if not (first.startswith(prefix) and first.endswith(suffix)):
        raise ValueError(f"not a CPRec document: {first[:80]!r}")
    scope = first[len(prefix):-len(suffix)]
    items: list[tuple[str | None, str]] = []
    for line in body.split("\n"):
        if not line:
            continue
        if scope == MIXED_SCOPE:
            tag, _, title = line.partition("] ")
            items.append((tag[1:], title))
        else:
            items.append((None, line))
    return scope, items
