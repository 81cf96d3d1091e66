"""The README's quick start is what CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start_commands():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_commands():
  commands = _quick_start_commands()
  assert len(commands) == 2, commands
  assert all("\n" not in c for c in commands)


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  assert _quick_start_commands()[1] in ci


def test_main_job_config_exists():
  install_and_run = _quick_start_commands()[0]
  for config in re.findall(r"--config (\S+?)(?::\w+)? ", install_and_run + " "):
    assert (ROOT / config).exists(), config
