import pytest

from cprec.data import template


def test_golden_domain_document():
    docs = template.render_documents("Comedy", ["Toy Story (1995)", "Babe (1995)"], None, 2000)
    assert docs == ["User behaviour in Comedy, oldest first:\nToy Story (1995)\nBabe (1995)\n"]


def test_golden_mixed_document():
    docs = template.render_documents(template.MIXED_SCOPE, ["Heat (1995)", "Toy Story (1995)"],
                                     ["Action", "Comedy"], 2000)
    assert docs == ["User behaviour in all domains, oldest first:\n[Action] Heat (1995)\n[Comedy] Toy Story (1995)\n"]


def test_golden_downstream_example():
    text, prompt_chars = template.render_example("Sci-Fi", ["Alien (1979)", "Brazil (1985)"], "Dune (1984)", 2000)
    assert text == "User behaviour in Sci-Fi, oldest first:\nAlien (1979)\nBrazil (1985)\nDune (1984)\n"
    assert text[prompt_chars:] == "Dune (1984)\n"
    prompt, n = template.render_example("Sci-Fi", ["Alien (1979)"], None, 2000)
    assert prompt == "User behaviour in Sci-Fi, oldest first:\nAlien (1979)\n" and n == len(prompt)


def test_template_version_is_recorded():
    assert template.TEMPLATE_VERSION == "cprec-template-v1"


def test_windows_keep_the_newest_items_and_never_split_one():
    titles = [f"Item number {i:03d}" for i in range(50)]  # 16 characters + newline each
    head = len(template.header("Books"))
    budget = head + 5 * 17 + 3  # room for five items
    docs = template.render_documents("Books", titles, None, budget)
    assert all(len(d) <= budget for d in docs)
    parsed = [template.parse_document(d)[1] for d in docs]
    assert [t for items in parsed for _, t in items] == titles  # every item exactly once, in order
    assert [t for _, t in parsed[-1]] == titles[-5:]  # the newest window is complete
    assert len(parsed[0]) == 50 % 5 or len(parsed[0]) == 5  # only the oldest window may be short


def test_example_history_keeps_the_newest_items_under_budget():
    history = [f"Film {i:02d}" for i in range(40)]
    budget = 120
    text, prompt_chars = template.render_example("Drama", history, "Target", budget)
    assert len(text) <= budget
    _, items = template.parse_document(text)
    titles = [t for _, t in items]
    assert titles[-1] == "Target" and titles[:-1] == history[-(len(titles) - 1):]


def test_parse_document_round_trips_a_bracketed_title():
    doc = template.render_documents(template.MIXED_SCOPE, ["[REC] (2007)"], ["Horror"], 2000)[0]
    assert template.parse_document(doc) == ("all domains", [("Horror", "[REC] (2007)")])
    with pytest.raises(ValueError):
        template.parse_document("hello\nworld")
