"""The training system on simulated CPU devices: mesh equivalence, restore onto another mesh, gradient
accumulation, non-finite loss, SIGTERM resume, two processes over loopback, and the stages end to end."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maejax import checkpoints, config_utils, sharding
from maejax.trainers import common
from maejax.trainers import mae as mae_stage

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name, arg=None):
  return config_utils.load_config(f"{ROOT / 'configs' / name}.py" + (f":{arg}" if arg else ""))


def smoke_setup():
  cfg = load_config("mae_pretrain", "smoke")
  model = mae_stage.build_model(cfg.model)
  dummy = jnp.zeros((1, 32, 32, 3))
  init_fn = lambda r: model.init({"params": r, "masking": r}, dummy)
  return cfg, model, init_fn


def batches(n, b=16, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)} for _ in range(n)]


def run_steps(mesh_cfg, steps=3, grad_accum=1, loss_fn=None, data=None):
  cfg, model, init_fn = smoke_setup()
  devices = jax.devices()[:int(np.prod(list(mesh_cfg.values())))]
  mesh = sharding.make_mesh(mesh_cfg, devices)
  tx, _ = common.make_optimizer(cfg.optim, 16, 10)
  tr = common.create_trainer(init_fn, loss_fn or mae_stage.mae_loss_fn(model), tx, mesh, cfg.sharding_rules,
                             seed=0, grad_accum_steps=grad_accum)
  state, losses = tr.state, []
  for b in data or batches(steps):
    state, m = tr.step_fn(state, sharding.global_batch(b, mesh))
    losses.append(float(m["loss"]))
  return tr, state, losses


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      # softmax(q·(k + b)) does not depend on the key bias: its gradient is exactly zero and what reaches it is
      # round-off noise, which Adam rescales to lr-sized steps of random sign. It stays near its zero init.
      assert np.abs(np.asarray(x)).max() < 1e-3 and np.abs(np.asarray(y)).max() < 1e-3, name
      continue
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=name)


def test_eight_simulated_devices():
  assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"


def test_same_steps_on_four_meshes():
  ref_tr, ref_state, ref_losses = run_steps({"data": 1})
  states = {}
  for mesh_cfg in ({"data": 8}, {"data": 4, "fsdp": 2}, {"data": 2, "model": 4}):
    tr, state, losses = run_steps(mesh_cfg)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(mesh_cfg))
    assert_trees_close(jax.device_get(state.params), jax.device_get(ref_state.params))
    states[tuple(mesh_cfg)] = state
  # The rules really shard: fsdp splits the embed axis, model splits heads / mlp (optimizer state alike).
  st = states[("data", "fsdp")]
  assert st.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec[0] == "fsdp"
  st = states[("data", "model")]
  assert st.params["encoder"]["blocks_0"]["attn"]["query"]["kernel"].sharding.spec[1] == "model"
  assert st.opt_state[0].mu["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec[1] == "model"
  assert st.opt_state[0].count.sharding.is_fully_replicated


def test_gradient_accumulation_matches_full_batch():
  # Masking noise differs between one batch of 16 and two micro-batches of 8, so compare a deterministic loss.
  cfg, model, _ = smoke_setup()

  def loss_fn(params, extra, batch, rng):
    images = batch["image"].astype(jnp.float32) / 255.0
    noise = jnp.tile(jnp.linspace(0, 1, 16)[None], (images.shape[0], 1))
    out = model.apply({"params": params}, images, noise)
    return out.loss, ({"loss": out.loss}, extra)

  data = batches(2)
  _, s1, l1 = run_steps({"data": 2}, loss_fn=loss_fn, data=data)
  _, s2, l2 = run_steps({"data": 2}, loss_fn=loss_fn, data=data, grad_accum=2)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  assert_trees_close(jax.device_get(s1.params), jax.device_get(s2.params), rtol=1e-4, atol=1e-6)


def test_restore_onto_another_mesh_and_continue(tmp_path):
  data = batches(4)
  tr8, state8, _ = run_steps({"data": 8}, data=data[:2])
  ck = checkpoints.Checkpointer(str(tmp_path), save_every=1)
  ck.save(2, state8, None, {"note": "test"})
  ck.close()
  params8 = jax.device_get(state8.params)
  cont8, m8 = tr8.step_fn(state8, sharding.global_batch(data[2], tr8.mesh))  # donates state8

  tr, _, _ = run_steps({"data": 2, "fsdp": 4}, data=[])
  ck = checkpoints.Checkpointer(str(tmp_path), save_every=1)
  restored = ck.restore(tr.state, tr.state_shardings)
  ck.close()
  assert int(restored.step) == 2
  kernel = restored.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4} and kernel.sharding.spec[0] == "fsdp"
  assert_trees_close(jax.device_get(restored.params), params8, rtol=0, atol=0)
  cont, m = tr.step_fn(restored, sharding.global_batch(data[2], tr.mesh))
  np.testing.assert_allclose(float(m["loss"]), float(m8["loss"]), rtol=1e-5)
  assert_trees_close(jax.device_get(cont.params), jax.device_get(cont8.params))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg, model, init_fn = smoke_setup()
  base = mae_stage.mae_loss_fn(model)

  def poisoned(params, extra, batch, rng):
    loss, (m, e) = base(params, extra, {"image": batch["image"]}, rng)
    loss = loss + batch["poison"][0]
    return loss, (dict(m, loss=loss), e)

  mesh = sharding.make_mesh({"data": 2}, jax.devices()[:2])
  tx, _ = common.make_optimizer(cfg.optim, 16, 10)
  tr = common.create_trainer(init_fn, poisoned, tx, mesh, cfg.sharding_rules, seed=0)
  data = [dict(b, poison=np.full((16,), np.nan if i == 4 else 0.0, np.float32))
          for i, b in enumerate(batches(6))]
  cfg.checkpoint_every = 1
  with pytest.raises(common.NonFiniteLoss, match="at step 5"):
    common.train_loop(tr, iter(grain.MapDataset.source(data).to_iter_dataset()), 6, str(tmp_path), cfg, {"m": 1})
  ck = checkpoints.Checkpointer(str(tmp_path))
  assert ck.latest_step() == 4
  restored = ck.restore(tr.state, tr.state_shardings)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored.params))
  ck.close()


# ------------------------------------------------------------------------------------ subprocess tests


def main_cmd(config, workdir, *extra, cpu_devices=2):
  return [sys.executable, "-m", "maejax.main", f"--config={config}", f"--workdir={workdir}",
          f"--cpu_devices={cpu_devices}", *extra]


def clean_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def read_losses(workdir, name="mae"):
  path = pathlib.Path(workdir) / f"{name}_loss.jsonl"
  return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def run_main(cmd, timeout=600):
  proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The smoke MAE run (12 steps), then DMAE distillation from it as the teacher."""
  wd = tmp_path_factory.mktemp("mae_full")
  run_main(main_cmd("configs/mae_pretrain.py:smoke", wd))
  return wd


