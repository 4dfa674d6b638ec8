"""The occlusion-robustness report: avg-F1 table (rows = models, columns = occlusion conditions), per-AU F1
CSV, JSON, and PNGs (F1 vs occluded ratio, example predictions, the learned AU relation graph).

``results`` (from ``au_infer.evaluate``): ``{row: {condition: {"f1": (N,), "ratio": float,
"adjacency": (N, N), "examples": [(image uint8 (S, S, 3), labels (N,), probs (N,)), ...]}}}``.

Several seeds: ``python -m maejax.report DIR1 DIR2 ...`` prints mean ± std over the ``report.json`` files.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Column names of the table, and the "large blocks" average of the acceptance criteria.
SHORT = {"clean": "clean", "patches_10": "patch10", "patches_30": "patch30", "patches_50": "patch50",
         "block_upper": "upper", "block_lower": "lower", "block_random": "rndblk", "mask": "mask",
         "glasses": "glasses", "hand": "hand", "patches_random": "patchR", "block_left": "left",
         "block_right": "right"}
BLOCKS = ("block_upper", "block_lower", "block_random")
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def mean_f1(results: Mapping[str, Mapping[str, Mapping]]) -> dict[str, dict[str, float]]:
  """``{row: {condition: avg F1 over AUs}}`` plus ``"blocks"`` = mean over the large-block conditions."""
  out = {}
  for row, conds in results.items():
    out[row] = {c: float(np.mean(v["f1"])) for c, v in conds.items()}
    if all(b in conds for b in BLOCKS):
      out[row]["blocks"] = float(np.mean([out[row][b] for b in BLOCKS]))
  return out


def format_table(table: Mapping[str, Mapping[str, float]], conditions: Sequence[str],
                 spread: Mapping[str, Mapping[str, float]] | None = None) -> str:
  """Fixed-width text table of avg F1 (×100); ``spread`` adds ``±std``."""
  cols = list(conditions) + (["blocks"] if all(b in conditions for b in BLOCKS) else [])
  width = max(7, *(len(SHORT.get(c, c)) for c in cols)) + (5 if spread else 0)
  rw = max(len("model"), *(len(r) for r in table))
  lines = ["avg F1 (x100) over AUs, held-out subjects; 'blocks' = mean of upper/lower/random large blocks",
           "model".ljust(rw) + "".join(SHORT.get(c, c).rjust(width + 1) for c in cols)]
  for row, vals in table.items():
    cells = []
    for c in cols:
      v = vals.get(c, float("nan")) * 100
      s = f"{v:.1f}" + (f"±{spread[row].get(c, 0) * 100:.1f}" if spread else "")
      cells.append(s.rjust(width + 1))
    lines.append(row.ljust(rw) + "".join(cells))
  return "\n".join(lines)


def write_csv(path: str, results: Mapping[str, Mapping[str, Mapping]], aus: Sequence[int]) -> str:
  """One line per (model, condition): occluded ratio, avg F1 and the F1 of every AU."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["model", "condition", "occluded_ratio", "avg_f1"] + [f"AU{a}" for a in aus])
    for row, conds in results.items():
      for c, v in conds.items():
        w.writerow([row, c, f"{v['ratio']:.4f}", f"{np.mean(v['f1']):.4f}"] + [f"{x:.4f}" for x in v["f1"]])
  return path


# ------------------------------------------------------------------------------------------------ PNGs


