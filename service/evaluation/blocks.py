"""A page of predicted markdown cut into the blocks OmniDocBench matches against its truth.

Same order and rules as the benchmark's extractor (read, not copied; see ``normalize.py``):
images, fences and ``<html>``/``<body>`` go; then LaTeX tables, HTML tables and display math
are taken out (blanked with spaces, so positions stay put); inline ``$...$`` is *also* listed
as a formula but left in its paragraph; markdown pipe tables become HTML tables; fenced code
becomes text; the rest is cut into paragraphs on blank lines (on single newlines when there
is no blank line at all). A block's position is where it starts; paragraph positions are
counted the benchmark's way (the lengths of the pieces, without the separators), which only
matters for ordering paragraphs among themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_IMAGE = re.compile(r"!\[.*?\]\(.*?\)")
_FENCE_OPEN = re.compile(r"^```(?:markdown|html|latex)\n?", re.MULTILINE)
_FENCE_CLOSE = re.compile(r"```\n?$", re.MULTILINE)
_DISPLAY_MATH = re.compile(r"\$\$(.*?)\$\$|\\\[(.*?)\\\]|\$(.*?)\$|\\\((.*?)\\\)", re.DOTALL)
_DOLLARS = re.compile(r"\$\$(.*?)\$\$|\$(.*?)\$|\\\((.*?)\\\)", re.DOTALL)
_PIPE_ROW = re.compile(r"\|\s*.*?\s*\|\n", re.DOTALL)
_HTML_TABLE = re.compile(r"(<table.*?</table>)", re.DOTALL)
_TABLE_OPEN = re.compile(r"<table(?:[^>]*)>")
_CODE = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)
_LATEX_TABLE = re.compile(r"\\begin\{table\}(.*?)\\end\{table\}|\\begin\{tabular\}(.*?)\\end\{tabular\}", re.DOTALL)
_LATEX_WRAPPERS = [
    re.compile(r"\\title\{(.*?)\}"),
    re.compile(r"\\title\s*\{\s*(.*?)\s*\}", re.DOTALL),
    re.compile(r"\\text\s*\{\s*(.*?)\s*\}", re.DOTALL),
    re.compile(r"\\section\*?\{(.*?)\}"),
    re.compile(r"\\section\*?\{\s*(.*?)\s*\}", re.DOTALL),
]

TEXT = "text_all"
FORMULA = "equation_isolated"
HTML_TABLE = "html_table"
LATEX_TABLE = "latex_table"


@dataclass(frozen=True)
class Block:
    """One predicted block: its kind, its text and where it starts in the page."""

    kind: str  # TEXT, FORMULA, HTML_TABLE or LATEX_TABLE
    content: str
    position: int
    inline: bool = False  # a formula that is inline math, still inside its paragraph


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _preclean(markdown: str) -> str:
    text = _IMAGE.sub("", markdown)
    text = _FENCE_CLOSE.sub("", _FENCE_OPEN.sub("", text))
    text = re.sub(r" {4,}", "    ", re.sub(r"_{4,}", "____", text))
    for tag in ("<html>", "</html>", "<body>", "</body>"):
        text = text.replace(tag, "")
    return text


def outer_html_tables(text: str) -> list[tuple[int, int]]:
    """(start, end) of each outermost ``<table>...</table>``, nested tables kept inside theirs."""
    spans, depth, start = [], 0, 0
    for match in re.finditer(r"<table(?:[^>]*)>|</table>", text):
        if match.group(0).startswith("</"):
            if depth == 0:
                continue
            depth -= 1
            if depth == 0:
                spans.append((start, match.end()))
        else:
            if depth == 0:
                start = match.start()
            depth += 1
    return spans


def pipe_table_to_html(rows: list[str]) -> str:
    """Consecutive markdown pipe rows as one HTML table; separator rows (``|---|:--|``) dropped.

    Cells carry explicit ``colspan="1" rowspan="1"`` as the benchmark's converter writes them: they
    do not change TEDS, but they are part of the string the table edit distance compares."""
    cells_per_row = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip().split("|")[1:-1]]
        if cells and all(re.fullmatch(r":?-{1,}:?", cell) for cell in cells):
            continue
        cells_per_row.append(cells)
    body = "".join(
        "<tr>" + "".join(f'<td colspan="1" rowspan="1">{cell}</td>' for cell in cells) + "</tr>"
        for cells in cells_per_row
    )
    return f"<table>{body}</table>"


def _pipe_tables_as_html(text: str) -> str:
    """Every run of pipe rows replaced by an HTML table (only when the page has two or more rows)."""
    if len(_PIPE_ROW.findall(text + "\n")) < 2:
        return text
    out, run = [], []
    for line in (text + "\n").split("\n")[:-1]:
        if re.fullmatch(r"\s*\|.*\|\s*", line):
            run.append(line)
            continue
        if run:
            out.append(_own_paragraph(pipe_table_to_html(run)))
            run = []
        out.append(line)
    if run:
        out.append(_own_paragraph(pipe_table_to_html(run)))
    return "\n".join(out)


def _own_paragraph(table: str) -> str:
    """A converted table stands apart from the lines around it, as in the benchmark's conversion."""
    return f"\n\n{table}\n\n"


