"""Report section extraction (MIT-LCP section_text conventions)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radjax.data import reports as R

MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""


def test_full_report_sections():
  names = [s.name for s in R.split_sections(MIMIC)]
  assert names == ["preamble", "examination", "indication", "technique", "comparison", "findings", "impression"]
  assert R.extract_section(MIMIC, "impression") == "No acute cardiopulmonary process."
  assert R.extract_section(MIMIC, "auto") == "No acute cardiopulmonary process."
  assert R.extract_section(MIMIC, "findings") == (
      "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
      "nodular opacities that most likely represent nipple shadows.")
  assert R.extract_section(MIMIC, "findings_impression") == (
      R.extract_section(MIMIC, "findings") + " No acute cardiopulmonary process.")
  full = R.extract_section(MIMIC, "full")
  assert full.startswith("FINAL REPORT EXAMINATION: CHEST (PA AND LAT) INDICATION: ___F with")
  assert "\n" not in full and "  " not in full


def test_section_offsets_point_into_the_text():
  for s in R.split_sections(MIMIC):
    assert MIMIC[s.start:s.start + len(s.text)] == s.text


def test_auto_falls_back_to_findings_then_last_paragraph():
  no_impression = "INDICATION: cough\n\nFINDINGS: Lungs are clear.\n"
  assert R.extract_section(no_impression, "auto") == "Lungs are clear."
  assert R.extract_section(no_impression, "impression") == ""
  assert R.extract_section(no_impression, "findings_impression") == "Lungs are clear."
  no_headers = "Comparison is made to the prior study.\n \nThe lungs are  clear.\n\n"
  assert R.extract_section(no_headers, "auto") == "The lungs are clear."
  assert [s.name for s in R.split_sections(no_headers)] == ["full report", "last_paragraph"]
  assert R.extract_section("Single paragraph,\nno headers.", "auto") == "Single paragraph, no headers."
  other_headers = "INDICATION: fever\n\nCOMPARISON: none.\n\nPortable chest.\n\nNo pneumonia.\n"
  assert R.extract_section(other_headers, "auto") == "No pneumonia."
  assert R.extract_section(other_headers, "findings") == ""


def test_last_impression_wins_and_empty_ones_are_ignored():
  text = "IMPRESSION: first.\n\nADDENDUM: see below.\n\nIMPRESSION: second.\n"
  assert R.extract_section(text, "auto") == "second."
  empty = "FINDINGS: Small effusion.\n\nIMPRESSION:\n \n"
  assert R.extract_section(empty, "auto") == "Small effusion."
  assert "impression" not in [s.name for s in R.split_sections(empty)]


def test_section_name_normalisation():
  assert R.normalize_section_name("FINDINGS AND IMPRESSION") == "impression"
  assert R.normalize_section_name("CONCLUSION") == "impression"
  assert R.normalize_section_name("IMPRESSON") == "impression"
  assert R.normalize_section_name("FINAL IMPRESSION") == "impression"
  assert R.normalize_section_name("PA AND LATERAL VIEWS OF THE CHEST") == "findings"
  assert R.normalize_section_name("CHEST, TWO VIEWS") == "findings"
  assert R.normalize_section_name("REASON FOR EXAM") == "indication"
  assert R.normalize_section_name("CLINICAL  HISTORY") == "history"
  assert R.normalize_section_name("NOTIFICATION") == "notification"
  text = "CHEST, PA AND LATERAL:\nHeart normal.\n\nCONCLUSION: Normal chest.\n"
  assert R.extract_section(text, "findings") == "Heart normal."
  assert R.extract_section(text, "impression") == "Normal chest."


def test_headers_only_at_line_start_and_notification_ends_impression():
  text = "IMPRESSION: Tube tip, see NOTE: here.\nET TUBE: 3 cm above carina.\n\nNOTIFICATION: Dr. ___ paged.\n"
  # "NOTE:" is mid-line (not a header); "ET TUBE:" starts a line (a header, as in MIT-LCP's parser).
  assert R.extract_section(text, "impression") == "Tube tip, see NOTE: here."
  assert R.extract_section("IMPRESSION: ok.\r\nNOTIFICATION: called.\r\n", "auto") == "ok."


def test_placeholders_and_whitespace():
  assert R.normalize_text("  a\t\tb \n\n c  ") == "a b c"
  assert R.normalize_text("seen by ______ on ___ at __") == "seen by ___ on ___ at ___"
  assert R.normalize_text("Dr. ____", placeholder="[DEID]") == "Dr. [DEID]"
  assert R.normalize_text("snake_case stays") == "snake_case stays"
  assert R.extract_section("IMPRESSION: Called Dr. _____ at  ___ pm.", "auto") == "Called Dr. ___ at ___ pm."


def test_empty_and_bad_input():
  assert R.extract_section("", "auto") == ""
  assert R.extract_section("  \n \n ", "auto") == ""
  assert R.extract_section("IMPRESSION:", "impression") == ""
  with pytest.raises(ValueError, match="unknown report section"):
    R.extract_section("x", "summary")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("AFIMNOPRSDGT :_\n\t.ab,")), max_size=200),
       st.sampled_from(R.SECTION_CHOICES))
def test_any_text_gives_normalised_output(text, section):
  out = R.extract_section(text, section)
  assert out == out.strip() and "\n" not in out and "\t" not in out and "  " not in out
  assert "____" not in out
