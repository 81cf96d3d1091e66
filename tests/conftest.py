"""Session-wide test settings.

Compiled programs are shared through one JAX compilation cache per test session: pytest-xdist's
workers and the ``radjax`` subprocesses tests start inherit its folder from the environment, so a
program one of them compiled is not compiled again (the tests compile the same tiny models
often). The folder is new for each session, so no test reads a program an earlier session (or
another version of the code) wrote; a ``JAX_COMPILATION_CACHE_DIR`` already set is used instead.
"""

import os
import shutil
import tempfile

_OWNER = "RADJAX_TEST_COMPILATION_CACHE_OWNER"


def pytest_configure(config):
  del config
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller, or a run without xdist
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="radjax-test-xla-")
    os.environ[_OWNER] = str(os.getpid())


def pytest_unconfigure(config):
  del config
  if os.environ.get(_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)
