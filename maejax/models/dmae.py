"""DMAE (Bai et al. 2023): distil a frozen MAE teacher into a student MAE through intermediate features.

The student's block ``s`` output (before the final LN) passes through a projection head and is aligned to the
teacher's block ``t`` output on the SAME visible tokens (+cls). The teacher runs only up to its deepest aligned
block and never runs its decoder (``teacher_mode="truncated"``, the paper's saving); ``"full"`` runs all teacher
blocks and the teacher decoder, as the released PyTorch code does, for comparison.

The alignment term (:func:`distill_term`) reads only the student's :class:`VisibleBlocks`, so any student that
reports them can be distilled: :class:`DMAEStudent` (an MAE) and the objective students of ``trainers/distill.py``
(BootMAE, SdAE, SD-MAE, MCM, whose models return them when asked for ``return_blocks``), whose own loss then
takes the place of the pixel loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maejax import losses
from maejax.models.mae import MAE, MAEOutput
from maejax.models.vit import _p, gelu, patchify, xavier_uniform

Array = jax.Array
HEADS = ("linear", "mlp1", "mlp2")


class ProjectionHead(nn.Module):
  """Student → teacher feature width. ``linear``: one Linear (DMAE default); ``mlp1``: Linear-GELU-Linear;
  ``mlp2``: two hidden layers."""

  out_dim: int
  kind: str = "linear"
  hidden: int | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, C_student) -> (B, T, C_teacher)
    if self.kind not in HEADS:
      raise ValueError(f"unknown projection head {self.kind!r}; expected one of {HEADS}")
    dense = lambda n, name, ax: nn.Dense(n, name=name, kernel_init=_p(xavier_uniform, *ax),
                                         bias_init=_p(nn.initializers.zeros, ax[1]))
    hidden = self.hidden or self.out_dim
    n_hidden = {"linear": 0, "mlp1": 1, "mlp2": 2}[self.kind]
    for i in range(n_hidden):
      x = gelu(dense(hidden, f"hidden_{i}", ("embed", "mlp"))(x))
    return dense(self.out_dim, "proj", ("mlp" if n_hidden else "embed", "teacher_embed"))(x)


def project(blocks: Mapping[int, Array], pairs: Sequence[tuple[int, int]], teacher_width: int, head: str,
            hidden: int | None) -> list[Array]:
  """One :class:`ProjectionHead` ``head_{s}_{t}`` per pair on the student's block ``s``: ``(B, 1+K, C_teacher)``
  per pair. Call it inside a compact module: the heads become that module's submodules."""
  return [ProjectionHead(teacher_width, head, hidden, name=f"head_{s}_{t}")(blocks[s]) for s, t in pairs]


class DMAEStudent(nn.Module):
  """Student MAE plus one projection head per aligned (student block, teacher block) pair."""

  student: MAE
  teacher_width: int
  pairs: Sequence[tuple[int, int]] = ((8, 17),)
  head: str = "linear"
  head_hidden: int | None = None

  @nn.compact
  def __call__(self, images: Array, noise: Array | None = None, *, train: bool = False
               ) -> tuple[MAEOutput, list[Array]]:
    """Returns the student's MAE output and the projected features ``(B, 1+K, C_teacher)`` per pair."""
    out = self.student(images, noise, train=train, return_blocks=tuple(s for s, _ in self.pairs))
    return out, project(out.blocks, self.pairs, self.teacher_width, self.head, self.head_hidden)


class ProjectionHeads(nn.Module):
  """The projection heads alone, for a student whose model is not a :class:`DMAEStudent` (an objective student
  keeps them beside its own params). ``blocks``: student block index → ``(B, 1+K, D)``."""

  teacher_width: int
  pairs: Sequence[tuple[int, int]] = ((8, 17),)
  head: str = "linear"
  head_hidden: int | None = None

  @nn.compact
  def __call__(self, blocks: Mapping[int, Array]) -> list[Array]:
    return project(blocks, self.pairs, self.teacher_width, self.head, self.head_hidden)


