"""python -m npu_ops.perf validate | predict | megablox | tune

    python -m npu_ops.perf validate                  # the model vs tokamax's measured v5e, TPU7x
    python -m npu_ops.perf predict --chip v5e        # our kernels at decode / prefill shapes
    python -m npu_ops.perf predict --chip v6e --ops "fused A8W8" --cases decode
    python -m npu_ops.perf megablox                  # ours vs megablox at tokamax's tuned tiles
    python -m npu_ops.perf tune [--write]            # the TPU kernels' default tiles, searched
    python -m npu_ops.perf tune --compare            # default tiles vs the previous rules
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # traced and modeled here, run nowhere
  from npu_ops.perf import cases, chips, report, tune, validate  # noqa: PLC0415

  p = argparse.ArgumentParser(prog="python -m npu_ops.perf", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  v = sub.add_parser("validate", help="predicted vs measured (tokamax's TPU data)")
  v.add_argument("--chips", nargs="+", default=list(validate.DATA_DIRS),
                 choices=list(validate.DATA_DIRS))
  q = sub.add_parser("predict", help="our kernels under the model, against the roofline")
  q.add_argument("--chip", default="v5e", choices=[c for c in chips.CHIPS
                                                   if c.startswith(("v", "tpu"))])
  q.add_argument("--ops", nargs="+", default=list(cases.OPS), choices=list(cases.ALL_OPS))
  q.add_argument("--cases", nargs="+", default=["decode", "prefill"],
                 choices=["decode", "prefill"])
  mb = sub.add_parser("megablox", help="ours vs megablox at tokamax's tuned tilings (model)")
  mb.add_argument("--chip", default="v5e", choices=list(validate.DATA_DIRS))
  t = sub.add_parser("tune", help="search the TPU kernels' tiles with the model")
  t.add_argument("--chips", nargs="+", default=list(tune.CHIPS), choices=list(tune.CHIPS))
  t.add_argument("--ops", nargs="+", choices=("fused", "gmm", "tgmm"), default=None,
                 help="only these kernels (default: all)")
  t.add_argument("--write", action="store_true", help="store them in pallas_kernels/tpu_tiles.py")
  t.add_argument("--compare", action="store_true",
                 help="the defaults (the table) vs the previous rules, at every point")
  args = p.parse_args(argv)
  if args.cmd == "tune":
    if args.compare:
      print(report.tiles_table(args.chips))
      return 0
    found = tune.table(args.chips, log=lambda line: print(line, flush=True), ops=args.ops)
    if args.write:  # the chips and ops not searched keep their entries
      from pallas_kernels import tpu_tiles  # noqa: PLC0415
      print("wrote", tune.write({**tpu_tiles.TABLE, **found}))
    return 0
  if args.cmd == "megablox":
    print(report.megablox_table(args.chip))
    return 0
  if args.cmd == "validate":
    for chip in args.chips:
      print(validate.format_rows(validate.validate(chip, validate.KERNELS)), "\n", flush=True)
    return 0
  chosen = [c for name in args.cases for c in (cases.DECODE if name == "decode"
                                                else cases.PREFILL)]
  print(report.predict_table(args.chip, args.ops, chosen))
  return 0


if __name__ == "__main__":
  sys.exit(main())