def test_mae_stage_end_to_end_outputs(uninterrupted):
  losses = read_losses(uninterrupted)
  assert sorted(losses) == list(range(1, 13))
  assert list((uninterrupted / "tb").glob("events.out.tfevents.*"))
  assert (uninterrupted / "reconstruction_000012.png").exists()
  assert (uninterrupted / "checkpoints" / "12").is_dir()


def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
  args = ("--config.total_steps=40", "--config.checkpoint_every=1000", "--config.eval_every=1000")
  full_wd = tmp_path / "full"
  run_main(main_cmd("configs/mae_pretrain.py:smoke", full_wd, *args))
  wd = tmp_path / "killed"
  cmd = main_cmd("configs/mae_pretrain.py:smoke", wd, *args)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  loss_file = wd / "mae_loss.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if loss_file.exists() and len(loss_file.read_text().splitlines()) >= 3:
      break
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted at step" in out
  killed_at = max(read_losses(wd))
  assert 3 <= killed_at < 40, f"SIGTERM landed after the run finished (step {killed_at})"
  assert (wd / "checkpoints" / str(killed_at)).is_dir()

  proc = run_main(cmd)
  out = proc.stdout + proc.stderr
  assert f"resuming from step {killed_at}" in out
  resumed, full = read_losses(wd), read_losses(full_wd)
  assert sorted(resumed) == list(range(1, 41))
  for step in range(1, 41):
    np.testing.assert_allclose(resumed[step], full[step], rtol=1e-6, atol=0, err_msg=f"step {step}")


