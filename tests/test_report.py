"""The multi-run report (``python -m maejax.report DIR...``): mean ± std over seeds, paired differences to the
baselines, the hidden-AU ceiling, the "every AU present" floor, the label-fraction plot and the JSON, on fake runs
(3 seeds × 2 label fractions) whose numbers are known by construction."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from maejax import report
from maejax.data import synthfaces as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUS = sf.BP4D_AUS
CONDS = ("clean", "patches_50", "block_upper", "block_lower", "block_random")
SEEDS = (0, 1, 2)
OCC, PSEUDO, KD, TEACHER = "occl-aug baseline", "pseudo-label baseline", "node+edge KD", "clean teacher"
# Offset of each row's per-AU F1 over a shared per-(fraction, seed, condition) base, per seed; None = the row is
# missing from that seed's run.
OFFSETS = {
    1.0: {TEACHER: (-0.10, -0.08, -0.09), OCC: (0.0, 0.0, 0.0), PSEUDO: (0.01, 0.03, 0.0), KD: (0.05, 0.02, 0.04)},
    0.3: {TEACHER: (-0.12, -0.11, -0.10), OCC: (0.0, 0.0, 0.0), PSEUDO: (0.0, 0.01, None), KD: (0.03, 0.04, -0.02)},
}
# On top of OFFSETS: KD at fraction 1.0 loses 0.03 under the lower block in seed 1 only.
KD_LOWER_SEED1 = -0.03


def _per_au(fraction, seed, row, cond):
  """Per-AU F1 ``(12,)`` of a fake run: a base in [0.3, 0.6] shared by the rows + the row's offset."""
  rng = np.random.default_rng([int(fraction * 10), seed, CONDS.index(cond)])
  f1 = rng.uniform(0.3, 0.6, len(AUS)) + OFFSETS[fraction][row][seed]
  if (fraction, seed, row, cond) == (1.0, 1, KD, "block_lower"):
    f1 = f1 + KD_LOWER_SEED1
  return f1


