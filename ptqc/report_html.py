"""The report as one self-contained HTML file: tables, advice, and matplotlib figures embedded as PNG.

Nothing is fetched when the page opens: no scripts, fonts or images from elsewhere.  A few lines of inline
script mark the page ``data-rendered="ok"`` once every figure has decoded, so a headless browser can check
that it renders (tests/test_report.py, with Chromium when it is installed).
"""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

from ptqc.report import Report

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1b1f24;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a}.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:130px}.card b{display:block;font-size:20px}
table{border-collapse:collapse;width:100%;font-size:12.5px}th,td{padding:3px 6px;border-bottom:1px solid #eaeef2;text-align:right;white-space:nowrap}
th{background:#f6f8fa;position:sticky;top:0}td.l,th.l{text-align:left}td.m{white-space:normal;min-width:160px}tr.worst td{background:#fff4e5}
.bar{display:inline-block;height:9px;background:#0969da;vertical-align:middle;margin-left:4px}
.hint{background:#f6f8fa;border-left:4px solid #bf8700;padding:6px 10px;margin:6px 0}
img{max-width:100%;border:1px solid #eaeef2}code{background:#f6f8fa;padding:1px 4px;border-radius:4px}
details{margin:8px 0}
"""

_SCRIPT = """
window.addEventListener('load',function(){var imgs=document.images,ok=imgs.length>0;
for(var i=0;i<imgs.length;i++){if(!imgs[i].complete||imgs[i].naturalWidth===0){ok=false;}}
document.body.setAttribute('data-rendered',ok?'ok':'broken');
document.body.setAttribute('data-figures',String(imgs.length));});
"""


def is_low_bit(layer) -> bool:
    """Below 8 bits (the pair-safe first layer's 7-bit grid counts as 8-bit)."""
    return layer.weight_bits < 7 or layer.input_bits < 8


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _db(x: float) -> str:
    if math.isinf(x):
        return "exact" if x > 0 else "-inf"
    return f"{x:.1f}"


def sqnr_figure(report: Report) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    layers = report.layers
    x = np.arange(len(layers))
    cap = 80.0
    acc = [min(layer.sqnr_db, cap) for layer in layers]
    alone = [min(layer.sqnr_alone_db, cap) for layer in layers]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.plot(x, acc, "-o", ms=3, label="accumulated (quantized network vs float)")
    ax.plot(x, alone, "-s", ms=3, alpha=0.8, label="layer alone (float input)")
    low = [i for i, layer in enumerate(layers) if is_low_bit(layer)]
    if low and len(low) < len(layers):
        ax.scatter([x[i] for i in range(len(layers)) if i not in low],
                   [alone[i] for i in range(len(layers)) if i not in low], marker="D", s=28, color="k", zorder=5,
                   label="8-bit layer")
    ax.set_xlabel("weighted layer (graph order)")
    ax.set_ylabel("SQNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("SQNR along the network")
    return _png(fig)


def histogram_figure(report: Report, names: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = 2
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        layer = next(layer for layer in report.layers if layer.name == name)
        t = report.tensors[layer.input_tensor]
        vals = report.samples_of.get(t.name)
        if vals is None or vals.size == 0:
            ax.set_visible(False)
            continue
        lo, hi = t.range
        span_lo = min(float(vals.min()), lo)
        span_hi = max(float(vals.max()), hi)
        ax.hist(vals, bins=120, range=(span_lo, span_hi), color="#0969da", alpha=0.8, log=True)
        for edge in (lo, hi):
            ax.axvline(edge, color="#cf222e", lw=1.2)
        ax.set_title(f"input of {name}: {t.bits}-bit, 2^{t.exp}, clip [{lo:.3g}, {hi:.3g}], "
                     f"{100 * t.clip_ratio:.2f}% clipped", fontsize=8.5)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)


def render(report: Report, worst: int = 4) -> str:
    """The HTML page of ``report``."""
    esc = html.escape
    worst_layers = report.worst_layers(worst)
    worst_names = {layer.name for layer in worst_layers}
    s = report.settings
    bits = f"w{s.get('ptqc.config.weight_bits', '?')}a{s.get('ptqc.config.act_bits', '?')}"
    rows = []
    max_nsr = max((10 ** (-layer.sqnr_alone_db / 10) for layer in report.layers if math.isfinite(layer.sqnr_alone_db)), default=1.0)
    for i, layer in enumerate(report.layers):
        t_in = report.tensors[layer.input_tensor]
        t_out = report.tensors.get(layer.output_tensor) if layer.output_bits is not None else None
        nsr = 10 ** (-layer.sqnr_alone_db / 10) if math.isfinite(layer.sqnr_alone_db) else 0.0
        bar = f'<span class="bar" style="width:{max(1, int(60 * nsr / max_nsr))}px"></span>'
        err = t_in.clip_error + t_in.round_error
        split = f"{100 * t_in.clip_error / err:.0f} / {100 * t_in.round_error / err:.0f}" if err > 0 else "-"
        rows.append(
            f'<tr class="{"worst" if layer.name in worst_names else ""}"><td>{i}</td><td class="l">{esc(layer.name)}</td>'
            f"<td class='l'>{layer.op}</td><td>{layer.weight_bits}</td><td>{layer.input_bits}&rarr;"
            f"{layer.output_bits if layer.output_bits else 'float'}</td><td>{layer.input_exp}</td>"
            f"<td>{layer.weight_exp_range}</td><td>{'' if layer.output_exp is None else layer.output_exp}</td>"
            f"<td>{layer.shift_range}</td><td>{_db(layer.sqnr_alone_db)}{bar}</td><td>{_db(layer.sqnr_db)}</td>"
            f"<td>{_db(t_in.quant_sqnr_db)}</td><td>{100 * t_in.clip_ratio:.2f}</td><td>{split}</td>"
            f"<td>{'' if t_out is None else f'{100 * t_out.clip_ratio:.2f}'}</td>"
            f"<td class='l m'>{esc(', '.join(layer.methods))}</td></tr>")
    hints = "".join(f'<div class="hint">{esc(h)}</div>' for h in report.hints)
    settings = "".join(f"<tr><td class='l'>{esc(k)}</td><td class='l'>{esc(v)}</td></tr>" for k, v in sorted(s.items()))
    fig1 = sqnr_figure(report)
    fig2 = histogram_figure(report, [layer.name for layer in worst_layers])
    mixed = s.get("ptqc.mixed_precision")
    raised = [layer for layer in report.layers if any(m.startswith("bits=") for m in layer.methods)]
    if mixed:
        precision = f"<p>Mixed precision chosen by <code>--{esc(mixed.split(':')[0])}</code>: {esc(mixed.split(':', 1)[1])}.</p>"
    elif raised:
        precision = "<p>Per-layer precision set by hand: " + ", ".join(
            f"<code>{esc(layer.name)}</code> ({esc(next(m for m in layer.methods if m.startswith('bits=')))})"
            for layer in raised) + ".</p>"
    else:
        precision = ""
    if report.kept_float:
        precision += ("<p>Kept float, so not integer-only (absent from the layer table): "
                      + ", ".join(f"<code>{esc(name)}</code>" for name in report.kept_float) + ".</p>")
    worst_list = ", ".join(f"<code>{esc(layer.name)}</code> ({_db(layer.sqnr_alone_db)} dB)" for layer in worst_layers)
    measured_on = report.measured_on or f"{report.samples} samples"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>ptqc report: {esc(str(report.quantized))}</title><style>{_CSS}</style></head>
<body data-rendered="pending">
<h1>ptqc report</h1>
<div class="sub">{esc(str(report.quantized))} against {esc(str(report.model))}, {esc(measured_on)}</div>
<div class="cards">
<div class="card">bit widths<b>{bits}</b></div>
<div class="card">logit SNR<b>{_db(report.logit_snr_db)} dB</b></div>
<div class="card">top-1 agreement with float<b>{report.agreement:.1f}%</b></div>
<div class="card">weighted layers<b>{len(report.layers)}</b></div>
<div class="card">quantized tensors<b>{len(report.tensors)}</b></div>
</div>
{precision}
<h2>What to try</h2>
{hints}
<p>Worst layers alone: {worst_list}.</p>
<h2>SQNR along the network</h2>
<img alt="SQNR along the network" src="data:image/png;base64,{fig1}">
<h2>Input histograms of the worst layers, with the clipping range (red)</h2>
<img alt="histograms of the worst layers" src="data:image/png;base64,{fig2}">
<h2>Per layer</h2>
<p class="sub">SQNR alone: the layer's own input quantizer, weights, bias and output quantizer on the float
model's input. Accumulated: the quantized network against the float network at the layer's output. Input
quantizer: its SQNR on the float values, the share of values it clips, and the split of its error into
clipping / rounding (%). Shift: the requantization right/left shift per channel (e_in + e_w - e_out). Highlighted:
the {len(worst_layers)} worst layers alone.</p>
<table><thead><tr><th>#</th><th class="l">layer</th><th class="l">op</th><th>w bits</th><th>a bits in&rarr;out</th>
<th>e_in</th><th>e_w</th><th>e_out</th><th>shift</th><th>SQNR alone dB</th><th>SQNR accum. dB</th>
<th>input q SQNR dB</th><th>input clipped %</th><th>clip / round %</th><th>output clipped %</th><th class="l">methods</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<details><summary>How this model was made (its metadata)</summary><table>{settings}</table></details>
<script>{_SCRIPT}</script>
</body></html>
"""


def write(report: Report, path: str) -> None:
    """Write the page atomically."""
    from ptqc.writer import write_atomic

    write_atomic(render(report).encode("utf-8"), path, ".html.tmp")
