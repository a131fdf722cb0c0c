"""Render bench JSON lines as the Markdown tables of docs/benchmarks.md.

    python bench/render.py bench/results/compile.jsonl [bench/results/ablation.jsonl] [bench/results/verify.jsonl] \
        [bench/results/report.jsonl] > docs/benchmarks.md

Extra files are told apart by their records: verification records carry an "onnxruntime" key, the debugging
records of bench_report.py a "kind".
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def fmt(v, nd=2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "pass" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def main() -> None:
    rows = all_rows = load(sys.argv[1] if len(sys.argv) > 1 else "bench/results/compile.jsonl")
    # keep the last record per (model, method, calib_images)
    latest: OrderedDict = OrderedDict()
    for r in rows:
        key = (r["model"], r["method"], r.get("calib_images"))
        # FP32 is the same model in every run: a later record without latency keeps the earlier one's
        latest[key] = {**latest.get(key, {}), **r} if r["method"] == "fp32" else r
    rows = list(latest.values())
    out = ["# Benchmarks", "",
           "Produced by `python bench/bench_compile.py` and rendered by `python bench/render.py`; raw records in",
           "`bench/results/compile.jsonl`. Machine: 2 cores, no GPU; onnxruntime CPU, 2 intra-op threads. Accuracy on",
           "the 500 images of `imagenet/val`; calibration on N images of `imagenet/calib` spread over its sorted names",
           "(`data.spread_order`; N = 1024 reads all 1000). `drop` = FP32 top-1 minus quantized top-1 on the same",
           "images. Compile seconds and peak RSS are those of a separate process doing only the compile (image",
           "decoding included, for both tools), each compile alone on the machine. Latency is the median of 30",
           "(batch 1) or 10 (batch 32) runs; this shared machine's latency varies by about ±20% between runs.",
           "`int8 convs` counts Conv nodes onnxruntime fused into QLinearConv. Low-bit rows: `--bits ... --calib-size N",
           "--no-ort --no-latency`.",
           "",
           "Each row names the commit it was measured on; where a configuration was measured more than once, the",
           "last record is shown. Rows with no commit predate the bench recording it: the w8a4 rows come from a",
           "snapshot of 6326ea5, where block reconstruction learns the 8-bit layers against the 4-bit activations,",
           "and the ablation's 512-image w4a4 cells without the head refit from af0ec74 (the changes from there to",
           "the refit are below 4-bit weights, opt-in, or were checked to give the same codes). onnxruntime's",
           "quantize_static reads the same images as ptqc; before",
           "the spread order it calibrated on the first 256 classes and scored 76.0 / 69.2 / 79.8, and ptqc w8a8",
           "77.8 / 78.0 / 83.8 (MobileNetV2 / MobileNetV1 / EfficientNet-Lite0).",
           "What each method changed, and the drops of earlier snapshots, are in docs/design.md and in this file's",
           "history.",
           "",
           *refit_status(list(latest.values())),
           "",
           "Read the low-bit rows with their noise: one compile's top-1 moves by 2-4 points with the windows block",
           "reconstruction draws (MobileNetV2 w4a4 on 512 images, block seeds 0-2: 65.0, 68.8, 69.8; w2a4 seeds 0",
           "and 1: 34.2, 36.0), so a 256- or 1024-image row beating the 512-image one by less than that is not a",
           "finding. At 2-bit weights one compile can land much further off: MobileNetV2 w2a4 scores 18.0, 34.2 and",
           "8.6 on 256, 512 and 1000 images, and 29.6 on 1000 with another block seed (before the head refit; with",
           "it 35.4 and 14.2 on 512 and 1000). Its logit SNR is only 1-2 dB,",
           "so a few percent more error in every block takes top-1 from a third of the images to chance",
           "(docs/design.md). Below 4-bit weights block reconstruction takes 600 steps with progressive hardening,",
           "300 above.",
           ""]
    models = list(OrderedDict.fromkeys(r["model"] for r in rows))
    out += summary(rows, models)
    out += arcq_table(rows, models)
    for model in models:
        mrows = [r for r in rows if r["model"] == model]
        out += [f"## {model}", "",
                "| method | calib | top-1 | top-5 | drop | compile s | peak RSS MB | lat b1 ms | lat b32 ms | int8 convs | inspect | commit |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mrows:
            if "top1" not in r:
                continue
            out.append("| " + " | ".join([
                r["method"], fmt(r.get("calib_images")), fmt(r.get("top1"), 1), fmt(r.get("top5"), 1),
                fmt(r.get("drop_top1"), 1), fmt(r.get("compile_s"), 1), fmt(r.get("peak_rss_mb"), 0),
                fmt(r.get("lat_b1_ms")), fmt(r.get("lat_b32_ms"), 1),
                f"{r['int8_convs']}/{r['int8_convs'] + r['float_convs']}" if "int8_convs" in r else "–",
                fmt(r.get("inspect_ok")), r.get("commit", "–"),
            ]) + " |")
        sweep = [r for r in mrows if "top1" not in r]
        if sweep:
            out += ["", "Peak memory against the number of calibration images (w8a8):", "",
                    "| calibration images | compile s | peak RSS MB |", "|---|---|---|"]
            base = next((r for r in mrows if r["method"] == "ptqc-pot-w8a8" and "top1" in r), None)
            for r in sorted(sweep + ([base] if base else []), key=lambda r: r["calib_samples"]):
                out.append(f"| {r['calib_samples']} | {fmt(r['compile_s'], 1)} | {fmt(r['peak_rss_mb'], 0)} |")
        out.append("")
    for path in sys.argv[2:]:
        extra = load(path)
        if extra and "kind" in extra[0]:
            out += debugging(extra)
        else:
            # the ablation's "default" column is the main run's record, and its "adaround" column the main run's
            # record from before block reconstruction became the default
            out += verification(extra) if extra and "onnxruntime" in extra[0] else ablation(all_rows + extra)
    print("\n".join(out))


def debugging(rows: list[dict]) -> list[str]:
    """Issue #5: the report, its ranking checked against val500, data-free calibration and --max-drop."""
    out = ["## Debugging accuracy (issue #5)", "",
           "Produced by `python bench/bench_report.py`; raw records in `bench/results/report.jsonl`. 256 calibration",
           "images; val500 is only evaluated on. Definitions: [report.md](report.md).", ""]
    reports = [r for r in rows if r["kind"] == "report"]
    if reports:
        r = reports[-1]
        out += [f"**Report**, {r['model']} {r['bits']}: val500 top-1 {fmt(r['top1'], 1)} (FP32 {fmt(r['fp32_top1'], 1)});"
                f" on {r['samples']} calibration images logit SNR {fmt(r['logit_snr_db'])} dB, top-1 agreement"
                f" {fmt(r['agreement'], 1)}%; measured in {fmt(r['report_s'], 1)} s, page {fmt(r['html_kb'], 0)} KB,"
                f" renders in headless Chromium: {fmt(r.get('chromium_rendered'))}. Five worst layers alone: "
                + ", ".join(f"{n} ({v:.1f} dB)" for n, v in r["worst"]) + ".", ""]
    keep = [r for r in rows if r["kind"] == "keep8"]
    if keep:
        base = keep[-1]["base_top1"]
        out += ["**One layer kept at 8 bits** (weights and input), the rest at " + keep[-1]["bits"] + f" (top-1 {fmt(base, 1)}):"
                " the report's five worst layers alone, and as a contrast its five best low-bit layers.", "",
                "| group | rank | layer | SQNR alone dB | val500 top-1 | gain |", "|---|---|---|---|---|---|"]
        latest: OrderedDict = OrderedDict()
        for r in keep:
            latest[(r["group"], r["layer"])] = r
        for r in latest.values():
            out.append(f"| {r['group']} | {r['rank']}/{r['of']} | {r['layer']} | {fmt(r['sqnr_alone_db'], 1)} | "
                       f"{fmt(r['top1'], 1)} | {r['gain']:+.1f} |")
        for group in ("worst", "best"):
            gains = [r["gain"] for r in latest.values() if r["group"] == group]
            if gains:
                out.append(f"| {group} five, mean | | | | | {sum(gains) / len(gains):+.1f} |")
        out.append("")
    free = [r for r in rows if r["kind"] == "data_free"]
    if free:
        out += ["**Data-free calibration** (w8a8, BatchNorm statistics, no images) next to 256 calibration images:", "",
                "| model | calibration | val500 top-1 | drop | compile s |", "|---|---|---|---|---|"]
        latest = OrderedDict()
        for r in free:
            latest[(r["model"], r["calibration"])] = r
        for r in latest.values():
            if "refused" in r:
                out.append(f"| {r['model']} | {r['calibration']} | refused: {r['refused'].split(';')[0]} | | |")
            else:
                out.append(f"| {r['model']} | {r['calibration']} | {fmt(r['top1'], 1)} | {fmt(r['drop'], 1)} | "
                           f"{fmt(r['compile_s'], 1)} |")
        out.append("")
    md = [r for r in rows if r["kind"] == "max_drop"]
    if md:
        out += ["**`--max-drop D`** on MobileNetV2: the shortest prefix of the SQNR-alone ranking raised to 8 bits"
                " whose estimated drop on held-out calibration images (never calibrated on) is at most D points with 95%"
                " confidence; then val500. \"softmax estimate\" rows used the first label-free estimator (the expected"
                " drop under the float softmax), which ran low; \"confidence lost\" rows use the current one"
                " (docs/report.md). A refusal says the budget cannot be met even with every ranked layer at 8 bits (those rows"
                " predate the float fallback)."
                " Rows marked \"AdaRound on the chosen model\" ran with AdaRound as the default: trials without it, then"
                " the chosen prefix compiled with it and measured again on the same held-out images. \"+ N float\": every"
                " ranked layer at 8 bits missed the budget, so the search kept the fewest layers float that met it"
                " (the float fallback, on unless `--no-float-fallback`).", "",
                "| budget | base bits, held-out score | layers at 8 bits | held-out images | held-out drop (95% bound) | val500 top-1 |"
                " val500 drop | weights MB | search s |", "|---|---|---|---|---|---|---|---|---|"]
        latest = OrderedDict()
        for r in md:
            latest[(r.get("budget", 1.0), r["bits"], r.get("scored_by", "softmax estimate"))] = r
        for (budget, bits, scored), r in latest.items():
            if "refused" in r:
                out.append(f"| {budget:g} | {bits}, {scored} | refused: {r['refused'].split(';')[0]} | | | | | | |")
                continue
            floated = f" + {len(r['floated'])} float" if r.get("floated") else ""
            out.append(f"| {budget:g} | {bits}, {scored} | {r['n_raised']} of {r['ranked']}{floated} | {r.get('held_out_images', 256)} | "
                       f"{fmt(r['held_out_drop'])} ({fmt(r.get('held_out_bound'))}) | {fmt(r['top1'], 1)} | "
                       f"{fmt(r['drop'], 1)} | {fmt(r['weights_mb'], 3)} | {fmt(r['search_s'], 0)} |")
        out.append("")
    return out


