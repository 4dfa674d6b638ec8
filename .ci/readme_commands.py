"""Prints one of the two set-up commands from the top of README.md (`run` or `test`).

The README's first fenced ``bash`` block holds exactly two lines: the first installs and runs the main job,
the second installs the test extra and runs the tests. CI runs the second verbatim.
"""

import pathlib
import re
import sys


def setup_commands(readme: str) -> list[str]:
  m = re.search(r"```bash\n(.*?)```", readme, re.S)
  if not m:
    raise SystemExit("README.md has no ```bash block with the set-up commands")
  lines = [l.strip() for l in m.group(1).splitlines() if l.strip() and not l.strip().startswith("#")]
  if len(lines) != 2:
    raise SystemExit(f"README.md's first bash block must hold exactly 2 commands, found {len(lines)}")
  return lines


if __name__ == "__main__":
  which = sys.argv[1] if len(sys.argv) > 1 else "test"
  cmds = setup_commands((pathlib.Path(__file__).parent.parent / "README.md").read_text())
  print(cmds[{"run": 0, "test": 1}[which]])
