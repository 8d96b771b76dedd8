"""Does quant-aware training pay? QAT vs PTQ on a small MoE language model.

    python -m npu_ops.tools.qat_study                 # the default run (about 28 min, 2 cores)
    python -m npu_ops.tools.qat_study --quick         # the same rows, small (about 4 min)
    python -m npu_ops.tools.qat_study --json out.json # also the rows as JSON

A byte-level decoder language model (causal attention; feed-forward layers
`npu_ops.nn.MoEMLP`, top-2 over 8 experts) learns the Python standard library's own
source files (the directory `sysconfig` names, site-packages left out), split into
training and validation by file. The float model is trained first; then, for each
recipe of `npu_ops.recipes` ("w8a8", "fp8", "w4a8", "mxfp4", "w4a4"), each method gives a
model whose validation loss (nats per byte) is measured through the deployed quantized
path (`MoEMLP.convert("int8")`: the recipe's codes, the fused op for w8a8; never fake
quantization):

* `ptq`: the float model, quantized;
* `qat_ste`: fine-tuned from the float model with the recipe's fake quantizers, the
  weight scales frozen at `amax / largest code` (straight-through gradients);
* `qat_lsq`: the same with the weight scales learned (LSQ);
* `qwix_qat`: the same fine-tune with qwix's QAT (`QtProvider` on the layer's
  `jax.lax.ragged_dot`), its float weights then quantized by the recipe, where qwix
  takes the recipe's formats.

Beside them, `float` (the trained float model) and `float_ft` (the same fine-tuned further
in float for as many steps as QAT, so that QAT is not credited for more training). The
fine-tunes of the 4-bit recipes run with several seeds (the order of their batches); the
table gives the mean and the spread (max - min). `recovered` is the share of the PTQ gap to
`float_ft` that a method closes: `(ptq - method) / (ptq - float_ft)`.

The study also times the training steps: a QAT step over the float step of the same
fine-tune (median of its steps, compilation excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import sys
import sysconfig
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RECIPES = ("w8a8", "fp8", "w4a8", "mxfp4", "w4a4")
FOUR_BIT = ("w4a8", "mxfp4", "w4a4")
# qwix's QT formats of a recipe (activations, weights), where its ragged_dot takes them:
# it quantizes per token and per channel only (no groups along k, no MX blocks)
QWIX_FORMATS = {"w8a8": ("int8", "int8"), "fp8": ("float8_e4m3fn", "float8_e4m3fn"),
                "w4a4": ("int4", "int4")}
QWIX_UNSUPPORTED = {"w4a8": "qwix's ragged_dot has no per-group (k-tiled) weight scales",
                    "mxfp4": "qwix's ragged_dot has no MX (block-scaled) formats"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The model, the data and the training budget."""
  d_model: int = 128
  layers: int = 4
  heads: int = 4
  d_ff: int = 256
  experts: int = 8
  top_k: int = 2
  seq: int = 128
  batch: int = 16
  steps: int = 1000          # float training
  ft_steps: int = 90         # each fine-tune (float_ft and QAT)
  lr: float = 3e-3
  ft_lr: float = 5e-4
  scale_lr: float = 1.0      # the learned (log) weight scales' learning rate, x ft_lr
  eval_windows: int = 256    # validation windows of `seq` bytes
  seeds: int = 3             # fine-tune seeds of the 4-bit recipes (others: 1)
  train_bytes: int = 16 << 20


QUICK = Settings(d_model=64, layers=2, heads=2, d_ff=128, seq=64, batch=16, steps=300,
                 ft_steps=40, lr=4e-3, ft_lr=1e-3, eval_windows=96, seeds=2,
                 train_bytes=2 << 20)


# --- data -------------------------------------------------------------------------------

def corpus(max_train_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) bytes: the standard library's .py files, one file in ten (by a
  hash of its path) for validation; files joined by a NUL byte."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py")
                 if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
  if not files:
    raise RuntimeError(f"no Python sources under {root}: the study reads the standard library")
  train, valid = [], []
  for p in files:
    part = valid if zlib.crc32(str(p.relative_to(root)).encode()) % 10 == 0 else train
    part.append(p.read_bytes() + b"\0")
  join = lambda parts: np.frombuffer(b"".join(parts), np.uint8)
  return join(train)[:max_train_bytes], join(valid)


