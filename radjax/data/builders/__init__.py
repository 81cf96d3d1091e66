"""TFDS builders, by dataset name. Imported lazily: tensorflow_datasets is slow to import."""

from __future__ import annotations

import importlib

# name -> "module:BuilderClass"
_BUILDERS = {
    "synth_cxr": "radjax.data.builders.synth_cxr:SynthCXRBuilder",
    "mimic_cxr": "radjax.data.builders.mimic_cxr:MimicCXRBuilder",
    "inspect": "radjax.data.builders.inspect:InspectBuilder",
    "image_table": "radjax.data.builders.image_table:ImageTableBuilder",
}


def names() -> list[str]:
  return sorted(_BUILDERS)


def get_builder_class(name: str):
  """Returns the TFDS builder class for ``name``; unknown names list the known ones."""
  if name not in _BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}")
  module, cls = _BUILDERS[name].split(":")
  return getattr(importlib.import_module(module), cls)