def _axes(draw: ImageDraw.ImageDraw, box, xr, yr, xlabel: str, ylabel: str):
  x0, y0, x1, y1 = box
  draw.rectangle(box, outline=(0, 0, 0))
  for t in np.linspace(yr[0], yr[1], 6):
    y = y1 - (t - yr[0]) / (yr[1] - yr[0]) * (y1 - y0)
    draw.line([(x0 - 4, y), (x0, y)], fill=(0, 0, 0))
    draw.text((x0 - 34, y - 6), f"{t:.2f}", fill=(0, 0, 0))
  for t in np.linspace(xr[0], xr[1], int(round((xr[1] - xr[0]) * 10)) + 1):
    x = x0 + (t - xr[0]) / (xr[1] - xr[0]) * (x1 - x0)
    draw.line([(x, y1), (x, y1 + 4)], fill=(0, 0, 0))
    draw.text((x - 10, y1 + 6), f"{t:.1f}", fill=(0, 0, 0))
  draw.text(((x0 + x1) // 2 - 40, y1 + 22), xlabel, fill=(0, 0, 0))
  draw.text((4, y0 - 16), ylabel, fill=(0, 0, 0))
  return lambda x, y: (x0 + (x - xr[0]) / (xr[1] - xr[0]) * (x1 - x0), y1 - (y - yr[0]) / (yr[1] - yr[0]) * (y1 - y0))


def plot_f1_vs_ratio(path: str, results: Mapping[str, Mapping[str, Mapping]]) -> str:
  """Avg F1 against the measured occluded fraction: a line over clean + random patches per model, and a
  marker per other condition (large blocks, realistic occluders)."""
  im = Image.new("RGB", (720, 440), (255, 255, 255))
  d = ImageDraw.Draw(im)
  f1s = [np.mean(v["f1"]) for conds in results.values() for v in conds.values()]
  lo = max(0.0, np.floor(min(f1s) * 10) / 10)
  to_px = _axes(d, (60, 30, 480, 390), (0.0, 0.6), (lo, 1.0), "occluded fraction of the image", "avg F1")
  for i, (row, conds) in enumerate(results.items()):
    col = PALETTE[i % len(PALETTE)]
    line = sorted((v["ratio"], np.mean(v["f1"])) for c, v in conds.items() if c == "clean" or
                  c.startswith("patches_"))
    if len(line) > 1:
      d.line([to_px(x, y) for x, y in line], fill=col, width=2)
    for c, v in conds.items():
      x, y = to_px(min(v["ratio"], 0.6), np.mean(v["f1"]))
      if c.startswith("block_"):
        d.rectangle([x - 3, y - 3, x + 3, y + 3], outline=col, width=2)
      elif c in ("mask", "glasses", "hand"):
        d.polygon([(x, y - 4), (x - 4, y + 3), (x + 4, y + 3)], outline=col)
      else:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    d.line([(495, 40 + 18 * i), (520, 40 + 18 * i)], fill=col, width=3)
    d.text((525, 34 + 18 * i), row, fill=(0, 0, 0))
  d.text((495, 60 + 18 * len(results)), "line/dots: clean + patches\nsquares: large blocks\n"
         "triangles: mask, glasses, hand", fill=(0, 0, 0))
  im.save(path)
  return path


def plot_examples(path: str, examples: Mapping[str, Sequence], aus: Sequence[int], scale: int = 2) -> str:
  """Rows = conditions; each cell an occluded input with its true (T) and predicted (P, p ≥ 0.5) AUs."""
  rows = [(c, ex) for c, ex in examples.items() if ex]
  if not rows:
    raise ValueError("plot_examples: no examples to draw")
  s = rows[0][1][0][0].shape[0] * scale
  cols = max(len(ex) for _, ex in rows)
  cw, ch = max(s, 150) + 8, s + 40
  im = Image.new("RGB", (90 + cols * cw, len(rows) * ch + 8), (255, 255, 255))
  d = ImageDraw.Draw(im)
  for r, (cond, ex) in enumerate(rows):
    d.text((4, 8 + r * ch + s // 2), SHORT.get(cond, cond), fill=(0, 0, 0))
    for j, (img, y, p) in enumerate(ex):
      x0, y0 = 90 + j * cw, 4 + r * ch
      im.paste(Image.fromarray(np.asarray(img)).resize((s, s), Image.NEAREST), (x0, y0))
      true = [a for a, v in zip(aus, y, strict=True) if v == 1]
      pred = [a for a, v in zip(aus, p, strict=True) if v >= 0.5]
      d.text((x0, y0 + s + 2), "T " + " ".join(map(str, true)), fill=(0, 0, 0))
      d.text((x0, y0 + s + 16), "P " + " ".join(map(str, pred)), fill=(0, 100, 0) if true == pred else (180, 0, 0))
  im.save(path)
  return path


def plot_relation_graph(path: str, adjacency: np.ndarray, aus: Sequence[int], title: str = "") -> str:
  """AUs on a circle; an edge i→j drawn with width/darkness ∝ how often j is among i's top-K neighbours."""
  a = np.asarray(adjacency, np.float64)
  n = a.shape[0]
  im = Image.new("RGB", (460, 480), (255, 255, 255))
  d = ImageDraw.Draw(im)
  cx, cy, r = 230, 250, 170
  pos = [(cx + r * np.cos(2 * np.pi * i / n - np.pi / 2), cy + r * np.sin(2 * np.pi * i / n - np.pi / 2))
         for i in range(n)]
  sym = (a + a.T) / 2
  np.fill_diagonal(sym, 0)
  top = sym.max() if sym.max() > 0 else 1.0
  for i in range(n):
    for j in range(i + 1, n):
      w = sym[i, j] / top
      if w > 0.15:
        g = int(220 * (1 - w))
        d.line([pos[i], pos[j]], fill=(g, g, 255 if w > 0.5 else g), width=max(1, int(round(4 * w))))
  for i, (x, y) in enumerate(pos):
    d.ellipse([x - 16, y - 16, x + 16, y + 16], fill=(255, 240, 200), outline=(0, 0, 0))
    d.text((x - 10, y - 6), f"AU{aus[i]}", fill=(0, 0, 0))
  d.text((10, 10), title or "learned AU relation graph (top-K neighbour frequency)", fill=(0, 0, 0))
  im.save(path)
  return path


# ---------------------------------------------------------------------------------------------- report


def write_report(outdir: str, results: Mapping[str, Mapping[str, Mapping]], aus: Sequence[int],
                 conditions: Sequence[str], timings: Mapping[str, float] | None = None, seed: int = 0,
                 example_row: str | None = None, graph_rows: Sequence[str] | None = None) -> str:
  """Writes ``report.txt``, ``report.json``, ``per_au_f1.csv`` and the PNGs into ``outdir``; returns the text
  table."""
  os.makedirs(outdir, exist_ok=True)
  table = mean_f1(results)
  text = format_table(table, conditions)
  if timings:
    text += "\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
  with open(os.path.join(outdir, "report.txt"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(outdir, "report.json"), "w") as f:
    json.dump({"seed": seed, "aus": list(aus), "avg_f1": table, "timings": dict(timings or {}),
               "per_au_f1": {r: {c: [float(x) for x in v["f1"]] for c, v in cs.items()} for r, cs in
                             results.items()}}, f, indent=1)
  write_csv(os.path.join(outdir, "per_au_f1.csv"), results, aus)
  plot_f1_vs_ratio(os.path.join(outdir, "f1_vs_ratio.png"), results)
  rows = list(results)
  ex_row = example_row or next((r for r in rows if "KD" in r), rows[-1])
  plot_examples(os.path.join(outdir, "examples.png"), {c: v["examples"] for c, v in results[ex_row].items()}, aus)
  for r in graph_rows or rows[:1]:
    if "clean" in results[r]:
      name = "relation_graph_" + "".join(ch if ch.isalnum() else "_" for ch in r).strip("_") + ".png"
      plot_relation_graph(os.path.join(outdir, name), results[r]["clean"]["adjacency"], aus,
                          f"{r}: AU relation graph on clean faces (top-K frequency)")
  return text + f"\nreport: {os.path.abspath(outdir)}"


def summarize(report_dirs: Sequence[str]) -> str:
  """Mean ± std over several runs' ``report.json`` (e.g. seeds)."""
  tables = []
  for d in report_dirs:
    p = os.path.join(d, "report.json") if os.path.isdir(d) else d
    if not os.path.exists(p):
      raise FileNotFoundError(f"no report.json at {p}")
    with open(p) as f:
      tables.append(json.load(f)["avg_f1"])
  rows = list(tables[0])
  conds = [c for c in tables[0][rows[0]] if c != "blocks"]
  mean = {r: {c: float(np.mean([t[r][c] for t in tables])) for c in tables[0][r]} for r in rows}
  std = {r: {c: float(np.std([t[r][c] for t in tables])) for c in tables[0][r]} for r in rows}
  return f"{len(tables)} runs\n" + format_table(mean, conds, std)


if __name__ == "__main__":
  print(summarize(sys.argv[1:]))
