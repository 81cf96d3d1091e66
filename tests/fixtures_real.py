"""Tiny fixture trees in the exact on-disk layouts of MIMIC-CXR-JPG/MIMIC-IV and INSPECT.

Each ``make_*`` function writes a tree under ``root`` and returns what a correct build
must produce, computed by hand (not by the code under test): examples per split with
their labels, and drop counts by reason. The trees contain malformed rows, corrupt and
missing files on purpose.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import zipfile
from pathlib import Path

import numpy as np

NAN = math.nan

MIMIC_META_COLS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                   "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices"]
ADMISSION_COLS = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                  "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                  "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"]
PATIENT_COLS = ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]


# configs/study_mimic.py's models shrunk for a test, on 16-px films (its configs/study_image_table.py
# too): a one-block ViT classifier for export and predict ...
TINY_CLASSIFIER = [
    "--config.data.image_size=16", "--config.model.image.patch_size=8", "--config.model.image.width=16",
    "--config.model.image.depth=1", "--config.model.image.num_heads=2", "--config.model.image.mlp_dim=32"]
# ... and a study: ViT-Ti of one block, a one-layer text tower, 2 pre-training steps, every example
# and one seed per cell, linear and distill fine-tuning.
TINY_STUDY = [
    "--config.data.image_size=16", "--config.data.num_workers=0", "--config.model.image.variant=ti",
    "--config.model.image.patch_size=8", "--config.model.image.depth=1",
    "--config.model.text.num_layers=1", "--config.model.text.hidden_size=32",
    "--config.model.text.num_heads=2", "--config.model.text.intermediate_size=64",
    "--config.model.embed_dim=16", "--config.train.steps=2", "--config.train.batch_size=2",
    "--config.train.progress=False", "--config.study.finetune=linear,distill", "--config.study.n_train=-1",
    "--config.study.seeds=0"]


def write_csv(path: Path, header: list[str], rows: list[list], *, gz: bool = False, delimiter: str = ",",
              raw_lines: dict[int, str] | None = None) -> None:
  """Writes a table; ``raw_lines`` {row index: text} injects malformed lines verbatim."""
  buf = io.StringIO()
  w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
  w.writerow(header)
  for i, row in enumerate(rows):
    if raw_lines and i in raw_lines:
      buf.write(raw_lines[i] + "\n")
    w.writerow(row)
  if raw_lines and len(rows) in raw_lines:
    buf.write(raw_lines[len(rows)] + "\n")
  data = buf.getvalue().encode()
  path.parent.mkdir(parents=True, exist_ok=True)
  if gz:
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", *, bits_stored: int = 12,
                slope: float = 1.0, intercept: float = 0.0, modality: str = "DX", **attributes) -> None:
  """A DICOM file as a digital radiograph's export writes it: ``pixels`` (uint16 [H, W] or
  [frames, H, W]) as stored values, with a rescale, and a patient name to check it never leaks."""
  import pydicom
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientName, ds.PatientID = modality, "Doe^Jane", "MRN-0042"
  pydicom.pixels.set_pixel_data(ds, np.asarray(pixels), photometric, bits_stored)
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  for name, value in attributes.items():
    setattr(ds, name, value)
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def equalize_like_opencv(img: np.ndarray) -> np.ndarray:
  """OpenCV's equalizeHist, level by level as its source does it: the darkest level present maps
  to 0 and each level above to saturate(round(running count x 255 / pixels above the darkest))."""
  hist = np.bincount(img.ravel(), minlength=256)
  darkest = next(v for v in range(256) if hist[v])
  if hist[darkest] == img.size:
    return img.copy()
  scale = np.float32(255.0) / np.float32(img.size - hist[darkest])
  lut, running = np.zeros(256, np.uint8), 0
  for level in range(darkest + 1, 256):
    running += int(hist[level])
    lut[level] = min(255, max(0, int(np.rint(np.float32(running) * scale))))
  return lut[img]


def write_jpeg(path: Path, h: int, w: int, value: int) -> None:
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.clip(value + (yy + xx) % 7, 0, 255).astype(np.uint8)
  Image.fromarray(img).save(path, format="JPEG", quality=95)


def _labels_row(values: dict[str, float]) -> list[str]:
  out = []
  for c in CHEXPERT:
    v = values.get(c, NAN)
    out.append("" if math.isnan(v) else f"{v:.1f}")
  return out


REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with cough
 
 FINDINGS: 
 
 Heart size is  enlarged.
 Mild   edema.
 
 IMPRESSION: 
 
 Cardiomegaly and ______ edema.
"""


