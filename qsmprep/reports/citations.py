"""The methods text's citations: the BibTeX entries of
``qsmprep/data/boilerplate.bib``, pandoc-style ``[@key]`` citations in the
boilerplate markdown, and the numbered reference list of
``out/logs/CITATION.html`` (and the cited entries in ``CITATION.bib``)."""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

from ..utils.files import write_text

LOGGER = logging.getLogger("qsmprep.reports")

BIB_FILE = Path(__file__).resolve().parent.parent / "data" / "boilerplate.bib"


_TEX_ACCENTS = {'{\\"u}': "ü", '{\\"a}': "ä", '{\\"o}': "ö", "{\\'e}": "é", "{\\'a}": "á"}


def parse_bib(text):
    """Entries of a BibTeX file: ``{key: {"type": ..., field: value, "raw": entry}}``.

    Handles the plain ``field = {value}`` / ``field = "value"`` style of
    ``qsmprep/data/boilerplate.bib``; braces inside values are removed;
    ``raw`` is the entry's BibTeX text.
    """
    entries = {}
    for match in re.finditer(r"@(\w+)\s*\{\s*([^,\s]+)\s*,(.*?)\n\}", text, re.DOTALL):
        fields = {"type": match.group(1).lower(), "raw": match.group(0)}
        for fm in re.finditer(r"(\w+)\s*=\s*(\{(?:[^{}]|\{[^{}]*\})*\}|\"[^\"]*\"|\d+)",
                              match.group(3)):
            value = fm.group(2).strip('"')
            for tex, char in _TEX_ACCENTS.items():
                value = value.replace(tex, char)
            fields[fm.group(1).lower()] = re.sub(r"[{}]", "", value)
        entries[match.group(2)] = fields
    return entries


def cited_bib(keys, entries):
    """BibTeX text of the ``entries`` (:func:`parse_bib`) cited as ``keys``, in
    that order; keys without an entry are left out."""
    return "\n\n".join(entries[k]["raw"] for k in keys if k in entries) + "\n"


def _short_authors(authors):
    names = [a.strip() for a in authors.split(" and ") if a.strip()]
    last = [n.split(",")[0].strip() if "," in n else n.split()[-1] for n in names]
    if not last:
        return ""
    if last[-1].lower() == "others" or len(last) > 3:
        return f"{last[0]} et al."
    return " and ".join([", ".join(last[:-1]), last[-1]]) if len(last) > 1 else last[0]


def reference_venue(entry):
    """Where a work appeared: journal, proceedings (booktitle) or publisher."""
    return entry.get("journal") or entry.get("booktitle") or entry.get("publisher") or ""


def format_reference(entry, markdown=False):
    """One reference, as HTML (the report) or ``markdown`` (CITATION.md):
    authors (year). Title. *Journal* volume:pages. doi."""
    esc = (lambda t: t) if markdown else html.escape
    parts = [f"{esc(_short_authors(entry.get('author', '')) or 'Anonymous')} "
             f"({esc(entry.get('year', 'n.d.'))})."]
    title = (entry.get("title") or entry.get("note") or "").replace("---", "—").replace("--", "–")
    if title:
        parts.append(esc(title) + ("" if title[-1] in ".?!" else "."))
    venue = reference_venue(entry)
    if venue:
        vol = entry.get("volume", "")
        pages = entry.get("pages", "").replace("--", "–")
        parts.append((f"*{venue}*" if markdown else f"<em>{esc(venue)}</em>")
                     + (f" {esc(vol)}" if vol else "") + (f":{esc(pages)}" if pages else "") + ".")
    link = entry.get("doi") and f"doi:{entry['doi']}"
    url = f"https://doi.org/{entry['doi']}" if entry.get("doi") else entry.get("url")
    if url:
        text = link or url
        parts.append(f"[{text}]({url})" if markdown
                     else f'<a href="{esc(url)}">{esc(text)}</a>')
    return " ".join(parts)


_CITE_GROUP = re.compile(r"\[\s*(@[\w:.\-]+(?:\s*;\s*@[\w:.\-]+)*)\s*\]")
_CITE_BARE = re.compile(r"(?<![\w@\[;])@([A-Za-z][\w:.\-]*\w)")


