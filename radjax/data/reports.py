"""Radiology report sections, following the MIT-LCP ``section_text`` conventions.

MIMIC-CXR free-text reports look like::

                                   FINAL REPORT
   EXAMINATION:  CHEST (PA AND LAT)
   INDICATION:  ___F with cough
   FINDINGS:
   No focal consolidation. ...
   IMPRESSION:
   No acute cardiopulmonary process.

A section starts at a line whose first non-blank text is an upper-case header
followed by a colon (``IMPRESSION:``). Header names are normalised the way the
MIT-LCP ``mimic-cxr`` code does it (``CONCLUSION`` -> impression, ``FINDINGS AND
IMPRESSION`` -> impression, ``PA AND LATERAL`` -> findings, common misspellings
fixed), empty findings/impression sections are discarded, and when a report has
neither an impression nor a findings section its last paragraph becomes a
``last_paragraph`` section.

``extract_section(text, "auto")`` is what the datasets use by default: the last
IMPRESSION, else the last FINDINGS, else the last paragraph. This is the section
order that the CheXpert/NegBio labels of MIMIC-CXR-JPG were extracted from.

All functions are pure; none of them logs or prints report text.
"""

from __future__ import annotations

import dataclasses
import re

SECTION_CHOICES = ("auto", "impression", "findings", "findings_impression", "full")

# A header: at the start of a line (after optional blanks), an upper-case name of
# letters, blanks and ( ) / , & - that ends in a letter or ')', then a colon.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&\-]*[A-Z)])[ \t]*:", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_PLACEHOLDER = re.compile(r"_{2,}")
_WHITESPACE = re.compile(r"\s+")

# Normalised names of frequent headers (lower case), after MIT-LCP's mapping.
_SECTION_ALIASES = {
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings/ impression": "impression",
    "impression and findings": "impression",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "findings": "findings",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "reference findings": "findings",
    "chest, two views": "findings",
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "reference exam": "comparison",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
    "indication": "indication",
    "clinical indication": "indication",
    "reason for examination": "indication",
    "reason for exam": "indication",
    "idication": "indication",
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "technique": "technique",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "pfi": "history",
    "notification": "notification",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "addendum": "addendum",
    "wet read": "wet read",
    "wetread": "wet read",
    "comment": "comment",
    "date": "date",
}
# Header names that contain one of these words map to it (e.g. "final impression").
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
# Headers that name the view are, by convention, a findings section ("PA AND LATERAL:").
_FINDINGS_HEADERS = re.compile(
    r"(chest|portable|pa and lat|lateral and pa|ap and lateral|lateral and ap|frontal and"
    r"|two views|frontal view|pa view|ap view|one view|lateral view|bone window"
    r"|frontal upright|frontal semi-upright|ribs)")


@dataclasses.dataclass(frozen=True)
class Section:
  """One section of a report.

  name: normalised name ("impression", "findings", "preamble", "last_paragraph", ...).
  header: the header as written (upper case), "" for preamble / full report / last paragraph.
  text: the raw section text (not normalised), without its header.
  start: character offset of ``text`` in the report.
  """
  name: str
  header: str
  text: str
  start: int


def normalize_section_name(header: str) -> str:
  """Maps a header as written ("FINDINGS AND IMPRESSION") to its normalised name."""
  name = _WHITESPACE.sub(" ", header.strip().lower())
  if name in _SECTION_ALIASES:
    return _SECTION_ALIASES[name]
  for main in _MAIN_SECTIONS:
    if main in name:
      return main
  if _FINDINGS_HEADERS.search(name):
    return "findings"
  return name


def normalize_text(text: str, placeholder: str = "___") -> str:
  """Collapses whitespace (newlines included) to single spaces and every run of two or
  more underscores (MIMIC de-identification placeholders, ``___``) to ``placeholder``."""
  text = _PLACEHOLDER.sub(placeholder, text)
  return _WHITESPACE.sub(" ", text).strip()


def _last_paragraph_split(text: str) -> tuple[str, str, int] | None:
  """(text before the last paragraph, last paragraph, offset of last paragraph) or None."""
  breaks = [m for m in _PARAGRAPH_BREAK.finditer(text.rstrip())]
  if not breaks:
    return None
  last = breaks[-1]
  head, tail = text[:last.start()], text[last.end():]
  if not tail.strip() or not head.strip():
    return None
  return head, tail, last.end()


def split_sections(text: str) -> list[Section]:
  """Splits a report into sections (see the module docstring for the conventions).

  Returns at least one section: "preamble" (text before the first header) followed
  by one section per header; a report without headers is one "full report" section.
  When neither an impression nor a findings section exists and the last section has
  more than one paragraph, its last paragraph is split off as "last_paragraph".
  """
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  headers = list(_HEADER.finditer(text))
  sections: list[Section] = []
  if not headers:
    sections.append(Section("full report", "", text, 0))
  else:
    sections.append(Section("preamble", "", text[:headers[0].start()], 0))
    for i, match in enumerate(headers):
      end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
      header = match.group(1)
      sections.append(Section(normalize_section_name(header), header.strip(),
                              text[match.end():end], match.end()))
  # Empty impression/findings sections are dropped: a report title that looks like a
  # header ("CHEST, PA LATERAL:") or a duplicated, empty FINDINGS must not win.
  sections = [s for s in sections
              if not (s.name in ("impression", "findings") and not s.text.strip())]
  if not sections:
    sections = [Section("full report", "", text, 0)]
  names = {s.name for s in sections}
  if "impression" not in names and "findings" not in names:
    last = sections[-1]
    split = _last_paragraph_split(last.text)
    if split is not None:
      head, tail, offset = split
      sections[-1] = dataclasses.replace(last, text=head)
      sections.append(Section("last_paragraph", "", tail, last.start + offset))
  return sections


def _last(sections: list[Section], name: str) -> Section | None:
  for section in reversed(sections):
    if section.name == name:
      return section
  return None


def extract_section(text: str, section: str = "auto", placeholder: str = "___") -> str:
  """Returns one normalised section of a report, or "" when it has none.

  section:
    "auto": the last IMPRESSION, else the last FINDINGS, else the last paragraph
      (else the whole report when it has a single paragraph).
    "impression" / "findings": the last section of that name ("" if absent).
    "findings_impression": the last FINDINGS followed by the last IMPRESSION (either
      may be absent; "" if both are).
    "full": the whole report.
  Whitespace is collapsed and de-identification placeholders normalised (see
  ``normalize_text``).
  """
  if section not in SECTION_CHOICES:
    raise ValueError(f"unknown report section {section!r}; choose one of {SECTION_CHOICES}")
  if section == "full":
    return normalize_text(text, placeholder)
  sections = split_sections(text)
  if section == "auto":
    for name in ("impression", "findings", "last_paragraph"):
      found = _last(sections, name)
      if found is not None and found.text.strip():
        return normalize_text(found.text, placeholder)
    # One paragraph, no usable header: the report itself is the last paragraph.
    return normalize_text(sections[-1].text if sections[-1].text.strip() else text, placeholder)
  if section in ("impression", "findings"):
    found = _last(sections, section)
    return normalize_text(found.text, placeholder) if found is not None else ""
  parts = [_last(sections, "findings"), _last(sections, "impression")]
  return normalize_text(" ".join(p.text for p in parts if p is not None), placeholder)