@dataclasses.dataclass(frozen=True)
class VisibleBlocks:
  """What the alignment reads from a student's forward pass: ``blocks``, encoder block index → output before the
  final LN on the visible tokens (+cls), ``(B, 1+K, D)``; and the masking that chose those tokens, ``ids_keep:
  (B, K)``, ``mask, ids_restore: (B, L)``, so that the teacher sees the same patches."""

  blocks: dict[int, Array]
  ids_keep: Array
  mask: Array
  ids_restore: Array


jax.tree_util.register_dataclass(VisibleBlocks, data_fields=["blocks", "ids_keep", "mask", "ids_restore"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class TeacherOutput:
  """``features[i]``: teacher block output for pair ``i``, ``(B, 1+K, C)``; ``extra``: a scalar that depends on
  everything the teacher computed (its pixel loss in ``full`` mode, else 0), so that jit cannot remove the
  work the full variant is meant to measure."""

  features: list[Array]
  extra: Array


def teacher_features(teacher: MAE, teacher_params: Any, images: Array, ids_keep: Array, mask: Array,
                     ids_restore: Array, blocks: Sequence[int], mode: str = "truncated") -> TeacherOutput:
  """Runs the frozen teacher on the student's visible tokens and returns its block outputs."""
  teacher_params = jax.lax.stop_gradient(teacher_params)
  deepest = max(blocks)
  if mode == "truncated":
    enc = teacher.apply({"params": teacher_params}, images, ids_keep, stop_after=deepest,
                        return_blocks=tuple(blocks), method=lambda m, *a, **k: m.encoder(*a, **k))
    return TeacherOutput([enc.blocks[b] for b in blocks], jnp.zeros(()))
  if mode == "full":
    def run(m: MAE):
      enc = m.encoder(images, ids_keep, return_blocks=tuple(blocks))
      pred = m.decoder(enc.tokens, ids_restore)
      loss = losses.mae_loss(pred, patchify(images, m.patch_size), mask, m.norm_pix_loss)
      return enc, loss
    enc, loss = teacher.apply({"params": teacher_params}, method=run)
    return TeacherOutput([enc.blocks[b] for b in blocks], loss)
  raise ValueError(f"unknown teacher_mode {mode!r}; expected 'truncated' or 'full'")


def distill_term(student_loss: Array, projected: Sequence[Array], visible: VisibleBlocks, teacher: MAE,
                 teacher_params: Any, images: Array, teacher_blocks: Sequence[int], *, alpha: float = 1.0,
                 distance: str = "l1", teacher_mode: str = "truncated") -> tuple[Array, dict[str, Array]]:
  """DMAE's total ``student_loss + α · mean over pairs of the feature loss``, the teacher run on ``images`` at the
  student's visible tokens. ``projected[i]``: the student's projected block of pair ``i``; ``teacher_blocks[i]``:
  its teacher block. ``student_loss``: the pixel loss of an MAE student, an objective student's own loss.

  Returns the total and ``{"distill_loss": mean feature loss, "teacher_extra": TeacherOutput.extra}``.
  """
  t = teacher_features(teacher, teacher_params, images, visible.ids_keep, visible.mask, visible.ids_restore,
                       teacher_blocks, teacher_mode)
  feats = [losses.dmae_feature_loss(s, tf, distance) for s, tf in zip(projected, t.features, strict=True)]
  total = losses.dmae_total_loss(student_loss, feats, alpha)
  return total, {"distill_loss": sum(feats) / len(feats), "teacher_extra": t.extra}


def dmae_loss(student: DMAEStudent, params: Any, teacher: MAE, teacher_params: Any, images: Array,
              rngs: dict[str, Array] | None = None, *, noise: Array | None = None, alpha: float = 1.0,
              distance: str = "l1", teacher_mode: str = "truncated", train: bool = True
              ) -> tuple[Array, dict[str, Array]]:
  """DMAE objective: student pixel loss + α · feature loss. Gradients reach ``params`` only."""
  out, projected = student.apply({"params": params}, images, noise, train=train, rngs=rngs)
  visible = VisibleBlocks(out.blocks, out.ids_keep, out.mask, out.ids_restore)
  total, m = distill_term(out.loss, projected, visible, teacher, teacher_params, images,
                          [tb for _, tb in student.pairs], alpha=alpha, distance=distance, teacher_mode=teacher_mode)
  return total, {"loss": total, "pixel_loss": out.loss, **m}