def _avg(fraction, seed, row, cond):
  if cond == "blocks":
    return np.mean([_avg(fraction, seed, row, c) for c in report.BLOCKS])
  return float(np.mean(_per_au(fraction, seed, row, cond)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """``{fraction: [report dir per seed]}`` written by ``report.write_report``."""
  base = tmp_path_factory.mktemp("runs")
  ex = [(np.zeros((8, 8, 3), np.uint8), np.zeros(len(AUS)), np.full(len(AUS), 0.3))]
  out = {}
  for fraction, rows in OFFSETS.items():
    for seed in SEEDS:
      results = {row: {c: {"f1": _per_au(fraction, seed, row, c), "ratio": 0.5, "adjacency": np.eye(len(AUS)),
                           "examples": ex} for c in CONDS}
                 for row, off in rows.items() if off[seed] is not None}
      d = str(base / f"frac{fraction}_seed{seed}" / "report")
      report.write_report(d, results, AUS, CONDS, seed=seed, label_fraction=fraction)
      out.setdefault(fraction, []).append(d)
  return out


@pytest.fixture(scope="module")
def summary(runs):
  # Fractions given smallest first and seeds shuffled: the summary orders them itself.
  return report.summarize(runs[0.3][::-1] + runs[1.0][1:] + runs[1.0][:1])


@pytest.fixture(scope="module")
def ceilings():
  """Direct calls of the generator's ceiling, with the hidden sets written out here (BP4D AUs)."""
  return {"block_upper": ((1, 2, 4, 6, 7), sf.hidden_au_f1_ceiling((1, 2, 4, 6, 7), AUS)),
          "block_lower": ((10, 12, 14, 15, 17, 23, 24), sf.hidden_au_f1_ceiling((10, 12, 14, 15, 17, 23, 24), AUS))}


def _group(summary, fraction):
  return next(g for g in summary["groups"] if g["label_fraction"] == fraction)


def test_write_report_label_fraction(tmp_path):
  aus = (1, 2)
  ex = [(np.zeros((8, 8, 3), np.uint8), np.array([1, 0]), np.array([0.7, 0.2]))]
  res = {"KD": {"clean": {"f1": np.array([0.8, 0.4]), "ratio": 0.0, "adjacency": np.eye(2), "examples": ex}}}
  report.write_report(str(tmp_path / "a"), res, aus, ("clean",), label_fraction=0.25)
  report.write_report(str(tmp_path / "b"), res, aus, ("clean",))
  with open(tmp_path / "a" / "report.json") as f:
    assert json.load(f)["label_fraction"] == 0.25
  with open(tmp_path / "b" / "report.json") as f:
    assert "label_fraction" not in json.load(f)


def test_groups_and_mean_std(summary):
  assert [g["label_fraction"] for g in summary["groups"]] == [1.0, 0.3]
  for fraction in OFFSETS:
    g = _group(summary, fraction)
    assert g["seeds"] == list(SEEDS) and len(g["runs"]) == 3
    for row, off in OFFSETS[fraction].items():
      seeds = [s for s in SEEDS if off[s] is not None]
      for c in (*CONDS, "blocks"):
        v = [_avg(fraction, s, row, c) for s in seeds]
        s = g["avg_f1"][row][c]
        assert s["seeds"] == seeds
        np.testing.assert_allclose(s["mean"], np.mean(v), rtol=1e-12)
        np.testing.assert_allclose(s["std"], np.std(v, ddof=0), rtol=1e-9)


def test_paired_differences_by_hand(summary):
  g1, g3 = _group(summary, 1.0), _group(summary, 0.3)
  # Fraction 1.0, KD − occl-aug = KD's offsets (+0.05, +0.02, +0.04), except under the lower block in seed 1
  # (+0.02 − 0.03 = −0.01), so that blocks (the mean of three blocks) in seed 1 is +0.01.
  d = g1["paired"][OCC][KD]
  np.testing.assert_allclose(d["blocks"]["diff"], [0.05, 0.01, 0.04], atol=1e-12)
  np.testing.assert_allclose(d["block_upper"]["diff"], [0.05, 0.02, 0.04], atol=1e-12)
  np.testing.assert_allclose(d["block_lower"]["diff"], [0.05, -0.01, 0.04], atol=1e-12)
  np.testing.assert_allclose(d["blocks"]["mean"], 0.1 / 3, atol=1e-12)
  np.testing.assert_allclose(d["blocks"]["std"], np.std([0.05, 0.01, 0.04]), atol=1e-12)
  assert d["blocks"]["positive_every_seed"] and d["block_upper"]["positive_every_seed"]
  assert d["block_random"]["positive_every_seed"] and not d["block_lower"]["positive_every_seed"]
  # KD − pseudo-label = (+0.04, −0.01, +0.04) under the upper block: not positive in every seed.
  d = g1["paired"][PSEUDO][KD]["block_upper"]
  np.testing.assert_allclose(d["diff"], [0.04, -0.01, 0.04], atol=1e-12)
  assert not d["positive_every_seed"]
  # The baselines are compared with each other, never with themselves.
  assert OCC not in g1["paired"][OCC] and PSEUDO in g1["paired"][OCC]
  np.testing.assert_allclose(g1["paired"][OCC][PSEUDO]["blocks"]["diff"], [0.01, 0.03, 0.0], atol=1e-12)
  assert not g1["paired"][OCC][PSEUDO]["blocks"]["positive_every_seed"]  # 0 in seed 2 is not positive
  # Fraction 0.3: the pseudo-label baseline lacks seed 2, so KD − pseudo covers seeds 0, 1 only (+0.03, +0.03)
  # and is positive in every seed it has, although KD is below both baselines in seed 2.
  d = g3["paired"][PSEUDO][KD]["blocks"]
  assert d["seeds"] == [0, 1]
  np.testing.assert_allclose(d["diff"], [0.03, 0.03], atol=1e-12)
  assert d["positive_every_seed"]
  d = g3["paired"][OCC][KD]["blocks"]
  np.testing.assert_allclose(d["diff"], [0.03, 0.04, -0.02], atol=1e-12)
  assert d["seeds"] == [0, 1, 2] and not d["positive_every_seed"]


def test_ceiling_fraction_against_direct_call(summary, ceilings):
  for fraction in OFFSETS:
    g = _group(summary, fraction)
    for cond, (hid, ceil) in ceilings.items():
      e = g["ceiling"][cond]
      assert e["hidden_aus"] == list(hid) and e["over"] == "hidden AUs"
      idx = [AUS.index(a) for a in hid]
      np.testing.assert_allclose(e["ceiling_per_au"], ceil, rtol=1e-12)
      for row, off in OFFSETS[fraction].items():
        seeds = [s for s in SEEDS if off[s] is not None]
        want = [np.mean(_per_au(fraction, s, row, cond)[idx]) / np.mean(ceil[idx]) for s in seeds]
        np.testing.assert_allclose(g["ceiling"][cond]["rows"][row]["mean"], np.mean(want), rtol=1e-12)
        np.testing.assert_allclose(g["ceiling"][cond]["rows"][row]["std"], np.std(want), rtol=1e-9)
        want = [_avg(fraction, s, row, cond) / np.mean(ceil) for s in seeds]
        np.testing.assert_allclose(g["ceiling"][cond]["rows_all"][row]["mean"], np.mean(want), rtol=1e-12)
  # The README's figures: the ceiling averaged over all 12 AUs (visible ones at 1).
  np.testing.assert_allclose(_group(summary, 1.0)["ceiling"]["block_upper"]["ceiling_all_mean"], 0.803, atol=5e-4)
  np.testing.assert_allclose(_group(summary, 1.0)["ceiling"]["block_lower"]["ceiling_all_mean"], 0.738, atol=5e-4)


def test_ceiling_without_per_au_f1_uses_all_aus(runs, tmp_path, ceilings):
  """An older report.json without per-AU F1: avg F1 over all AUs / the ceiling's mean over all AUs."""
  with open(os.path.join(runs[1.0][0], "report.json")) as f:
    rec = json.load(f)
  del rec["per_au_f1"]
  p = tmp_path / "report.json"
  p.write_text(json.dumps(rec))
  g = report.summarize([str(p)])["groups"][0]
  e = g["ceiling"]["block_upper"]
  assert e["over"] == "all AUs"
  np.testing.assert_allclose(e["rows"][KD]["mean"], _avg(1.0, 0, KD, "block_upper") /
                             np.mean(ceilings["block_upper"][1]), rtol=1e-12)
  assert "all AUs" in report.format_group(g)


def test_floor_against_base_rates(summary):
  p = sf.expected_base_rates(AUS)
  floor = float(np.mean(2 * p / (1 + p)))
  for fraction in OFFSETS:
    fl = _group(summary, fraction)["floor"]
    np.testing.assert_allclose(fl["floor"], floor, rtol=1e-12)
    for row, off in OFFSETS[fraction].items():
      seeds = [s for s in SEEDS if off[s] is not None]
      for c in (*CONDS, "blocks"):
        v = np.array([_avg(fraction, s, row, c) for s in seeds])
        d = fl["rows"][row][c]
        np.testing.assert_allclose(d["diff"], v.mean() - floor, atol=1e-12)
        assert d["below"] == (v.mean() < floor) and d["runs_below"] == int((v < floor).sum())
  # Fake F1s lie in [0.18, 0.64] around the floor (≈ 0.47): both sides occur, and the teacher is below.
  below = [d["below"] for cs in _group(summary, 1.0)["floor"]["rows"].values() for d in cs.values()]
  assert any(below) and not all(below)
  assert _group(summary, 1.0)["floor"]["rows"][TEACHER]["blocks"]["below"]


def test_block_hidden_aus_from_rendered_faces():
  """Each AU belongs to the image half that holds most of its pixel change (intensity 5 vs 0, neutral pose, a few
  identities): that half's block hides it."""
  half = {}
  for au in sf.ALL_AUS:
    up = lo = 0.0
    for subject in range(4):
      idn = sf.make_identity(0, subject)
      inten = np.zeros(len(sf.ALL_AUS), np.float32)
      a, _ = sf.render_face(idn, sf.NEUTRAL_FRAME, inten, 64)
      inten[sf.ALL_AUS.index(au)] = 5.0
      b, _ = sf.render_face(idn, sf.NEUTRAL_FRAME, inten, 64)
      diff = np.abs(a.astype(np.int64) - b).sum(-1)
      up, lo = up + diff[:32].sum(), lo + diff[32:].sum()
    half[au] = "block_upper" if up > lo else "block_lower"
  for cond, aus in report.BLOCK_HIDDEN_AUS.items():
    assert sorted(aus) == sorted(a for a, h in half.items() if h == cond), cond
  assert report.hidden_aus("block_upper", sf.DISFA_AUS) == (1, 2, 4, 6, 9)
  assert report.hidden_aus("block_lower", AUS) == (10, 12, 14, 15, 17, 23, 24)


def test_text_tables(summary):
  text = report.format_summary(summary)
  lines = text.splitlines()
  i1, i3 = lines.index("== label fraction 1: 3 runs, seeds 0 1 2"), lines.index(
      "== label fraction 0.3: 3 runs, seeds 0 1 2")
  assert i1 < i3
  assert "np.std, ddof=0; seeds 0 1 2" in lines[i1 + 1]
  # The KD row of the fraction-1.0 difference table to the occl-aug baseline: blocks mean +3.3, seeds +5.0 +1.0 +4.0,
  # positive in every seed ('+'); lower block not ('−1.0' in seed 1).
  start = next(i for i in range(i1, i3) if lines[i].startswith("paired difference to 'occl-aug baseline'"))
  kd = next(ln for ln in lines[start:i3] if ln.startswith(KD))
  assert "+3.3 [+5.0 +1.0 +4.0]+" in kd and "+2.7 [+5.0 -1.0 +4.0] " in kd
  # 0.3: the pseudo-label baseline lacks seed 2, shown as '.'.
  start = next(i for i in range(i3, len(lines)) if lines[i].startswith("paired difference to 'pseudo-label"))
  kd = next(ln for ln in lines[start:] if ln.startswith(KD))
  assert "+3.0 [+3.0 +3.0 .]+" in kd
  assert "upper hides AU 1 2 4 6 7: ceiling" in text and "lower hides AU 10 12 14 15 17 23 24" in text
  assert "'<' = mean below the floor" in text
  assert "  pseudo-label baseline: only in the runs of seeds 0 1" in text
  # Floor table of fraction 1.0: every cell's mark from the fake F1s and 2p/(1+p) computed here.
  p = sf.expected_base_rates(AUS)
  floor = np.mean(2 * p / (1 + p))
  start = next(i for i in range(i1, i3) if lines[i].startswith("F1 − floor"))
  header = lines[start + 2].split()
  assert header[0] == "model" and header[-1] == "blocks"
  cols = [*CONDS, "blocks"]
  marks = set()
  for row in OFFSETS[1.0]:
    cells = lines[start + 3 + list(OFFSETS[1.0]).index(row)][len(row):].split()
    for c, cell in zip(cols, cells, strict=True):
      v = np.array([_avg(1.0, s, row, c) for s in SEEDS])
      want = "<" if v.mean() < floor else "~" if (v < floor).any() else ""
      assert cell == f"{(v.mean() - floor) * 100:+.1f}{want}", (row, c, cell)
      marks.add(want)
  assert marks == {"<", "~", ""}  # the fake numbers exercise every mark


def test_duplicate_seeds_and_missing_baseline(runs):
  """Three folds of one seed: mean ± std still, no pairing (a note says why); a baseline that is no row: a note."""
  s = report.summarize([runs[1.0][0]] * 3, baselines=("occl-aug baseline", "no such row"))
  g = s["groups"][0]
  assert g["paired"] == {} and "seeds [0] appear in several runs" in g["notes"][0]
  assert g["avg_f1"][KD]["blocks"]["std"] == 0.0
  s = report.summarize(runs[1.0], baselines=("occl-aug baseline", "no such row"))
  assert list(s["groups"][0]["paired"]) == [OCC]
  assert any("'no such row' is not among the rows" in n for n in s["groups"][0]["notes"])


def test_plot_written_and_decodes(summary, tmp_path):
  path = report.plot_f1_vs_label_fraction(str(tmp_path / "f.png"), summary)
  with Image.open(path) as im:
    im.load()
    assert im.size == (760, 440)
    colours = {c for _, c in im.getcolors(1 << 16)}
  assert all(c in colours for c in report.PALETTE[:4])  # one line per row


def test_cli_end_to_end(runs, summary, tmp_path):
  out_json, out_png = tmp_path / "s.json", tmp_path / "p.png"
  cmd = [sys.executable, "-m", "maejax.report", *runs[1.0], *runs[0.3], f"--json_out={out_json}",
         f"--plot_out={out_png}"]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "== label fraction 1: 3 runs" in p.stdout and f"plot: {out_png}" in p.stdout
  with open(out_json) as f:
    got = json.load(f)
  assert got["plot"] == str(out_png) and got["std"] == "np.std over runs, ddof=0"
  for g, want in zip(got["groups"], summary["groups"], strict=True):
    assert g["paired"] == want["paired"] and g["avg_f1"] == want["avg_f1"] and g["floor"] == want["floor"]
  with Image.open(out_png) as im:
    im.load()
  # User errors: one line, exit 2.
  p = subprocess.run([sys.executable, "-m", "maejax.report", str(tmp_path / "nowhere")], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and p.stderr.strip().splitlines() == [
      f"maejax.report: error: no report.json at {tmp_path / 'nowhere'}"]


def test_runs_without_fraction_and_without_synth_refs(runs, tmp_path):
  """Runs written before label fractions: one group 'not recorded', no plot even when asked; --nosynth_refs: no
  ceiling, no floor."""
  olds = []
  for i, d in enumerate(runs[1.0]):
    with open(os.path.join(d, "report.json")) as f:
      rec = json.load(f)
    del rec["label_fraction"]
    (tmp_path / f"old{i}.json").write_text(json.dumps(rec))
    olds.append(str(tmp_path / f"old{i}.json"))
  png = tmp_path / "never.png"
  text = report.run_cli(olds, plot_out=str(png), synth_refs=False)
  assert text.startswith("== label fraction not recorded: 3 runs, seeds 0 1 2") and not png.exists()
  assert "ceiling" not in text and "floor" not in text
  g = report.summarize(olds, synth_refs=False)["groups"][0]
  assert g["label_fraction"] is None and g["ceiling"] == {} and g["floor"] is None
  assert g["paired"][OCC][KD]["blocks"]["positive_every_seed"]