def make_mimic_tree(root: Path) -> dict:
  """Writes a MIMIC-CXR-JPG (+reports zip, +MIMIC-IV hosp) tree; returns the expected build.

  With the test config image_size=16 and default views PA/AP, one image per study.
  """
  root = Path(root)
  meta, splits, labels, reports_zip, reports_files = [], [], [], {}, {}
  admissions, patients = [], []
  images: dict[str, tuple[int, int, int] | bytes | None] = {}  # rel path -> (h, w, value) | raw bytes | None

  def img_rel(subject, study, dicom):
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"

  def rep_rel(subject, study):
    return f"files/p{subject[:2]}/p{subject}/s{study}.txt"

  def add_image(dicom, subject, study, view, date, time, split, content=(40, 30, 100)):
    meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 3000, 2500, date, time, "x", "y", "z"])
    if split is not None:
      splits.append([dicom, study, subject, split])
    images[img_rel(subject, study, dicom)] = content

  def adm(subject, hadm, admit, disch, edreg=""):
    admissions.append([subject, hadm, admit, disch, "", "EW EMER.", "P1", "EMERGENCY ROOM", "HOME", "Other",
                       "ENGLISH", "SINGLE", "WHITE", edreg, "", 0])

  def pat(subject, dod="", gender="F", anchor_age=60, anchor_year=2180):
    patients.append([subject, gender, anchor_age, anchor_year, "2014 - 2016", dod])

  # S1: train. PA kept, LATERAL filtered. Report extracted on disk.
  # t0 = 2180-01-01 10:00. ED 09:00 -> admitted 12:00 (contains the study: no readmission);
  # new admission 2180-06-01 -> readmission 1. dod 2180-12-31 = t0 day + 365 days -> mortality 1.
  add_image("d1a", "10000001", "50000001", "PA", "21800101", "100000.000", "train", (40, 30, 100))
  add_image("d1b", "10000001", "50000001", "LATERAL", "21800101", "100100.000", "train")
  labels.append(["10000001", "50000001"] + _labels_row({"Cardiomegaly": 1.0, "Edema": -1.0, "Pneumonia": 0.0}))
  reports_files[rep_rel("10000001", "50000001")] = REPORT_FULL
  adm("10000001", 1, "2180-01-01 12:00:00", "2180-01-05 10:00:00", "2180-01-01 09:00:00")
  adm("10000001", 2, "2180-06-01 08:00:00", "2180-06-03 10:00:00")
  pat("10000001", "2180-12-31")

  # S2: train, AP. Only an IMPRESSION. Admission at t0 + 365 days + 1 minute -> 0; no dod -> 0.
  # StudyTime without leading zeros: 93015.5 = 09:30:15.5.
  add_image("d2a", "10000002", "50000002", "AP", "21800301", "93015.5", "train", (50, 40, 60))
  labels.append(["10000002", "50000002"] + _labels_row({"No Finding": 1.0}))
  reports_zip[rep_rel("10000002", "50000002")] = "FINAL REPORT\n IMPRESSION:  No acute process.\n"
  adm("10000002", 3, "2181-03-01 09:31:15", "2181-03-02 09:00:00")
  pat("10000002", "", "M", 47, 2178)  # 49 at the first study, 50 at the second
  # Same subject, second study (train): PA corrupt -> dropped file, falls back to the AP image.
  # t0 = 2181-04-01 12:00; an admission exactly t0 + 365 days (2182-04-01 12:00) -> readmission 1.
  add_image("d3a", "10000002", "50000003", "PA", "21810401", "120000", "train", b"not a jpeg at all")
  add_image("d3b", "10000002", "50000003", "AP", "21810401", "120500", "train", (30, 30, 200))
  labels.append(["10000002", "50000003"] + _labels_row({"Pleural Effusion": 1.0, "Support Devices": 1.0}))
  reports_zip[rep_rel("10000002", "50000003")] = "Comparison to prior.\n \n Lungs are  clear.\n"
  adm("10000002", 4, "2182-04-01 12:00:00", "2182-04-03 12:00:00")

  # S3: validate, image file missing.
  add_image("d4a", "11000003", "50000004", "PA", "21900101", "000000", "validate", None)
  labels.append(["11000003", "50000004"] + _labels_row({}))
  reports_zip[rep_rel("11000003", "50000004")] = "IMPRESSION: ok."
  pat("11000003")
  # S4: validate, report missing.
  add_image("d5a", "11000004", "50000005", "PA", "21900101", "000000", "validate")
  labels.append(["11000004", "50000005"] + _labels_row({}))
  pat("11000004")
  # S5: test, empty report.
  add_image("d6a", "12000005", "50000006", "PA", "21900101", "000000", "test")
  labels.append(["12000005", "50000006"] + _labels_row({}))
  reports_zip[rep_rel("12000005", "50000006")] = "  \n \n"
  pat("12000005")
  # S6: test, no label row.
  add_image("d7a", "12000006", "50000007", "PA", "21900101", "000000", "test")
  reports_zip[rep_rel("12000006", "50000007")] = "IMPRESSION: ok."
  pat("12000006")
  # S7: one subject in train and test -> both studies dropped.
  add_image("d8a", "13000007", "50000008", "PA", "21900101", "000000", "train")
  add_image("d9a", "13000007", "50000009", "PA", "21900201", "000000", "test")
  labels.append(["13000007", "50000008"] + _labels_row({}))
  labels.append(["13000007", "50000009"] + _labels_row({}))
  reports_zip[rep_rel("13000007", "50000008")] = "IMPRESSION: ok."
  reports_zip[rep_rel("13000007", "50000009")] = "IMPRESSION: ok."
  pat("13000007")
  # S8: test, malformed label value (2.0).
  add_image("d10a", "13000008", "50000010", "PA", "21900101", "000000", "test")
  bad = _labels_row({})
  bad[0] = "2.0"
  labels.append(["13000008", "50000010"] + bad)
  reports_zip[rep_rel("13000008", "50000010")] = "IMPRESSION: ok."
  pat("13000008")
  # S10: validate, fine, but the subject is not in MIMIC-IV patients -> outcomes NaN (warning).
  add_image("d11a", "14000010", "50000011", "AP", "21950505", "235959", "validate", (64, 32, 120))
  labels.append(["14000010", "50000011"] + _labels_row({"Fracture": 1.0, "Lung Lesion": -1.0}))
  reports_zip[rep_rel("14000010", "50000011")] = (
      " WET READ: ___ 10:00 PM\n   no ptx\n \n FINDINGS: Small fracture.\n \n IMPRESSION:\n \n NOTIFICATION: called\n")
  # S11: test, fine. dod before the study -> mortality NaN (warning). Admission containing the
  # study (admit before, discharge after) -> readmission 0.
  add_image("d12a", "14000011", "50000012", "PA", "21960606", "120000", "test", (30, 45, 90))
  labels.append(["14000011", "50000012"] + _labels_row({"Atelectasis": 0.0, "Lung Opacity": 1.0}))
  reports_zip[rep_rel("14000011", "50000012")] = "EXAMINATION: CHEST\n\nFINDINGS:\nLeft  lower lobe opacity.\n"
  adm("14000011", 5, "2196-06-05 10:00:00", "2196-06-20 10:00:00")
  pat("14000011", "2196-06-01", "F", 91, 2195)  # 91: MIMIC-IV's age for everyone over 89
  # S12: a selected dicom without a split row.
  add_image("d13a", "15000012", "50000013", "PA", "21900101", "000000", None)
  labels.append(["15000012", "50000013"] + _labels_row({}))
  pat("15000012")
  # S13: lateral-only study: filtered by view, nothing dropped.
  add_image("d14a", "15000013", "50000014", "LATERAL", "21900101", "000000", "train")
  labels.append(["15000013", "50000014"] + _labels_row({}))
  pat("15000013")
  # S14: StudyTime hour 25 -> malformed metadata row.
  add_image("d15a", "16000015", "50000015", "PA", "21900101", "256161", "train")
  labels.append(["16000015", "50000015"] + _labels_row({}))
  pat("16000015")

  write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_META_COLS, meta, gz=True,
            raw_lines={3: "dtrunc,17000001,50000099,CHEST"})  # too few fields
  write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], splits, gz=True,
            raw_lines={2: "dzz,50000098,17000002,holdout"})  # unknown split
  write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + CHEXPERT, labels, gz=True)
  write_csv(root / "mimic-cxr-2.0.0-negbio.csv.gz", ["subject_id", "study_id"] + CHEXPERT, labels, gz=True)
  hosp = root / "mimic-iv-2.2" / "hosp"
  write_csv(hosp / "admissions.csv.gz", ADMISSION_COLS, admissions, gz=True)
  write_csv(hosp / "patients.csv.gz", PATIENT_COLS, patients, gz=True)
  for rel, content in images.items():
    if content is None:
      continue
    if isinstance(content, bytes):
      (root / rel).parent.mkdir(parents=True, exist_ok=True)
      (root / rel).write_bytes(content)
    else:
      write_jpeg(root / rel, *content)
  for rel, text in reports_files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)
  with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as zf:
    for rel, text in reports_zip.items():
      zf.writestr(rel, text)
    zf.writestr("cxr-record-list.csv.gz", b"")  # other members of the archive are ignored

  def lab(**kw):
    out = {c: NAN for c in CHEXPERT}
    out.update({k.replace("_", " "): v for k, v in kw.items() if k not in ("readmission", "mortality")})
    out["readmission_12m"] = kw.get("readmission", 0.0)
    out["mortality_12m"] = kw.get("mortality", 0.0)
    return out

  expected = {
      "examples": {
          "train": {
              "50000001": {"dicom_id": "d1a", "view": "PA", "sex": "F", "age": "50-64", "shape": (21, 16),
                           "report": "Cardiomegaly and ___ edema.",
                           "labels": lab(Cardiomegaly=1.0, Edema=-1.0, Pneumonia=0.0, readmission=1.0, mortality=1.0)},
              "50000002": {"dicom_id": "d2a", "view": "AP", "sex": "M", "age": "<50", "shape": (20, 16),
                           "report": "No acute process.",
                           "labels": lab(No_Finding=1.0)},
              "50000003": {"dicom_id": "d3b", "view": "AP", "sex": "M", "age": "50-64", "shape": (16, 16),
                           "report": "Lungs are clear.",
                           "labels": lab(Pleural_Effusion=1.0, Support_Devices=1.0, readmission=1.0)},
          },
          "validation": {
              "50000011": {"dicom_id": "d11a", "view": "AP", "sex": "", "age": "", "shape": (32, 16),
                           "report": "Small fracture.",
                           "labels": lab(Fracture=1.0, Lung_Lesion=-1.0, readmission=NAN, mortality=NAN)},
          },
          "test": {
              "50000012": {"dicom_id": "d12a", "view": "PA", "sex": "F", "age": "80+", "shape": (16, 24),
                           "report": "Left lower lobe opacity.",
                           "labels": lab(Atelectasis=0.0, Lung_Opacity=1.0, mortality=NAN)},
          },
      },
      "dropped": {"corrupt_image": 1, "missing_image": 1, "missing_report": 1, "empty_report": 1,
                  "label_row_missing": 1, "malformed_row": 4, "patient_straddles_splits": 2,
                  "split_row_missing": 1},
      "dropped_paths": {
          "corrupt_image": "files/p10/p10000002/s50000003/d3a.jpg",
          "missing_image": "files/p11/p11000003/s50000004/d4a.jpg",
          "missing_report": "s50000005.txt",
          "empty_report": "s50000006.txt",
      },
      "dropped_ids": {"label_row_missing": ["50000007"], "patient_straddles_splits": ["50000008", "50000009"],
                      "split_row_missing": ["d13a"]},
      "filtered": {"view": 2, "other_images_of_study": 1},
      "warnings": {"subject_not_in_mimic_iv": 1, "dod_before_study": 1},
  }
  return expected