def verification(rows: list[dict]) -> list[str]:
    """Integer verification per model, bit width and rounding: against ORT's QDQ semantics and its fused kernels."""
    latest: OrderedDict = OrderedDict()
    for r in rows:
        latest[(r["model"], r["bits"], r["rounding"], r["onnxruntime"])] = r
    out = ["## Integer verification", "",
           "Produced by `python bench/bench_verify.py`: each model compiled on 256 calib images, then `ptqc verify`",
           "on the next 32 (never calibrated on). `QDQ` = onnxruntime running the graph as ONNX defines it (no QDQ",
           "fusion); `fused` = its default int8 kernels (u8 x s8 pairs saturate at int16 on this AVX2 CPU without",
           "VNNI; see docs/integer.md: the pair-safe first layer makes w4a4/w2a4 exact there, while inner 8-bit",
           "layers at w8a8 can still saturate). `values` = integer codes compared. Half-up models are not fused,",
           "hence their batch-32 latency.", "",
           "| model | bits | rounding | values | QDQ: bit-exact | fused: bit-exact | fused: first difference | b32 ms |",
           "|---|---|---|---|---|---|---|---|"]
    for (model, bits, rounding, kind), r in latest.items():
        if kind != "qdq":
            continue
        f = latest.get((model, bits, rounding, "fused"), {})
        out.append(f"| {model} | {bits} | {rounding} | {r['values']:,} | {'yes' if r['ok'] else 'NO'} | "
                   f"{'yes' if f.get('ok') else 'no' if f else '–'} | {f.get('first_mismatch') or '–'} | "
                   f"{fmt(r.get('lat_b32_ms'), 0)} |")
    out.append("")
    return out