def _take(text: str, spans: list[tuple[int, int]], kind: str, blocks: list[Block]) -> str:
    for start, end in spans:
        blocks.append(Block(kind, text[start:end], start))
        text = _blank(text, start, end)
    return text


def _take_math(text: str, blocks: list[Block]) -> str:
    for match in list(_DISPLAY_MATH.finditer(text)):
        line = " ".join(match.group(0).strip().split("\n"))
        dollars = _DOLLARS.search(line)
        if dollars is None:  # \[ ... \]
            blocks.append(Block(FORMULA, line, match.start()))
            text = _blank(text, match.start(), match.end())
        elif dollars.group(1):  # $$ ... $$
            blocks.append(Block(FORMULA, _DOLLARS.sub(r"\\[\1\\]", line), match.start()))
            text = _blank(text, match.start(), match.end())
        else:  # inline: listed as a formula, left in its paragraph
            blocks.append(Block(FORMULA, _DOLLARS.sub(r"\\[\2\3\\]", line), match.start(), inline=True))
    return text


def _paragraphs(text: str, blocks: list[Block]) -> None:
    pieces = text.split("\n\n")
    if len(pieces) == 1:
        pieces = text.split("\n")
    position = 0
    for piece in pieces:
        start = position
        position += len(piece)
        piece = "\n".join(line.strip() for line in piece.strip().split("\n") if line.strip())
        if not piece:
            continue
        if piece.startswith("<table") and piece.endswith("</table>"):
            blocks.append(Block(HTML_TABLE, piece, start))
        elif piece.startswith("$") and piece.endswith("$"):
            if piece.replace("$", "").strip():
                blocks.append(Block(FORMULA, piece, start))
        else:
            blocks.append(Block(TEXT, piece, start))


def split_blocks(markdown: str) -> list[Block]:
    """The page's blocks, ordered by position (ties keep extraction order)."""
    text = _preclean(markdown)
    blocks: list[Block] = []
    text = _take(text, [m.span() for m in _LATEX_TABLE.finditer(text)], LATEX_TABLE, blocks)
    text = _take(text, outer_html_tables(text), HTML_TABLE, blocks)
    text = _take_math(text, blocks)
    converted = _pipe_tables_as_html(text)
    if converted != text:
        text = _take(converted, [m.span() for m in _HTML_TABLE.finditer(converted)], HTML_TABLE, blocks)
    for match in list(_CODE.finditer(text)):
        blocks.append(Block(TEXT, match.group(2).strip(), match.start()))
        text = _blank(text, *match.span())
    for pattern in _LATEX_WRAPPERS:
        text = pattern.sub(r"\1", text)
    _paragraphs(text, blocks)
    return sorted(blocks, key=lambda block: block.position)