def cited_keys(markdown_text):
    """Citation keys used in pandoc style (``[@a; @b]`` or ``@a``), in order of first use."""
    keys = []
    for m in _CITE_GROUP.finditer(markdown_text):
        keys += [k.strip().lstrip("@") for k in m.group(1).split(";")]
    keys += _CITE_BARE.findall(_CITE_GROUP.sub("", markdown_text))
    return list(dict.fromkeys(keys))


def _inline_markdown(text):
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", text)


def citation_html(markdown_text, bib):
    """HTML body of the methods text with numbered citations and a reference list.

    ``markdown_text`` is the boilerplate (headings, paragraphs, ``- `` lists,
    inline emphasis/code) with pandoc citations; ``bib`` comes from
    :func:`parse_bib`. Unknown keys are shown as ``[key?]`` and logged.
    """
    keys = cited_keys(markdown_text)
    number = {k: i + 1 for i, k in enumerate(k for k in keys if k in bib)}
    missing = [k for k in keys if k not in bib]
    if missing:
        LOGGER.warning("Citation keys missing from boilerplate.bib: %s", ", ".join(missing))

    def cite(names):
        return "[" + ", ".join(f'<a href="#ref-{k}">{number[k]}</a>' if k in number
                               else f"{html.escape(k)}?" for k in names) + "]"

    def replace(text):
        text = _CITE_GROUP.sub(lambda m: "\x00" + ";".join(
            k.strip().lstrip("@") for k in m.group(1).split(";")) + "\x01", text)
        text = _CITE_BARE.sub(lambda m: "\x00" + m.group(1) + "\x01", text)
        text = _inline_markdown(text)
        return re.sub("\x00([^\x01]*)\x01", lambda m: cite(m.group(1).split(";")), text)

    blocks = []
    for block in re.split(r"\n\s*\n", markdown_text.strip()):
        lines = block.strip().splitlines()
        if not lines:
            continue
        if lines[0].startswith("#"):
            level = min(len(lines[0]) - len(lines[0].lstrip("#")) + 2, 6)
            blocks.append(f"<h{level}>{replace(lines[0].lstrip('#').strip())}</h{level}>")
            lines = lines[1:]
            if not lines:
                continue
        if all(ln.lstrip().startswith(("- ", "* ")) for ln in lines):
            items = "".join(f"<li>{replace(ln.lstrip()[2:])}</li>" for ln in lines)
            blocks.append(f"<ul>{items}</ul>")
        else:
            blocks.append(f"<p>{replace(' '.join(ln.strip() for ln in lines))}</p>")
    if number:
        refs = "\n".join(f'<li id="ref-{k}">{format_reference(bib[k])}</li>' for k in number)
        blocks.append(f"<h4>References</h4>\n<ol>\n{refs}\n</ol>")
    return "\n".join(blocks)


def write_citation_files(logs_dir, bib_file=BIB_FILE):
    """From ``logs/CITATION.md`` write ``CITATION.html`` (and ``CITATION.bib`` if missing).

    A trailing ``References`` section of the markdown is replaced by the
    numbered reference list; ``CITATION.bib`` holds the entries of
    ``bib_file`` that the text cites. Returns the paths written (empty when
    there is no CITATION.md).
    """
    logs_dir = Path(logs_dir)
    md_file = logs_dir / "CITATION.md"
    if not md_file.exists():
        return []
    text = re.split(r"^#+\s*References\s*$", md_file.read_text(), flags=re.M)[0]
    entries = parse_bib(Path(bib_file).read_text())
    html_file = logs_dir / "CITATION.html"
    write_text(
        html_file,
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>qsmprep citation boilerplate</title></head>\n"
        f"<body>\n{citation_html(text, entries)}\n</body></html>\n")
    written = [html_file]
    bib_out = logs_dir / "CITATION.bib"
    if not bib_out.exists():
        write_text(bib_out, cited_bib(cited_keys(text), entries))
        written.append(bib_out)
    return written
