"""The reader's walkthrough stays true: every code link points at the line that defines what it names."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_walkthrough_link_points_at_the_definition_it_names():
    import importlib.util
    spec = importlib.util.spec_from_file_location("walkthrough_links", ROOT / "scripts" / "walkthrough_links.py")
    links = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(links)
    text = links.DOC.read_text()
    assert len(links.LINK.findall(text)) >= 15, "the walkthrough should link the code it walks through"
    stale = links.check()
    assert not stale, f"stale links (run python scripts/walkthrough_links.py): {stale}"


@pytest.mark.parametrize("name", ["README.md", "docs/walkthrough.md"])
def test_docs_use_the_current_names_for_the_two_kinds_of_kl(name):
    text = (ROOT / name).read_text()
    assert "kl_exact" in text and "kl_sampled" in text
    assert "logratio/ref_minus_policy" in text