def refit_status(rows: list[dict]) -> list[str]:
    """Which of the shown rows below 8-bit activations ran the head refit, the default there since 09b1129."""
    low = [r for r in rows if r["method"].startswith("ptqc-pot-") and "top1" in r
           and not r.get("bits", "").endswith("a8")]
    without = [r for r in low if "RefitHeadPass" not in r.get("pass_seconds", {})]
    text = ("The head refit (`refit_head`, 09b1129) is on by default below 8-bit activations; the ablation's"
            " head-refit column puts it next to the same setting without it. ")
    if not without:
        return [text + "Every row below 8-bit activations has it."]
    groups: OrderedDict = OrderedDict()
    for r in without:
        groups.setdefault((r.get("calib_images"), r["bits"], r.get("commit") or "no commit"), []).append(r["model"])
    models = len({r["model"] for r in low})
    listed = "; ".join(f"{bits} on {n} images ({'all models' if len(m) == models else ', '.join(m)}; {c})"
                       for (n, bits, c), m in groups.items())
    return [text + f"{len(low) - len(without)} of the {len(low)} rows below 8-bit activations have it; these"
            f" predate it: {listed}."]


def summary(rows: list[dict], models: list[str]) -> list[str]:
    """One line per model: ptqc w8a8 against FP32 and onnxruntime's own int8."""
    def find(model, method):
        return next((r for r in rows if r["model"] == model and r["method"] == method and "top1" in r), None)

    out = ["## Summary: w8a8", "",
           "| model | FP32 top-1 | ptqc w8a8 (drop) | onnxruntime int8, not PoT (drop) | compile s ptqc / ORT |"
           " peak RSS MB ptqc / ORT | b32 ms FP32 / ptqc |", "|---|---|---|---|---|---|---|"]
    for model in models:
        fp, q, o = find(model, "fp32"), find(model, "ptqc-pot-w8a8"), find(model, "ort-quantize_static-int8")
        if not (fp and q and o):
            continue
        out.append(f"| {model} | {fmt(fp['top1'], 1)} | {fmt(q['top1'], 1)} ({-q['drop_top1']:+.1f}) | "
                   f"{fmt(o['top1'], 1)} ({-o['drop_top1']:+.1f}) | {fmt(q['compile_s'], 1)} / {fmt(o['compile_s'], 1)} | "
                   f"{fmt(q['peak_rss_mb'], 0)} / {fmt(o['peak_rss_mb'], 0)} | "
                   f"{fmt(fp.get('lat_b32_ms'), 0)} / {fmt(q.get('lat_b32_ms'), 0)} |")
    out += ["", "On 500 images one image is 0.2 points, and w8a8 results move by about ±1 point between equally good",
            "configurations; docs/design.md has a label-free fidelity check on 744 held-back calibration-split images.", ""]
    return out


