"""Label-free fidelity of compile variants: agreement with the FP32 model on held-back calibration images.

    python bench/fidelity.py --model mobilenet_v2_1.0_224 --bits w8a8 --variant '{}' --variant '{"act_method": "mse"}'

Choosing defaults by val500 accuracy would tune on the test set.  This script calibrates on the first
--calib-size images of imagenet/calib (sorted, as `ptqc compile` does) and scores each variant on the rest of
that folder, which calibration never saw: top-1 agreement with FP32 and the logit SNR (dB).  One JSON line per
variant, with compile seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench_compile import MODELS, HERE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("PTQC_SHARED", os.path.join(HERE, "..", "..", "shared")))
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--holdout", type=int, default=744, help="images after the calibration ones to score on")
    ap.add_argument("--variant", action="append", default=[], help="QuantConfig overrides as JSON (repeatable)")
    ap.add_argument("--out", default=None, help="append JSON lines here too")
    args = ap.parse_args(argv)
    path = os.path.join(args.shared, "models", args.model + ".onnx")
    calib = os.path.join(args.shared, "imagenet", "calib")
    if not (os.path.exists(path) and os.path.isdir(calib)):
        print(f"skip: {path} or {calib} is missing (pass --shared or set PTQC_SHARED)", file=sys.stderr)
        return 0

    import ptqc
    from ptqc import runtime
    from ptqc.config import parse_shorthand
    from ptqc.data import ImageFolder, make_preprocess

    pre = make_preprocess(MODELS[args.model])
    folder = ImageFolder(calib, pre)
    folder.files = folder.files[args.calib_size : args.calib_size + args.holdout]
    x = np.concatenate(list(folder.batches(64)))
    fp = runtime.run(runtime.make_session(path), {"input": x})[0]
    wb, ab = parse_shorthand(args.bits)
    for text in args.variant or ["{}"]:
        overrides = json.loads(text)
        start = time.perf_counter()
        res = ptqc.compile(path, calib, ptqc.QuantConfig(wb, ab, calib_size=args.calib_size, **overrides), pre)
        seconds = time.perf_counter() - start
        q = np.concatenate([runtime.run(runtime.make_session(res.model), {"input": x[i : i + 64]})[0]
                            for i in range(0, len(x), 64)])
        snr = 10 * np.log10(np.sum(fp.astype(np.float64) ** 2) / np.sum((fp.astype(np.float64) - q) ** 2))
        record = {"model": args.model, "bits": args.bits, "variant": overrides, "calib_size": args.calib_size,
                  "holdout": len(x), "agreement": round(100.0 * float(np.mean(fp.argmax(1) == q.argmax(1))), 2),
                  "logit_snr_db": round(float(snr), 2), "compile_seconds": round(seconds, 2)}
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
