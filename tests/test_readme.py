"""Every command in README.md is checked: the two set-up commands come first; every ``python -m maejax.X`` module
exists and defines the flags the README passes it; every ``--config=FILE:VARIANT`` loads and every
``--config.a.b=…`` override names an existing key; scripts exist. Blocks preceded by ``<!-- runnable -->`` are
executed (in a scratch directory holding ``workdir/au_occl`` = the shared smoke workdir, ``faces/`` and
``clip.mp4``)."""

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib

import numpy as np
from PIL import Image

from maejax import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = ('pip install -e . && python -m maejax.main --config=configs/au_occl.py',
         'pip install -e ".[test]" && pytest -q -n 2 --dist loadgroup')
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)
MAEJAX = re.compile(r"python -m (maejax[\w.]*)((?:[ \t]+--[\w.\-]+(?:=[^\s\"']+)?)*)")
FLAG = re.compile(r"--([\w.\-]+)(?:=([^\s\"']+))?")


def _readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def blocks(text=None):
  """``[(info, body, runnable)]`` of every fenced block, in order."""
  text = _readme() if text is None else text
  out = []
  for m in FENCE.finditer(text):
    before = text[:m.start()].rstrip().splitlines()[-1:] or [""]
    out.append((m.group(1), m.group(2), before[0].strip() == "<!-- runnable -->"))
  return out


def commands(body):
  """Command lines of a shell block (comments dropped, ``\\`` continuations joined)."""
  body = re.sub(r"\\\n\s*", " ", body)
  lines = [" ".join(re.sub(r"\s+#.*$", "", l).split()) for l in body.splitlines()]
  return [l for l in lines if l and not l.startswith("#")]


def shell_blocks():
  return [(body, run) for info, body, run in blocks() if info in ("bash", "sh", "")]


def maejax_calls():
  """``[(module, {flag: value})]`` of every ``python -m maejax.X`` in the README's shell blocks."""
  calls = []
  for body, _ in shell_blocks():
    for line in commands(body):
      for m in MAEJAX.finditer(line):
        calls.append((m.group(1), dict(FLAG.findall(m.group(2)))))
  return calls


@functools.cache
def load_config(spec):
  return config_utils.load_config(os.path.join(ROOT, spec))


def has_key(config, dotted):
  node = config
  for k in dotted.split("."):
    if not hasattr(node, "keys") or k not in node:
      return False
    node = node[k]
  return True


@functools.cache
def help_text(module):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  p = subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  if "--helpfull" in p.stderr and "unrecognized" in p.stderr:  # argparse, not absl
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  return p.stdout


def test_setup_commands_are_the_first_block():
  info, body, _ = blocks()[0]
  assert info == "bash"
  assert tuple(commands(body)) == SETUP
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    assert "test" in tomllib.load(f)["project"]["optional-dependencies"]


def test_parser_on_a_sample():
  sample = "x\n<!-- runnable -->\n```bash\npython -m maejax.predict --a=1 --b \\\n  --c=x  # note\n```\n"
  (info, body, run), = blocks(sample)
  assert info == "bash" and run
  assert commands(body) == ["python -m maejax.predict --a=1 --b --c=x"]


def test_every_module_exists_and_defines_its_flags():
  calls = maejax_calls()
  assert {"maejax.main", "maejax.convert", "maejax.predict", "maejax.data.prepare"} <= {m for m, _ in calls}
  for module, flags in calls:
    assert importlib.util.find_spec(module) is not None, module
    names = [f for f in flags if not f.startswith("config.") and f != "config"]
    if not names:
      continue
    text = help_text(module)
    for name in names:
      assert re.search(rf"--(\[no\])?{re.escape(name)}\b", text), f"README: {module} has no flag --{name}"


def test_every_config_and_override_loads():
  n = 0
  for module, flags in maejax_calls():
    if "config" not in flags:
      continue
    assert module == "maejax.main"
    config = load_config(flags["config"])
    n += 1
    for name in flags:
      if name.startswith("config."):
        assert has_key(config, name[len("config."):]), f"README: {flags['config']} has no key {name}"
  assert n >= 8
  # The scaling block's bare override lines apply to any stage: check them against mae_pretrain.
  for body, _ in shell_blocks():
    for line in commands(body):
      if line.startswith("--config."):
        for name, _ in FLAG.findall(line):
          assert has_key(load_config("configs/mae_pretrain.py"), name[len("config."):]), line


def test_scripts_exist():
  for body, _ in shell_blocks():
    for line in commands(body):
      for script in re.findall(r"python ((?:benchmarks|maejax)/[\w/]+\.py)", line):
        assert os.path.exists(os.path.join(ROOT, script)), script


def _scratch(tmp_path, workdir):
  """The files the runnable blocks name: workdir/au_occl, faces/ (3 PNGs), clip.mp4 (5 frames)."""
  import av

  from maejax.data import synthfaces

  os.makedirs(tmp_path / "workdir")
  os.symlink(workdir, tmp_path / "workdir" / "au_occl")
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  src = synthfaces.SynthFaces(seed=1, num_subjects=2, frames_per_subject=5, image_size=64)
  (tmp_path / "faces").mkdir()
  for i in range(3):
    Image.fromarray(src[i]["image"]).save(tmp_path / "faces" / f"{i}.png")
  with av.open(str(tmp_path / "clip.mp4"), "w") as c:
    stream = c.add_stream("mpeg4", rate=25)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    for i in range(5):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(src[i]["image"]), format="rgb24")
      for packet in stream.encode(frame):
        c.mux(packet)
    for packet in stream.encode():
      c.mux(packet)


def _rows(path):
  with open(path) as f:
    return len(f.read().strip().splitlines()) - 1


def test_runnable_blocks_run(au_smoke_run, tmp_path):
  runnable = [body for body, run in shell_blocks() if run]
  assert len(runnable) >= 2
  _scratch(tmp_path, au_smoke_run.workdir)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # The README says `python`: make it this interpreter, also when its virtual environment is not activated.
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  ran = []
  for body in runnable:
    for line in commands(body):
      p = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
      assert p.returncode == 0, f"README command failed: {line}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
      ran.append(shlex.split(line)[2])
  assert "maejax.predict" in ran and "maejax.data.synthfaces" in ran
  # What the predict block promises: one row per image / frame.
  assert _rows(tmp_path / "preds.csv") == 3 and _rows(tmp_path / "preds_drop.csv") == 3
  assert _rows(tmp_path / "clip.csv") == 5
  assert (tmp_path / "synthfaces_grid.png").stat().st_size > 0