def windows(data: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
  """`count` random windows of `length` bytes, int32 `[count, length]`."""
  starts = rng.integers(0, len(data) - length, count)
  return np.stack([data[s:s + length] for s in starts]).astype(np.int32)


# --- the model --------------------------------------------------------------------------

def build(s: Settings, seed: int = 0):
  """The float language model."""
  from flax import nnx  # noqa: PLC0415

  from npu_ops.nn import MoEMLP  # noqa: PLC0415

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.norm1, self.norm2 = nnx.RMSNorm(s.d_model, rngs=rngs), nnx.RMSNorm(s.d_model, rngs=rngs)
      self.qkv = nnx.Linear(s.d_model, 3 * s.d_model, use_bias=False, rngs=rngs)
      self.out = nnx.Linear(s.d_model, s.d_model, use_bias=False, rngs=rngs)
      self.moe = MoEMLP(s.d_model, s.d_ff, s.experts, top_k=s.top_k, rngs=rngs)

    def __call__(self, x):
      b, t, d = x.shape
      q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, t, 3 * s.heads, d // s.heads), 3, 2)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // s.heads) ** -0.5
      logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e30)
      att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, d)
      x = x + self.out(att)
      return x + self.moe(self.norm2(x))

  class LM(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(256, s.d_model, rngs=rngs)
      self.pos = nnx.Param(jax.random.normal(rngs.params(), (s.seq, s.d_model)) * 0.02)
      self.blocks = nnx.List([Block(rngs) for _ in range(s.layers)])
      self.norm = nnx.RMSNorm(s.d_model, rngs=rngs)
      self.head = nnx.Linear(s.d_model, 256, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + self.pos[:tokens.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.head(self.norm(x))

  return LM(nnx.Rngs(seed))


def with_moe(model, make):
  """A copy of `model` whose MoE layers are `make(layer)`."""
  from flax import nnx  # noqa: PLC0415
  other = nnx.clone(model)
  for block in other.blocks:
    block.moe = make(block.moe)
  return other


def as_recipe(layer, recipe: str, mode: str):
  """A float MoE layer converted to `mode` under `recipe`."""
  from flax import nnx  # noqa: PLC0415
  layer = nnx.clone(layer)
  layer.recipe = recipe
  return layer.convert(mode)


def deployed(model, recipe: str):
  """The model with its MoE layers on the recipe's quantized ops (float or qat model)."""
  return with_moe(model, lambda m: (as_recipe(m, recipe, "int8") if m.mode == "float"
                                    else m.convert("int8")))


def _loss(model, batch):
  logits = model(batch[:, :-1])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], -1))


def make_eval():
  from flax import nnx  # noqa: PLC0415
  return nnx.jit(_loss)


def evaluate(model, valid_batches, eval_fn) -> float:
  """Mean validation cross-entropy, nats per byte."""
  return float(np.mean([float(eval_fn(model, b)) for b in valid_batches]))


SCALES = ("gate_up_log_scale", "down_log_scale")  # MoEMLP's learned weight scales (qat)


@functools.cache
def _optimizer(lr: float, steps: int, warmup: int, scale_lr: float):
  """AdamW with clipping and cosine decay; one object per setting, so that the optimizers
  of fine-tunes with the same settings are equal (and their training steps compile once)."""
  import optax  # noqa: PLC0415
  sched = lambda scale: optax.warmup_cosine_decay_schedule(
      0.0, lr * scale, max(warmup, 1), steps, lr * scale * 0.1)
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "scale" if any(str(getattr(k, "key", k)) in SCALES for k in path)
      else "rest", params)
  tx = optax.multi_transform({"rest": optax.adamw(sched(1.0), weight_decay=0.01),
                              "scale": optax.adam(sched(scale_lr))}, labels)
  return optax.chain(optax.clip_by_global_norm(1.0), tx)


def _trained(frozen: tuple[str, ...]):
  """The parameters a fine-tune updates: all but those whose path holds a name in `frozen`."""
  from flax import nnx  # noqa: PLC0415
  return nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(f)) for f in frozen))


@functools.cache
def _train_step(frozen: tuple[str, ...]):
  """One jitted training step per `frozen`: the seeds of a method, and methods whose models
  have the same structure, reuse its compiled programs (a step defined inside `train`
  compiled again at every call)."""
  from flax import nnx  # noqa: PLC0415
  wrt = _trained(frozen)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, wrt))(model, batch)
    opt.update(model, grads)
    return loss
  return step


