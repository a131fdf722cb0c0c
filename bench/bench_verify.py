"""Verify every benchmark model and bit width bit-exact against the integer reference, both rounding rules.

    python bench/bench_verify.py                       # 3 models x w8a8 w4a4 w2a4 x half-even half-up, 32 images
    python bench/render.py --verify bench/results/verify.jsonl

Each model is compiled on the first --calib-size images of imagenet/calib, then verified on the next --count
images (calibration never saw them), with onnxruntime running the QDQ graph as ONNX defines it, and once more
with its fused int8 kernels (--fused rows).  Also records latency of the half-up model, since its rounding
Adds keep onnxruntime from fusing those Convs.  One JSON line per run, appended to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from bench_compile import HERE, MODELS, emit, latency_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("PTQC_SHARED", os.path.join(HERE, "..", "..", "shared")))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--bits", nargs="*", default=["w8a8", "w4a4", "w2a4"])
    ap.add_argument("--rounding", nargs="*", default=["half-even", "half-up"])
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "verify.jsonl"))
    args = ap.parse_args(argv)
    calib = os.path.join(args.shared, "imagenet", "calib")
    if not os.path.isdir(calib):
        print(f"bench: {calib} not found; pass --shared or set PTQC_SHARED", file=sys.stderr)
        return 0

    import onnx

    import ptqc
    from ptqc.config import parse_shorthand
    from ptqc.data import ImageFolder, make_preprocess
    from ptqc.verify import verify

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for name in args.models:
        path = os.path.join(args.shared, "models", f"{name}.onnx")
        if not os.path.exists(path):
            print(f"bench: skipping {name}: {path} not found", file=sys.stderr)
            continue
        pre = make_preprocess(MODELS[name])
        held = ImageFolder(calib, pre)
        held.files = held.files[args.calib_size : args.calib_size + args.count]
        x = np.concatenate(list(held.batches(32)))
        for bits in args.bits:
            wb, ab = parse_shorthand(bits)
            for rounding in args.rounding:
                cfg = ptqc.QuantConfig(wb, ab, calib_size=args.calib_size, rounding=rounding)
                model = ptqc.compile(path, calib, cfg, pre).model
                for fused in (False, True):
                    start = time.perf_counter()
                    rep = verify(model, x, fuse=fused)
                    rec = {"model": name, "bits": bits, "rounding": rounding, "onnxruntime": "fused" if fused else "qdq",
                           "ok": rep.ok, "samples": rep.samples, "tensors": rep.tensors,
                           "mismatched_tensors": rep.mismatched_tensors, "values": rep.compared_values,
                           "first_mismatch": str(rep.mismatch) if rep.mismatch else None, "errors": rep.errors[:3],
                           "warnings": len(rep.warnings), "logit_max_diff": max(rep.float_outputs.values(), default=None),
                           "verify_s": round(time.perf_counter() - start, 2)}
                    if not fused and not args.no_latency:
                        with tempfile.NamedTemporaryFile(suffix=".onnx") as tmp:
                            onnx.save(model, tmp.name)
                            rec["lat_b32_ms"] = latency_ms(tmp.name, 32, 2, 10)
                    emit(rec, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