def arcq_table(rows: list[dict], models: list[str]) -> list[str]:
    """ARCQ's remainder compensation (``--arcq SHARE``): top-1 drop against the extra MACs, per model and width, next
    to the default compile on the same images."""
    arcq = [r for r in rows if str(r.get("variant", "")).startswith("arcq") and "top1" in r]
    if not arcq:
        return []
    shares = sorted({int(r["variant"][4:]) for r in arcq})
    out = ["## ARCQ remainder compensation (opt-in)", "",
           "`--arcq SHARE`: the weight and input rounding remainders of that share of the low-bit convs, those with",
           "ARCQ's highest critical-layer score, as two more convolutions each (docs/design.md). Each cell: val500 drop",
           "from FP32 / extra multiply-accumulates in % of the model's; \"left out\": the pass's check (the logit error",
           "against FP32 on 64 calibration images) rose with the compensation, so the model is the default one.",
           "`bench_compile.py --bits ... --variants default " + " ".join(f"arcq{s}" for s in shares)
           + " --no-ort --no-latency`.", "",
           "| model | bits | calib | default | " + " | ".join(f"share {s / 100:g}" for s in shares) + " | commit |",
           "|---|---|---|---|" + "---|" * len(shares) + "---|"]
    for model in models:
        keys = sorted({(r["bits"], r["calib_images"]) for r in arcq if r["model"] == model})
        for bits, calib in keys:
            def cell(variant):
                r = next((x for x in rows if x["model"] == model and x.get("bits") == bits and "top1" in x
                          and x.get("calib_images") == calib and x.get("variant") == variant), None)
                if r is None:
                    return "–", None
                if variant != "default" and r.get("extra_macs") == 0:
                    # the pass's check found the compensation raised the logit error, and left it out
                    return f"{fmt(r['drop_top1'], 1)} (left out)", r.get("commit")
                macs = f" / +{100.0 * r['extra_macs'] / r['macs']:.0f}%" if r.get("macs") else ""
                return f"{fmt(r['drop_top1'], 1)}{macs}", r.get("commit")
            base, _ = cell("default")
            cells = [cell(f"arcq{s}") for s in shares]
            commits = sorted({c for _, c in cells if c})
            out.append(f"| {model} | {bits} | {calib} | {base} | " + " | ".join(c for c, _ in cells)
                       + f" | {', '.join(commits) or '–'} |")
    return out + [""]