def test_bootmae_sigterm_then_resume_continues_the_ema_bit_for_bit(tmp_path):
  """BootMAE smoke (EMA teacher in the train state): train, SIGTERM, resume; the losses and the final momentum
  encoder equal those of an uninterrupted run exactly."""
  args = ("--config.total_steps=30", "--config.checkpoint_every=1000", "--config.log_every=1")
  config = "configs/mae_pretrain.py:bootmae_smoke"
  full_wd = tmp_path / "full"
  run_main(main_cmd(config, full_wd, *args))
  wd = tmp_path / "killed"
  cmd = main_cmd(config, wd, *args)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  loss_file = wd / "bootmae_loss.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if loss_file.exists() and len(loss_file.read_text().splitlines()) >= 3:
      break
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "preempted at step" in out, out[-3000:]
  killed_at = max(read_losses(wd, "bootmae"))
  assert 3 <= killed_at < 30, f"SIGTERM landed after the run finished (step {killed_at})"
  proc = run_main(cmd)
  assert f"resuming from step {killed_at}" in proc.stdout + proc.stderr
  resumed, full = read_losses(wd, "bootmae"), read_losses(full_wd, "bootmae")
  assert sorted(resumed) == list(range(1, 31))
  assert [resumed[s] for s in range(1, 31)] == [full[s] for s in range(1, 31)]
  ema = [checkpoints.load_variables(str(w), ("ema",))[0]["ema"] for w in (wd, full_wd)]
  assert int(ema[0]["step"]) == int(ema[1]["step"]) == 30
  for a, b in zip(jax.tree_util.tree_leaves(ema[0]), jax.tree_util.tree_leaves(ema[1]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_over_loopback_match_one_process(tmp_path):
  steps = ("--config.total_steps=3", "--config.eval_every=1000")
  single = tmp_path / "single"
  run_main(main_cmd("configs/mae_pretrain.py:smoke", single, *steps, cpu_devices=4))
  multi = tmp_path / "multi"
  port = free_port()
  procs = [subprocess.Popen(main_cmd("configs/mae_pretrain.py:smoke", multi, *steps,
                                     f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                     f"--process_id={i}", cpu_devices=2),
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-4000:]
  assert "2 process(es)" in outs[0]
  a, b = read_losses(single), read_losses(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for step in a:
    np.testing.assert_allclose(b[step], a[step], rtol=1e-5, err_msg=f"step {step}")


def test_distill_stage_from_mae_checkpoint(uninterrupted, tmp_path):
  wd = tmp_path / "distill"
  run_main(main_cmd("configs/distill.py:smoke", wd, f"--config.distill.teacher={uninterrupted}"))
  losses = read_losses(wd, "distill")
  assert sorted(losses) == list(range(1, 13)) and all(np.isfinite(list(losses.values())))
  assert list((wd / "tb").glob("events.out.tfevents.*"))
  # The AU stages read the distilled student's encoder (not its projection heads).
  from maejax import checkpoints
  from maejax.trainers import au
  encoder, _ = au.load_encoder(str(wd))
  params, _ = checkpoints.load_params(str(wd))
  assert jax.tree_util.tree_structure(encoder) == jax.tree_util.tree_structure(params["student"]["encoder"])


def test_unknown_config_key_and_bad_teacher_are_rejected(tmp_path):
  proc = subprocess.run(main_cmd("configs/mae_pretrain.py:smoke", tmp_path, "--config.no_such_key=1"), cwd=ROOT,
                        env=clean_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "no_such_key" in proc.stderr
  proc = subprocess.run(main_cmd("configs/distill.py:smoke", tmp_path, "--config.distill.teacher=/nonexistent"),
                        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "/nonexistent" in proc.stderr


@pytest.mark.slow
def test_tiny_default_learns(tmp_path):
  """The tiny default's reconstruction loss falls by ≥ 1.4× within 30 steps."""
  wd = tmp_path / "tiny"
  run_main(main_cmd("configs/mae_pretrain.py", wd, "--config.total_steps=30", "--config.eval_every=30"))
  losses = read_losses(wd)
  first = np.mean([losses[s] for s in range(1, 6)])
  last = np.mean([losses[s] for s in range(26, 31)])
  assert first / last >= 1.4, (first, last)
  assert (wd / "reconstruction_000030.png").exists()
