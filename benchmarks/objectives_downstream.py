r"""The pretraining objectives downstream (issue: does any objective give a better start for occlusion-robust AU
detection than the plain MAE at equal cost?): per objective, the AU teacher's clean F1 and the
occlusion-augmented student's F1 under the large blocks, mean ± std over seeds, and each objective's per-seed
paired difference to the plain MAE.

  python -m maejax.main --config=configs/au_occl.py:objectives,objective=sdae,seed=0 --workdir=runs/obj_sdae_s0
  python benchmarks/objectives_downstream.py mae=runs/default_s0/report sdae=runs/obj_sdae_s0/report ...

Each argument is ``OBJECTIVE=REPORT_DIR`` (a ``report.json`` written by the chained job; its seed is read from
it). The default job (``configs/au_occl.py``) trains the MAE, the teacher and the occlusion-augmented student of
``:objectives,objective=mae`` with the same configs and seeds, so its report serves as the ``mae`` reference.
"""

from __future__ import annotations

import collections

import common as bc  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
from absl import app

from maejax import report

MEASURES = (("teacher clean", "clean teacher", "clean"), ("occl-aug blocks", "occl-aug baseline", "blocks"))


def main(argv):
  runs = collections.defaultdict(dict)  # objective -> {seed: Run}
  for arg in argv[1:]:
    name, sep, path = arg.partition("=")
    if not sep:
      raise app.UsageError(f"argument {arg!r}: expected OBJECTIVE=REPORT_DIR")
    run = report.load_run(path)
    if run.seed in runs[name]:
      raise app.UsageError(f"{name}: two runs of seed {run.seed} ({runs[name][run.seed].path}, {run.path})")
    runs[name][run.seed] = run
  if "mae" not in runs:
    raise app.UsageError("no mae=REPORT_DIR: the plain MAE is the reference")
  header = ["objective", "seeds"]
  for label, _, _ in MEASURES:
    header += [label, f"{label} − mae per seed"]
  body = []
  for name, by_seed in runs.items():
    cells = [name, ",".join(str(s) for s in sorted(by_seed))]
    for _, row, col in MEASURES:
      vals = {s: 100 * r.avg_f1[row][col] for s, r in by_seed.items()}
      ref = {s: 100 * r.avg_f1[row][col] for s, r in runs["mae"].items()}
      v = np.array(list(vals.values()))
      cells.append(f"{v.mean():.1f} ± {v.std():.1f}")
      d = report.paired_difference(vals, ref)
      cells.append("-" if name == "mae" else " ".join(f"{x:+.1f}" for x in d["diff"]) or "no shared seed")
    body.append(cells)
  print("\n".join(report.text_table(header, body)))


if __name__ == "__main__":
  app.run(main)
