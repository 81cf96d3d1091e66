"""Folders radjax writes to: local or mounted, never URLs; ``~`` expanded.

Workdirs (checkpoints, ``metrics.jsonl``, ``config.json``, TensorBoard events, the study's cells)
and dataset builds are written with ``os``/``open``; given ``gs://bucket/run`` they would quietly
create a local folder ``gs:/bucket/run`` on every host, and a preempted VM would lose its
checkpoints with its disk. Such paths are refused before any work starts; a bucket mounted with
gcsfuse (or any filesystem every process sees) works, as launch/README.md says. ``~`` is expanded
here because a shell leaves it alone in ``--config.KEY=~/x`` (not a variable assignment).
"""

from __future__ import annotations

import os
import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RemotePathError(ValueError):
  """A URL where radjax needs a local or mounted folder."""


def local_dir(path: str | os.PathLike, what: str = "--workdir") -> str:
  """The absolute local path of ``path`` (``~`` expanded). A URL raises :class:`RemotePathError`
  naming ``what`` (the flag or config key it came from)."""
  path = os.fspath(path)
  if _URL.match(path):
    raise RemotePathError(
        f"{what} {path!r} is a URL: radjax writes there with local file calls, which would create "
        f"the local folder {os.path.abspath(path)!r} instead. Mount the bucket (e.g. gcsfuse) or use "
        f"a filesystem every process sees, and pass that path.")
  return os.path.abspath(os.path.expanduser(path))