def ablation(rows: list[dict]) -> list[str]:
    """Top-1 drop per model and bit width as methods are added one at a time."""
    order = ["rtn", "bc", "absorb", "gptq", "clip", "learnclip", "adaround", "blocks", "everylayer", "noblockclip",
             "default", "channels", "now256", "allimages", "refit", "equalize"]
    names = {"rtn": "PoT round-to-nearest", "bc": "+ compensation bias", "absorb": "+ ReLU6 range absorption",
             "gptq": "+ GPTQ, per-channel exponent", "clip": "+ continuous clipping thresholds (`--no-adaround`)",
             "learnclip": "+ thresholds learned on block outputs (`--no-adaround`, on the clip column)",
             "adaround": "+ AdaRound per layer (`--no-block-recon`, on the clip column)",
             "blocks": "+ block reconstruction (4-bit residual branch and last-conv output)",
             "everylayer": "the same with an 8-bit residual branch and last-conv output",
             "noblockclip": "the same, AdaRound only on layers no block reconstructs, first layer's output 8-bit, sharper rounding term, residual-stream scale (b78114a; at w2a4 until 3b17e7d)",
             "default": "+ thresholds learned on block outputs before the blocks (8b0b0ef, at 4-bit weights)",
             "channels": "+ per-channel thresholds, half-way where dense convs read (3b17e7d)",
             "now256": "the default of the model tables' 256-image rows (their commit is there)",
             "allimages": "+ GPTQ and blocks on every calibration image, 512 of them (9d6bea6; the default); below 4-bit weights, + progressive hardening (8e3fed5), per-channel grid offsets (25097f0) and 600 block steps (ea2bb4a); the 512 images spread over the folder, not its first 512 classes (af0ec74); measured on af0ec74 (w4a4) and 0831965",
             "refit": "+ head refit (`refit_head`, 09b1129; below 8-bit activations), 512 images; the commit is in the model tables",
             "equalize": "`--equalize-channels` (on the clip column)"}
    fp = {r["model"]: r["top1"] for r in rows if r["method"] == "fp32"}
    cells: dict = {}
    for r in rows:
        variant = r.get("variant")
        passes = r.get("pass_seconds", {})
        if variant == "default" and r.get("bits") != "w8a8" and "commit" in r and r.get("calib_images") == 256:
            variant = "now256"  # a record that names its commit is from after this table's history
        elif variant == "default" and r.get("bits") != "w8a8" and "EqualizeChannelsPass" in passes:
            variant = "channels"  # per-channel thresholds on by default under block reconstruction (3b17e7d)
        elif variant == "default" and r.get("bits", "").endswith("a8") and r["bits"] != "w8a8" \
                and "ReconstructBlocksPass" in passes:
            variant = "channels"  # at 8-bit activations the threshold methods do not apply: the default there
        elif variant == "default" and r.get("bits") != "w8a8" and "ReconstructBlocksPass" not in passes:
            # a main-run record from before block reconstruction (or before AdaRound) was the default
            variant = "adaround" if "AdaRoundLayersPass" in passes else "clip"
        elif variant == "default" and r.get("bits") != "w8a8" and "residual_bits" not in r:
            variant = "blocks"  # ... from before the academic residual / last-conv widths (6ef4baa)
        elif variant == "default" and r.get("bits") != "w8a8" and r.get("adaround", "") != "auto: outside blocks" \
                and passes.get("AdaRoundLayersPass", 0.0) > 1.0:
            # ... from before AdaRound left the block layers to the blocks (43c7e1a; such records do not say
            # how AdaRound resolved, but it then took minutes, and a second when it has no layer left)
            variant = "everylayer"
        elif variant == "default" and r.get("bits") != "w8a8" and "LearnClipRangesPass" not in passes:
            variant = "noblockclip"  # ... from before learned thresholds ran under blocks too (8b0b0ef)
        if variant == "channels" and r.get("calib_images") == 512:
            # the default since 9d6bea6: 512 images, all read by GPTQ and the blocks; since 09b1129, below 8-bit
            # activations, with the classifier refitted last
            variant = "refit" if "RefitHeadPass" in passes else "allimages"
        elif r.get("calib_images") != 256:
            continue
        if variant in order and "top1" in r:
            cells[(r["model"], r["bits"], variant)] = r
    # rows for the bit widths an ablation ran (not every default compile)
    keys = list(OrderedDict.fromkeys((m, b) for m, b, v in cells
                                     if v not in ("default", "channels", "now256", "allimages", "refit", "adaround",
                                                  "blocks", "everylayer", "noblockclip")))
    order = [v for v in order if any(k[2] == v for k in cells)]
    refit256 = [("RefitHeadPass" in r.get("pass_seconds", {})) for k, r in cells.items() if k[2] == "now256"]
    now256 = "with the head refit" if refit256 and all(refit256) else "before the head refit" if not any(refit256) \
        else "some before the head refit"
    names["now256"] = names["now256"][:-1] + f"; {now256})"
    out = ["## Ablation: methods added one at a time", "",
           "Top-1 drop from FP32 on val500 (compile seconds in brackets), 256 calibration images (512 in the last two",
           "default columns), power-of-two",
           "everywhere, first and last layers 8-bit. Produced by `python bench/bench_compile.py --bits w4a8 w4a4",
           "--variants rtn bc absorb gptq --no-ort --no-latency` (run while a `ptqc sensitivity` job shared the",
           "machine, so its seconds are only indicative: EfficientNet's 184 s GPTQ cell is contention, the same",
           "compile took 22 s alone), `--bits w4a8 w4a4 w2a4 --variants clip` and `--bits w4a4 w2a4 --variants",
           "equalize`. The columns from `blocks` to the 3b17e7d one hold main runs: with AdaRound on every low-bit layer",
           "before the blocks (EfficientNet's 1877 s w4a4 includes a CI run sharing the cores), then with AdaRound",
           "left to the layers no block reconstructs (none, on these three models), the cheaper block pass, the",
           "first layer's output at 8 bits and the sharper rounding term (35f14c5) and the residual-stream scale",
           "(b78114a), then with learned thresholds before the blocks (8b0b0ef, on a machine about 1.4x slower;",
           "cf8f368 keeps them off below 4-bit weights, after that w2a4 cell), then with per-channel thresholds",
           "under block reconstruction (3b17e7d; its w4a8 and w3a3 cells are from fc0a462, and at w4a8 the two",
           "threshold methods do not apply). The next columns are the default: on 256 images " + now256 + ",",
           "on the 512 it reads by default before the refit (w4a4 on af0ec74, the other widths on 0831965),",
           "and on 512 with the refit (e6850d0, on a day this machine compiled about 15% slower: MobileNetV2 w2a4",
           "took 379 s, of which 17 s refitting the head, against 327 s before). The equalize records",
           "were measured before AdaRound became the default, so that column adds `--equalize-channels` to the clip",
           "column, not to the default.", "",
           "| model | bits | FP32 | " + " | ".join(names[v] for v in order) + " |",
           "|---|---|---|" + "---|" * len(order)]
    for model, bits in keys:
        row = [model, bits, fmt(fp.get(model), 1)]
        for v in order:
            r = cells.get((model, bits, v))
            row.append("–" if r is None else f"{r['drop_top1']:.1f} ({r['compile_s']:.0f} s)")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


if __name__ == "__main__":
    main()