def train(model, data, steps, lr, seed, s: Settings, *, frozen=(), warmup=0):
  """AdamW (cosine decay) over `steps` random batches; returns (losses, step seconds).
  Parameters whose path holds a name in `frozen` are not updated; learned weight scales
  (`SCALES`) take `s.scale_lr` times the learning rate (Adam's steps are relative on a
  log-scale) and no weight decay."""
  from flax import nnx  # noqa: PLC0415
  frozen = tuple(frozen)
  opt = nnx.Optimizer(model, _optimizer(lr, steps, warmup, s.scale_lr), wrt=_trained(frozen))
  step = _train_step(frozen)
  rng = np.random.default_rng(seed)
  losses, seconds = [], []
  for _ in range(steps):
    batch = jnp.asarray(windows(data, s.batch, s.seq + 1, rng))
    t0 = time.perf_counter()
    losses.append(float(step(model, opt, batch)))
    seconds.append(time.perf_counter() - t0)
  return losses, seconds


def qwix_model(model, recipe: str, s: Settings):
  """`model` under qwix's QAT for `recipe` (its layers' grouped matmul made
  `jax.lax.ragged_dot`, which qwix intercepts), or None where qwix lacks the formats."""
  try:
    import qwix  # noqa: PLC0415
  except ImportError:
    return None
  if recipe not in QWIX_FORMATS:
    return None
  act, weight = (jnp.dtype(t) for t in QWIX_FORMATS[recipe])
  base = with_moe(model, lambda m: m)
  for block in base.blocks:
    block.moe.gmm = lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes)
  rules = [qwix.QtRule(module_path=".*", op_names=("ragged_dot",), weight_qtype=weight,
                       act_qtype=act)]
  return qwix.quantize_model(base, qwix.QtProvider(rules), jnp.zeros((1, s.seq), jnp.int32))


def float_weights_of(trained, like):
  """`like` (a float model) with the parameters of `trained` (qwix's model: same paths)."""
  from flax import nnx  # noqa: PLC0415
  out = nnx.clone(like)
  nnx.update(out, nnx.state(trained, nnx.Param))
  for block in out.blocks:
    block.moe.gmm = None
  return out


# --- the study --------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
  """One configuration and method: its validation losses (one per seed)."""
  config: str
  method: str
  losses: list[float]
  step_ratio: float | None = None   # the fine-tune's step time over float_ft's
  note: str = ""
  curve: list[float] = dataclasses.field(default_factory=list)  # training loss (first seed)

  @property
  def eval_loss(self) -> float:
    return float(np.mean(self.losses))

  @property
  def spread(self) -> float:
    return float(np.max(self.losses) - np.min(self.losses))


@dataclasses.dataclass
class Baseline:
  """The trained float model and what every recipe's rows are measured against."""
  settings: Settings
  model: Any
  train_data: np.ndarray
  valid: list
  eval_fn: Any
  rows: list[Row]          # float, float_ft
  step_seconds: float      # float_ft's median step
  started: float