# ----------------------------------------------------------------------------- INSPECT

INSPECT_TASKS = ["pe_positive_nlp", "1_month_mortality", "6_month_mortality", "12_month_mortality",
                 "1_month_readmission", "6_month_readmission", "12_month_readmission", "12_month_PH"]


def inspect_volume_hu(seed: int, shape=(12, 10, 8)) -> np.ndarray:
  """A small HU volume in RAS+ order whose content depends on x, y and z (orientation matters)."""
  x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  return (-1000 + 60 * x + 25 * y + 90 * z + 7 * seed).astype(np.int16)


def write_nifti(path: Path, hu: np.ndarray, spacing=(1.5, 1.5, 2.5), flip_x: bool = False) -> None:
  """Writes ``hu`` (RAS+ voxel order) as NIfTI; ``flip_x`` stores it mirrored with a matching
  affine (same anatomy, another voxel order)."""
  import nibabel as nib
  path.parent.mkdir(parents=True, exist_ok=True)
  affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
  data = hu
  if flip_x:
    data = hu[::-1]
    affine = affine.copy()
    affine[0, 0] = -spacing[0]
    affine[0, 3] = (hu.shape[0] - 1) * spacing[0]
  nib.save(nib.Nifti1Image(data, affine), str(path))


def make_inspect_tree(root: Path, layout: str = "v2") -> dict:
  """Writes an INSPECT tree in the v2 CSV or the 2025 TSV layout; returns the expected build."""
  root = Path(root)
  T, F, C = ("TRUE", "FALSE", "Censor") if layout == "2025" else ("True", "False", "Censored")
  # impression_id -> (person_id, split, image stem, labels (8 strings) or None, impression or None, volume)
  # volume: "ok" | "flip" | "missing" | "corrupt"
  spec = {
      "1001": ("P1", "train", "PE1001_a", [T, F, F, C, F, T, C, F], "1. Acute  PE.\n2. ___ nodule.", "ok"),
      "1002": ("P2", "train", "PE1002_b", [F, F, F, F, F, F, F, T], "No PE.", "flip"),
      "1003": ("P3", "valid", "PE1003_c", [C, C, C, C, C, C, C, C], "Limited study.", "ok"),
      "1004": ("P4", "test", "PE1004_d", [T, T, T, T, F, F, F, F], "Saddle embolus.", "ok"),
      "1005": ("P5", "test", "PE1005_e", [F] * 8, "No PE.", "missing"),
      "1006": ("P6", "test", "PE1006_f", [F] * 8, "No PE.", "corrupt"),
      "1007": ("P7", "valid", "PE1007_g", [F] * 8, "   \n ", "ok"),
      "1008": ("P8", "train", "PE1008_h", None, "No PE.", "ok"),
      "1009": ("P9", "train", "PE1009_i", [F, "maybe", F, F, F, F, F, F], "No PE.", "ok"),
      "1010": ("P10", "train", "PE1010_j", [F] * 8, "No PE.", "ok"),
      "1011": ("P10", "test", "PE1011_k", [F] * 8, "No PE.", "ok"),
      "1012": ("P12", "holdout", "PE1012_l", [F] * 8, "No PE.", "ok"),
      "1013": ("P13", "test", None, [F] * 8, "No PE.", "ok"),
      "1014": ("P14", "train", "PE1014_n", [F] * 8, None, "ok"),
  }
  vol_dir = root / "CTPA"
  meta_rows, label_rows, split_rows, imp_rows = [], [], [], []
  for i, (imp, (person, split, stem, labels, text, vol)) in enumerate(spec.items()):
    split_rows.append([imp, split])
    if stem is not None:
      image_id = stem if layout == "2025" else stem + ".nii.gz"
      meta_rows.append([imp, person, image_id, f"2019-01-{i + 1:02d} 10:00:00"])
      path = vol_dir / f"{stem}.nii.gz"
      if vol in ("ok", "flip"):
        write_nifti(path, inspect_volume_hu(int(imp)), flip_x=vol == "flip")
      elif vol == "corrupt":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x1f\x8b\x08\x00garbage, not a volume")
    if labels is not None:
      label_rows.append([imp] + labels)
    if text is not None:
      imp_rows.append([imp, text])
  label_rows.append(["1099"] + [F] * 8)  # labelled but in no split

  if layout == "2025":
    write_csv(root / "study_mapping_20250611.tsv", ["impression_id", "person_id", "image_id", "procedure_DATETIME"],
              meta_rows, delimiter="\t")
    write_csv(root / "labels_20250611.tsv", ["impression_id"] + INSPECT_TASKS, label_rows, delimiter="\t")
    write_csv(root / "labels_20250101.tsv", ["garbage"], [["x"]], delimiter="\t")  # older copy: ignored
    write_csv(root / "splits_20250611.tsv", ["impression_id", "split"], split_rows, delimiter="\t")
    write_csv(root / "impressions_20250611.tsv", ["impression_id", "impressions"], imp_rows, delimiter="\t")
  else:
    write_csv(root / "Final_metadata.csv", ["impression_id", "person_id", "image_id", "procedure_DATETIME"],
              meta_rows)
    write_csv(root / "Final_labels_20240101.csv", ["impression_id"] + INSPECT_TASKS, label_rows)
    write_csv(root / "Final_splits.csv", ["impression_id", "split"], split_rows)
    write_csv(root / "Final_impressions.csv", ["impression_id", "impressions"], imp_rows)

  def lab(values):
    values_map = {"True": 1.0, "TRUE": 1.0, "False": 0.0, "FALSE": 0.0}
    return {t: values_map.get(v, NAN) for t, v in zip(INSPECT_TASKS, values)}

  def ex(imp, report):
    person, _, stem, labels, _, vol = spec[imp]
    return {"patient_id": person, "image_id": stem + ".nii.gz", "report": report, "labels": lab(labels),
            "volume": str(vol_dir / f"{stem}.nii.gz"), "flip": vol == "flip"}

  return {
      "examples": {
          "train": {"1001": ex("1001", "1. Acute PE. 2. ___ nodule."), "1002": ex("1002", "No PE.")},
          "validation": {"1003": ex("1003", "Limited study.")},
          "test": {"1004": ex("1004", "Saddle embolus.")},
      },
      "dropped": {"missing_image": 1, "corrupt_image": 1, "empty_report": 1, "label_row_missing": 1,
                  "malformed_row": 2, "patient_straddles_splits": 2, "metadata_row_missing": 1,
                  "missing_report": 1},
      "dropped_ids": {"missing_image": ["1005"], "corrupt_image": ["1006"], "empty_report": ["1007"],
                      "label_row_missing": ["1008"], "patient_straddles_splits": ["1010", "1011"],
                      "metadata_row_missing": ["1013"], "missing_report": ["1014"]},
      "filtered": {"not_in_splits_file": 1},
  }
