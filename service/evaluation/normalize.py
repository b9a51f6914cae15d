"""How OmniDocBench normalises each kind of block before comparing it.

Written from the published definitions (OmniDocBench's evaluator, Apache-2.0, read at
7bd6c2e; see ``../shared/design/eval-protocols.md``), not copied. The quirks are the benchmark's
and are kept on purpose, because a score is only comparable if it is computed the same way:

- text keeps only word characters and CJK after inline LaTeX is turned into unicode, so
  whitespace and punctuation never count, and the literal strings ``\\t``, ``\\n``, ``/t``, ``/n``
  are dropped too;
- a formula loses its delimiters, ``\\tag``, ``\\begin``/``\\end``, font and spacing macros and
  every space, then is lower-cased;
- a table keeps its structure and cell text only: ``th`` becomes ``td``, ``thead``/``tbody``
  and styling attributes go, entities are unescaped and NFKC applied.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache

_INLINE_MATH = re.compile(r"\$(.*?)\$|\\\((.*?)\\\)")
_ESCAPED = re.compile(r"\\([\\_&%^])")
_NOT_WORD = re.compile(r"[^\w\u4e00-\u9fff]")
_FORMULA_NOISE = (
    "\\mathbf", "\\mathrm", "\\mathnormal", "\\mathit", "\\mathbb", "\\mathcal", "\\mathscr", "\\mathfrak",
    "\\mathsf", "\\mathtt", "\\textbf", "\\text", "\\boldmath", "\\boldsymbol", "\\operatorname", "\\bm",
    "\\symbfit", "\\mathbfcal", "\\symbf", "\\scriptscriptstyle", "\\notag", "\\setlength", "\\coloneqq",
    "\\space", "\\thickspace", "\\thinspace", "\\medspace", "\\nobreakspace", "\\negmedspace", "\\quad",
    "\\qquad", "\\enspace", "\\substackw", " ", "$$", "\\left", "\\right", "\\displaystyle",
)  # fmt: skip
_FORMULA_PATTERNS = [re.compile(p) for p in (r"\\tag\{.*?\}", r"\\hspace\{.*?\}", r"\\begin\{.*?\}", r"\\end\{.*?\}")]
_ARRAY_COLSEP = re.compile(r"\\arraycolsep.*?\}")
_BRACKETED = re.compile(r"\\\[(.+?)(?<!\\)\\\]")
_TABLE_ATTRIBUTES = re.compile(r'( style=".*?")|( height=".*?")|( width=".*?")|( align=".*?")|( class=".*?")')


@lru_cache(maxsize=1)
def _latex_to_text():
    from pylatexenc.latex2text import LatexNodes2Text

    return LatexNodes2Text()


def latex_to_unicode(latex: str) -> str:
    """LaTeX rendered as plain unicode text (``\\alpha^2`` -> ``α^2``), by pylatexenc."""
    return _latex_to_text().latex_to_text(latex)


def inline_math_to_unicode(text: str) -> str:
    """Inline ``$...$`` / ``\\(...\\)`` that holds a macro, sub- or superscript, as unicode text.

    Escaped ``\\_ \\& \\% \\^ \\\\`` are removed outright first (the benchmark's rule), and a span
    pylatexenc cannot read is left as it was."""
    replacements = []
    for match in _INLINE_MATH.finditer(text):
        content = match.group(1) if match.group(1) is not None else match.group(2)
        content = _ESCAPED.sub("", content)
        if not any(char in content for char in "\\^_"):
            continue
        if content.endswith("\\"):
            content += " "
        try:
            replacements.append((match.start(), match.end(), latex_to_unicode(content).strip()))
        except Exception:
            continue
    for start, end, unicode_text in reversed(replacements):
        text = text[:start] + unicode_text + text[end:]
    return text


def clean_text(text: str) -> str:
    """Only word characters and CJK: what OmniDocBench compares text blocks as."""
    for literal in ("\\t", "\\n", "\t", "\n", "/t", "/n"):
        text = text.replace(literal, "")
    return _NOT_WORD.sub("", text)


def normalize_text(text: str) -> str:
    """A text block as the benchmark scores it: inline math to unicode, then ``clean_text``."""
    return clean_text(inline_math_to_unicode(text))


def normalize_formula(latex: str) -> str:
    """A display formula without delimiters, tags, environments, font/spacing macros or spaces."""
    text = latex.strip().strip("$").strip("\n")
    if bracketed := _BRACKETED.search(text):
        text = bracketed.group(1).strip()
    for pattern in _FORMULA_PATTERNS:
        text = pattern.sub("", text)
    text = _ARRAY_COLSEP.sub("", text).strip(".")
    for noise in _FORMULA_NOISE:
        text = text.replace(noise, "")
    return text.lower()


def normalize_table(table_html: str) -> str:
    """A table's HTML reduced to structure and cell text, wrapped as ``<html><body><table>``.

    Returns "" for text without a table (then it scores 0)."""
    if "<table" not in table_html.replace(" ", "").replace("'", '"'):
        return ""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(table_html, "html.parser")
    for cell in soup.find_all("th"):
        cell.name = "td"
    for tag in soup.find_all("thead"):
        tag.unwrap()
    for math in soup.find_all("math"):
        math.replace_with(f"${math.get('alttext', '')}$")
    for span in soup.find_all("span"):
        span.unwrap()
    text = unicodedata.normalize("NFKC", html.unescape(str(soup)).replace("\n", "")).strip()
    inner = "".join(re.findall(r"<table\b[^>]*>(.*)</table>", text, re.DOTALL | re.IGNORECASE))
    inner = _TABLE_ATTRIBUTES.sub("", inner)
    inner = re.sub(r"\s+", " ", re.sub(r"</?tbody>", "", inner))
    for tag in ("sup", "sub", "span", "div", "p"):
        inner = inner.replace(f"<{tag}>", "").replace(f"</{tag}>", "")
    inner = re.sub("<colgroup>.*?</colgroup>", "", inner.replace('<spandata-span-identity="">', ""))
    return f'<html><body><table border="1" >{inner}</table></body></html>'