def baseline(s: Settings, log=print) -> Baseline:
  """Trains the float model and fine-tunes it in float (`s.seeds` seeds)."""
  started = time.perf_counter()
  train_data, valid_data = corpus(s.train_bytes)
  valid = [jnp.asarray(b) for b in np.array_split(
      windows(valid_data, s.eval_windows, s.seq + 1, np.random.default_rng(1234)), 8)]
  log(f"corpus: {len(train_data) / 1e6:.1f} MB train, {len(valid_data) / 1e6:.1f} MB "
      f"validation; {jax.device_count()} device(s), {jax.devices()[0].platform}")
  eval_fn = make_eval()
  model = build(s)
  losses, _ = train(model, train_data, s.steps, s.lr, seed=0, s=s, warmup=s.steps // 20)
  rows = [Row("float", "float", [evaluate(model, valid, eval_fn)], curve=losses)]
  log(f"float: {rows[0].eval_loss:.4f} nats/byte after {s.steps} steps "
      f"(train loss {np.mean(losses[-20:]):.4f}), {time.perf_counter() - started:.0f} s")
  float_ft, step, curves = [], [], []
  for seed in range(s.seeds):
    ft = with_moe(model, lambda m: m)
    curve, secs = train(ft, train_data, s.ft_steps, s.ft_lr, seed=100 + seed, s=s)
    float_ft.append(evaluate(ft, valid, eval_fn))
    step.append(statistics.median(secs[2:]))
    curves.append(curve)
  rows.append(Row("float", "float_ft", float_ft, curve=curves[0]))
  log(f"float_ft: {rows[-1].eval_loss:.4f} ({len(float_ft)} seeds)")
  return Baseline(s, model, train_data, valid, eval_fn, rows, statistics.median(step), started)


def recipe_rows(b: Baseline, recipe: str, log=print) -> list[Row]:
  """ptq, qat_ste, qat_lsq and qwix_qat of one recipe (`s.seeds` seeds at 4 bits)."""
  s, model = b.settings, b.model
  ptq = evaluate(deployed(model, recipe), b.valid, b.eval_fn)
  rows = [Row(recipe, "ptq", [ptq])]
  for method in ("qat_ste", "qat_lsq", "qwix_qat"):
    results, steps, curves = [], [], []
    for seed in range(s.seeds if recipe in FOUR_BIT else 1):
      if method == "qwix_qat":
        qm = qwix_model(model, recipe, s)
        if qm is None:
          break
        curve, secs = train(qm, b.train_data, s.ft_steps, s.ft_lr, seed=100 + seed, s=s)
        results.append(evaluate(deployed(float_weights_of(qm, model), recipe), b.valid,
                                b.eval_fn))
      else:
        qm = with_moe(model, lambda m: as_recipe(m, recipe, "qat"))
        frozen = SCALES if method == "qat_ste" else ()
        curve, secs = train(qm, b.train_data, s.ft_steps, s.ft_lr, seed=100 + seed, s=s,
                            frozen=frozen)
        results.append(evaluate(deployed(qm, recipe), b.valid, b.eval_fn))
      steps.append(statistics.median(secs[2:]))
      curves.append(curve)
    if not results:
      note = QWIX_UNSUPPORTED.get(recipe, "qwix is not installed")
      rows.append(Row(recipe, method, [float("nan")], note=note))
      log(f"{recipe} {method}: skipped ({note})")
      continue
    rows.append(Row(recipe, method, results, statistics.median(steps) / b.step_seconds,
                    curve=curves[0]))
    log(f"{recipe} {method}: {rows[-1].eval_loss:.4f} (ptq {ptq:.4f}), step "
        f"{rows[-1].step_ratio:.2f}x float, {time.perf_counter() - b.started:.0f} s")
  return rows


def run(s: Settings, recipes=RECIPES, log=print) -> list[Row]:
  """The study: every row of the table (see the module docstring)."""
  b = baseline(s, log)
  rows = b.rows + [row for recipe in recipes for row in recipe_rows(b, recipe, log)]
  log(f"done in {time.perf_counter() - b.started:.0f} s")
  return rows


def table(rows: list[Row]) -> str:
  """The rows as a Markdown table (loss: lower is better; recovered: higher is better)."""
  ref = {r.method: r.eval_loss for r in rows if r.config == "float"}
  lines = ["| config | method | eval loss (nats/byte) | spread | vs float_ft | recovered "
           "| step / float step |", "|---|---|---|---|---|---|---|"]
  ptq = {r.config: r.eval_loss for r in rows if r.method == "ptq"}
  for r in rows:
    if np.isnan(r.eval_loss):
      lines.append(f"| {r.config} | {r.method} | n/a: {r.note} | | | | |")
      continue
    gap = r.eval_loss - ref["float_ft"]
    rec = ""
    if r.method.startswith(("qat", "qwix")) and ptq[r.config] - ref["float_ft"] > 0:
      rec = f"{(ptq[r.config] - r.eval_loss) / (ptq[r.config] - ref['float_ft']):.0%}"
    spread = f"{r.spread:.4f}" if len(r.losses) > 1 else ""
    ratio = f"{r.step_ratio:.2f}" if r.step_ratio is not None else ""
    lines.append(f"| {r.config} | {r.method} | {r.eval_loss:.4f} | {spread} | {gap:+.4f} "
                 f"| {rec} | {ratio} |")
  return "\n".join(lines)


def _commit() -> str | None:
  """The git commit of this checkout (None outside one)."""
  import subprocess  # noqa: PLC0415
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def to_json(rows: list[Row], s: Settings, seconds: float | None = None) -> dict:
  return {"settings": dataclasses.asdict(s), "commit": _commit(), "jax": jax.__version__,
          "seconds": seconds,
          "rows": [{"config": r.config, "method": r.method, "eval_loss": r.eval_loss,
                    "losses": r.losses, "spread": r.spread, "step_ratio": r.step_ratio,
                    "note": r.note, "curve": r.curve} for r in rows]}


def from_json(data: dict) -> list[Row]:
  """The rows of `to_json`'s output (a checked-in run)."""
  return [Row(r["config"], r["method"], r["losses"], r["step_ratio"], r["note"],
              r.get("curve", [])) for r in data["rows"]]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m npu_ops.tools.qat_study",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small model, short runs (same rows)")
  p.add_argument("--json", type=pathlib.Path, help="also write the rows as JSON here")
  p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
  args = p.parse_args(argv)
  s = QUICK if args.quick else Settings()
  t0 = time.perf_counter()
  rows = run(s, args.recipes, log=lambda line: print(line, flush=True))
  print(table(rows))
  if args.json:
    args.json.write_text(json.dumps(to_json(rows, s, time.perf_counter() - t0), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
