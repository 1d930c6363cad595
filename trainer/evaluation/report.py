"""Writes an evaluation report directory: ``report.json``, ``report.md`` and PNG plots (matplotlib, Agg).

report.json schema (schema "selftransfer-eval", schema_version 1)
-----------------------------------------------------------------
Numbers are JSON numbers; ``null`` stands for "not applicable", and for an infinite PSNR (identical images) in
per-frame values. PSNR in dB, SSIM unitless in [-1, 1], VMAF in points (0..100), flicker in 8-bit Y levels, times
in seconds. The ``vmaf`` entries below are present only when VMAF was computed (``vmaf.status`` "ok").

- ``schema``, ``schema_version``, ``created`` (UTC ISO 8601), ``selftransfer_version``, ``elapsed_s``
- ``video``: ``path``, ``sha256``, ``width``, ``height``, ``fps``, ``frames``, ``duration``
- ``model``: ``path``, ``bundle_sha256``, ``arch``, ``scale``, and the bundle manifest's ``degradation``,
  ``validation``, ``train_config``, ``source`` (copied as they are, ``null`` when absent)
- ``generic``: ``spec`` ("official" or the path given), ``label``, ``path``, ``sha256`` of the generic weights
- ``protocol``: ``kind`` ("self": HR = the video's frames, LR = their degradation | "reference": LR = the
  source's own frames, HR = the frames of ``--reference``), ``reference`` (``null``, or ``path``, ``name``,
  ``sha256``, ``width``, ``height``, ``fps``, ``frames`` of REF), ``setting`` (the bundle manifest's ``setting``
  block: ``kind`` "source" | "delivery", ``text``, ``ships``, ``why``, ...; ``null`` when not recorded),
  ``scale``, ``degradation`` (used for the LR frames: ``method``, and ``crf`` for x264; ``method`` "none" with
  a reference),
  ``hr_size`` / ``lr_size`` ([width, height]), ``near_seconds``, ``include_val``, ``assume_unseen`` (the bundle
  records no training frames and the user said none is from this video), ``same_video`` (the bundle's source
  sha256 matches the video, or is not recorded), ``sampling`` (``mode`` "frames" | "every" | "all",
  ``frames``, ``every``, ``seed``), ``train_frames`` and ``val_frames`` (indices from the manifest),
  ``candidates`` (``all``/``near``/``far``: how many unseen frames could be tested), ``test_frames`` (indices
  evaluated), ``tile`` (LR px, 0 = whole frame), ``overlap`` (LR px), ``device``, ``methods`` (evaluated methods:
  "bicubic", "generic", "selftransfer", and "deployed" when the VapourSynth filter was checked)
- ``frames``: one object per test frame, in index order: ``index``, ``time`` (s), ``subset`` ("near" | "far"),
  ``distance_s`` (to the nearest training frame; ``null`` when none is known), ``is_val``, ``metrics``
  ({method: {``psnr_y``, ``ssim_y``, ``psnr_rgb``, ``vmaf``}}), ``gain_psnr_y`` (selftransfer - generic),
  ``gain_vmaf`` (selftransfer - generic, VMAF points), ``vmaf_motion2`` (VMAF's motion2 feature of the ground-truth
  frame, from its true neighbours), and with the deployed path ``deployed_vs_torch`` {``max_abs_diff_levels``
  (int, 8-bit), ``pixels_differing`` (fraction)}
- ``flicker_pairs``: one object per pair of consecutive test frames (t-1, t): ``index`` (t), ``subset`` (of t),
  ``flicker`` ({method: value})
- ``summary``: {"all" | "near" | "far": {``frames``, ``pairs``, ``methods`` ({method: {"psnr_y" | "ssim_y" |
  "psnr_rgb" | "vmaf" | "flicker": {``n``, ``mean``, ``median``, ``worst``, ``worst_frame``, ``n_infinite``}}}:
  mean and median over finite values, worst = lowest PSNR/SSIM/VMAF or highest flicker), ``gain_over_generic``
  ({method other than generic: {``psnr_y_mean``, ``psnr_y_median``, ``psnr_y_min``, ``psnr_y_max``,
  ``ssim_y_mean``, ``psnr_rgb_mean``, ``flicker_mean_change`` (method - generic: negative = steadier),
  ``frames_better``, ``frames_worse`` (by Y-PSNR), ``vmaf_mean``, ``vmaf_median``, ``vmaf_min``, ``vmaf_max``
  (per-frame VMAF gain, points), ``vmaf_frames_better``, ``vmaf_frames_worse``}})}}
- ``deployed``: ``status`` ("ok" | "skipped": not requested or plugin not installed | "error": the filter
  could not be created), ``reason`` (when not ok); when ok: ``max_abs_diff_levels``,
  ``pixels_differing`` (mean fraction), ``max_abs_psnr_y_diff``, ``mean_psnr_y_diff`` (deployed - PyTorch, dB),
  ``tolerance_db``, ``agree`` (max |difference| <= tolerance)
- ``vmaf``: ``status`` ("ok" | "skipped": ``--no-vmaf``), ``reason`` (when skipped); when ok: ``package``
  ("vmaf-torch"), ``version``, ``model`` ("vmaf_v0.6.1"), ``workers`` (threads scoring the methods of a frame),
  ``timing`` {``s_per_frame_per_method``, ``motion2_s_per_frame`` (decoding the neighbours included),
  ``frame_size`` ([width, height]), ``load_average_1min`` (at the end of the run)}
- ``timing_s_per_frame``: {method: seconds per frame on this machine (informative only)}
- ``warnings``: list of strings
- ``verdict``: ``selftransfer_beats_generic`` (mean Y-PSNR gain on all test frames > 0), ``gain_psnr_y_mean``,
  ``gain_psnr_y_mean_near``, ``gain_psnr_y_mean_far`` (``null`` for an empty subset), ``text``
- ``plots``: {``psnr_per_frame``, ``crops_largest_gain``, ``crops_smallest_gain``: file names in the report
  directory, ``null`` when not drawn}
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

SCHEMA_DOC = __doc__[__doc__.index("report.json schema"):]
METHOD_LABELS = {"bicubic": "bicubic", "generic": "generic CARN-M", "selftransfer": "self-transfer",
                 "deployed": "self-transfer (deployed)"}
COLORS = {"bicubic": "tab:gray", "generic": "tab:blue", "selftransfer": "tab:red", "deployed": "tab:purple"}

CONVENTIONS = """\
- **Y-PSNR / Y-SSIM**: on the luma Y of ITU-R BT.601 in the studio range, as MATLAB `rgb2ycbcr`
  (Y = 16 + 65.481 R + 128.553 G + 24.966 B, RGB in [0, 1]; Y not rounded), with `scale` pixels shaved from every
  border; SR outputs are clipped to [0, 1] and rounded to 8 bits first, as a saved frame would be. PSNR peak 1.0
  (i.e. 255 on the 8-bit scale); the mean over frames is the mean of per-frame PSNR values (dB).
- **SSIM**: Wang et al. 2004 with the constants of the authors' `ssim.m`: 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, L = 255, population variances, mean of the SSIM map over the positions where the whole
  window lies inside the (shaved) image.
- **RGB PSNR**: over the three channels, same shave and quantization.
- **Flicker** (lower is better, 8-bit Y levels): for each pair of consecutive test frames (t-1, t),
  RMSE over the shaved Y plane of (Y(SR_t) - Y(SR_t-1)) - (Y(HR_t) - Y(HR_t-1)), i.e. how much the output's
  frame-to-frame change departs from the true one (equivalently the RMSE of the change of the error image).
  A constant error does not flicker; an error that comes and goes does. Reported as the mean over pairs.
- **VMAF** (0..100, higher is better): Netflix's vmaf_v0.6.1 model through the `vmaf-torch` package, a PyTorch
  re-implementation of libvmaf's features (its authors report a mean |difference| of 0.006 points against libvmaf
  on the Netflix public set), not libvmaf itself. Computed on the whole frame at the ground truth's resolution, on
  the same BT.601 studio-range Y rounded to 8-bit integers (the Y plane libvmaf reads from a limited-range 8-bit
  YUV file), with the score clipped to [0, 100] as libvmaf does. Its motion feature belongs to the ground-truth
  video: for each test frame it comes from the true neighbouring frames i-1 and i+1, tested or not. The verdict
  stays Y-PSNR-based.
- **Gain over generic**: per frame, method minus generic, then mean / median over frames.
"""


def _clean(x):
    """JSON-safe copy: numpy scalars to Python, inf/nan to null."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_report_dir(report: dict, directory: Path, crops: dict) -> dict:
    """Write the plots, report.json and report.md into ``directory``; returns the JSON-clean report."""
    directory = Path(directory)
    report = _clean(report)
    plots = {"psnr_per_frame": plot_psnr_curves(report, directory / "psnr_per_frame.png"),
             "crops_largest_gain": None, "crops_smallest_gain": None}
    for key, name in (("largest_gain", "crops_largest_gain"), ("smallest_gain", "crops_smallest_gain")):
        if crops.get(key) is not None:
            plots[name] = plot_crops(crops[key], directory / f"{name}.png", key)
    report["plots"] = plots
    _write(directory / "report.json", json.dumps(report, indent=1, allow_nan=False).encode())
    _write(directory / "report.md", markdown(report).encode())
    return report


# -- markdown -------------------------------------------------------------------------------------------------
def _f(x, digits=2, signed=False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def has_vmaf(report: dict) -> bool:
    return report.get("vmaf", {}).get("status") == "ok"


def summary_table(report: dict, subset: str) -> str:
    s = report["summary"][subset]
    methods = report["protocol"]["methods"]
    vmaf = has_vmaf(report)
    rows = ["| method | Y-PSNR mean | median | worst (frame) | Y-SSIM mean | RGB-PSNR mean | flicker mean | "
            "Y-PSNR gain over generic (mean / median) | frames better / worse |"
            + (" VMAF mean | VMAF worst (frame) | VMAF gain over generic (mean / worst frame) |" if vmaf else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if vmaf else "")]
    for m in methods:
        st = s["methods"][m]
        g = s["gain_over_generic"].get(m)
        worst = st["psnr_y"]
        gain = "0 (reference)" if m == "generic" else (
            f"{_f(g['psnr_y_mean'], 3, True)} / {_f(g['psnr_y_median'], 3, True)}")
        better = "–" if m == "generic" else f"{g['frames_better']} / {g['frames_worse']}"
        row = (f"| {METHOD_LABELS[m]} | {_f(worst['mean'])} | {_f(worst['median'])} | "
               f"{_f(worst['worst'])} ({worst['worst_frame']}) | {_f(st['ssim_y']['mean'], 4)} | "
               f"{_f(st['psnr_rgb']['mean'])} | {_f(st['flicker']['mean'], 3)} | {gain} | {better} |")
        if vmaf:
            v = st["vmaf"]
            v_gain = "0 (reference)" if m == "generic" else (
                f"{_f(g['vmaf_mean'], 2, True)} / {_f(g['vmaf_min'], 2, True)}")
            row += f" {_f(v['mean'])} | {_f(v['worst'])} ({v['worst_frame']}) | {v_gain} |"
        rows.append(row)
    return "\n".join(rows)


def vmaf_text(report: dict) -> str:
    """One line saying whether and how VMAF was computed."""
    v = report.get("vmaf") or {"status": "skipped", "reason": "not recorded"}
    if v["status"] != "ok":
        return f"VMAF: not computed ({v['reason']})"
    t = v["timing"]
    return (f"VMAF: {v['model']} through {v['package']} {v['version']} (a re-implementation of libvmaf, not "
            f"libvmaf); {t['s_per_frame_per_method']:.2f} s per {t['frame_size'][0]}x{t['frame_size'][1]} frame per "
            f"method + {t['motion2_s_per_frame']:.2f} s per frame for the motion feature, {v['workers']} "
            f"thread(s), load average {t['load_average_1min']:.2f}")


def markdown(report: dict) -> str:
    p, v, m = report["protocol"], report["video"], report["model"]
    vmaf = has_vmaf(report)
    deg = p["degradation"]
    deg_text = deg["method"] + (f" (CRF {deg['crf']}" + (", coded as a video" if deg.get("coding") == "video" else "")
                                + ")" if "crf" in deg else "")
    cand = p["candidates"]
    lines = [
        f"# Self-transfer evaluation: {Path(v['path']).name}",
        "",
        f"**{report['verdict']['text']}.**",
        "",
        f"- Video: `{v['path']}` ({v['width']}x{v['height']}, {v['fps']:.3f} fps, {v['frames']} frames), "
        f"sha256 `{v['sha256'][:16]}…`",
        f"- Model: `{m['path']}` ({m['arch']} x{m['scale']}), trained on degradation {m['degradation']}",
        f"- Generic: {report['generic']['label']} (sha256 `{report['generic']['sha256'][:16]}…`)",
        f"- Created {report['created']} by selftransfer {report['selftransfer_version']} in "
        f"{report['elapsed_s']:.0f} s",
        "",
    ]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    ref = p.get("reference")
    setting = p.get("setting")
    lines += ["## Protocol", ""]
    if setting:
        target = setting.get("target") or {}
        lines += [f"- The bundle was fitted for {setting.get('text', setting.get('kind'))}; it ships "
                  f"**{setting.get('ships')}**: {setting.get('why')}."
                  + (f" Training targets: {target.get('what')} ({target.get('model')})."
                     if target.get("kind") == "teacher" else "")]
    else:
        lines += ["- The bundle does not record which case it was fitted for (source or delivery)."]
    if ref:
        lines += [
            f"- **Reference setting**: LR = the source's own {p['lr_size'][0]}x{p['lr_size'][1]} frames, untouched "
            f"(what a user upscales); HR = the frames of the reference `{ref['name']}` ({ref['width']}x"
            f"{ref['height']}, sha256 `{ref['sha256'][:16]}…`), paired by index and timestamp.",
            "- Test frames: every source frame is a fair test frame (the bundle never saw the reference); the "
            f"{len(p['train_frames'])} source frames it learned from (as HR targets one octave below) are "
            "tested too, at distance 0.",
        ]
    else:
        lines += [
            f"- HR: the video's frames, cropped to {p['hr_size'][0]}x{p['hr_size'][1]} (a multiple of the scale); "
            f"LR: {p['lr_size'][0]}x{p['lr_size'][1]}, degradation **{deg_text}** applied to each HR frame.",
            f"- Test frames: frames the bundle did not learn from — not one of the {len(p['train_frames'])} "
            "training frames" + ("" if p["include_val"] else f", and not one of the {len(p['val_frames'])} "
                                 "validation frames (they selected the shipped checkpoint, so they are excluded)")
            + (". Validation frames are **included** (`--include-val`)." if p["include_val"] else "."),
        ]
    lines += [
        f"- Subsets: *near* = within {p['near_seconds']} s of a training frame, *far* = further. "
        f"Unseen frames available: {cand['all']} ({cand['near']} near, {cand['far']} far); evaluated: "
        f"{len(p['test_frames'])} (sampling: {_sampling_text(p['sampling'])}).",
        "- Methods on the same LR input: bicubic = MATLAB `imresize` bicubic upsampling (a = -0.5), the SR "
        "literature's baseline; generic = the official CARN-M weights; self-transfer = the bundle in PyTorch"
        + ("; deployed = the bundle through `core.selftransfer.Upscale` (VapourSynth, RGB24 clip of the LR frames, "
           "precision fp32)"
           if "deployed" in p["methods"] else "")
        + f". Networks run through the project's tiling (tile {p['tile'] or 'whole frame'}, overlap "
          f"{p['overlap']} LR px) on {p['device']}.",
        f"- {vmaf_text(report)}.",
        "",
        "### Metric conventions",
        "",
        CONVENTIONS,
        "## Results",
        "",
    ]
    for subset, title in (("all", "All test frames"), ("near", "Near"), ("far", "Far")):
        s = report["summary"][subset]
        lines += [f"### {title} ({s['frames']} frames, {s['pairs']} consecutive pair{'' if s['pairs'] == 1 else 's'} "
                  "for flicker)", ""]
        lines += [summary_table(report, subset) if s["frames"] else "_No test frame in this subset._", ""]
    d = report["deployed"]
    lines += ["### Deployed path vs PyTorch", ""]
    if d["status"] == "ok":
        lines += [f"{'Agree' if d['agree'] else '**DISAGREE**'}: max |Δ Y-PSNR| {d['max_abs_psnr_y_diff']:.4f} dB "
                  f"(tolerance {d['tolerance_db']} dB), mean Δ {d['mean_psnr_y_diff']:+.4f} dB, max abs pixel "
                  f"difference {d['max_abs_diff_levels']} 8-bit level(s), {100 * d['pixels_differing']:.4f}% of "
                  "pixels differ.", ""]
    else:
        lines += [f"Not checked: {d['reason']}.", ""]
    lines += ["## Plots", ""]
    for key, caption in (("psnr_per_frame", f"Y-PSNR{' and VMAF' if vmaf else ''} per test frame; training frames "
                                            "marked"),
                         ("crops_largest_gain", "Crops of the frame with the largest gain over generic"),
                         ("crops_smallest_gain", "Crops of the frame with the smallest gain over generic")):
        if report["plots"].get(key):
            lines += [f"![{caption}]({report['plots'][key]})", ""]
    vmaf_head = (" | " + " | ".join(f"{METHOD_LABELS[mm]} VMAF" for mm in p["methods"]) + " | VMAF gain | motion2"
                 if vmaf else "")
    lines += ["## Per frame", "", "| frame | time (s) | subset | distance (s) | "
              + " | ".join(f"{METHOD_LABELS[mm]} Y-PSNR" for mm in p["methods"]) + " | gain" + vmaf_head + " |",
              "|---:|---:|---|---:|" + "---:|" * ((len(p["methods"]) + 1) * (2 if vmaf else 1) + vmaf)]
    for f in report["frames"]:
        vals = " | ".join(_f(f["metrics"][mm]["psnr_y"]) for mm in p["methods"])
        row = (f"| {f['index']}{' (val)' if f['is_val'] else ''} | {f['time']:.2f} | {f['subset']} | "
               f"{_f(f['distance_s'])} | {vals} | {_f(f['gain_psnr_y'], 3, True)} |")
        if vmaf:
            row += (" " + " | ".join(_f(f["metrics"][mm]["vmaf"]) for mm in p["methods"])
                    + f" | {_f(f['gain_vmaf'], 2, True)} | {_f(f['vmaf_motion2'])} |")
        lines.append(row)
    t = report["timing_s_per_frame"]
    per_frame = ", ".join(f"{METHOD_LABELS[k]} {_f(x)}" for k, x in t.items())
    lines += ["", f"Seconds per frame on this machine: {per_frame}.", "", "## report.json schema", "", SCHEMA_DOC]
    return "\n".join(lines) + "\n"


def _sampling_text(s: dict) -> str:
    if s["mode"] == "all":
        return "all unseen frames"
    if s["mode"] == "every":
        return f"frames K*n and K*n+1 with K = {s['every']}"
    return f"up to {s['frames']} frames in consecutive pairs, stratified over the video, seed {s['seed']}"


def console_table(report: dict) -> str:
    rows = [report["verdict"]["text"]]
    for subset in ("all", "near", "far"):
        s = report["summary"][subset]
        if not s["frames"]:
            continue
        rows.append(f"{subset} ({s['frames']} frames):")
        for m in report["protocol"]["methods"]:
            st = s["methods"][m]
            g = s["gain_over_generic"].get(m)
            rows.append(f"  {METHOD_LABELS[m]:<26} Y-PSNR {_f(st['psnr_y']['mean']):>6}  SSIM "
                        f"{_f(st['ssim_y']['mean'], 4)}  flicker {_f(st['flicker']['mean'], 3):>6}"
                        + (f"  VMAF {_f(st['vmaf']['mean']):>6}" if "vmaf" in st else "")
                        + ("" if g is None else f"  gain {_f(g['psnr_y_mean'], 3, True)} dB"
                           + (f" / {_f(g['vmaf_mean'], 2, True)} VMAF" if "vmaf_mean" in g else "")))
    d = report["deployed"]
    rows.append("deployed path: " + (f"{'agrees' if d['agree'] else 'DISAGREES'} with PyTorch (max |Δ Y-PSNR| "
                                     f"{d['max_abs_psnr_y_diff']:.4f} dB)" if d["status"] == "ok"
                                     else f"not checked ({d['reason']})"))
    rows.append(vmaf_text(report))
    return "\n".join(rows)


# -- plots ----------------------------------------------------------------------------------------------------
def _figure(**kw):
    # A bare Figure draws with Agg when saved: no pyplot, no global backend state, no display needed.
    from matplotlib.figure import Figure

    return Figure(**kw)


def plot_psnr_curves(report: dict, path: Path) -> str:
    p = report["protocol"]
    frames = report["frames"]
    vmaf = has_vmaf(report)
    fig = _figure(figsize=(12, 9.5 if vmaf else 6.5), layout="constrained")
    axes = fig.subplots(3 if vmaf else 2, 1, sharex=True, height_ratios=[3, 2.2, 1.4] if vmaf else [3, 1.4])
    ax, gx = axes[0], axes[-1]
    xs = [f["index"] for f in frames]
    # Lines join consecutive frames only (a NaN breaks the line): a line across a gap would invent values.
    line_x = []
    for k, x in enumerate(xs):
        if k and x != xs[k - 1] + 1:
            line_x.append(np.nan)
        line_x.append(x)
    for axis, key in ((ax, "psnr_y"),) + (((axes[1], "vmaf"),) if vmaf else ()):
        for m in ("bicubic", "generic", "selftransfer"):
            ys = [np.nan if f["metrics"][m][key] is None else f["metrics"][m][key] for f in frames]
            line_y, k = [], 0
            for x in line_x:
                line_y.append(np.nan if np.isnan(x) else ys[k])
                k += 0 if np.isnan(x) else 1
            # generic: hollow squares on a dashed line, so it stays visible where self-transfer lies on top of it
            hollow = m == "generic"
            axis.plot(line_x, line_y, "--" if hollow else "-", lw=1.2, color=COLORS[m])
            axis.plot(xs, ys, "s" if hollow else "o", ms=6 if hollow else 3.5, color=COLORS[m],
                      fillstyle="none" if hollow else "full", label=METHOD_LABELS[m])
    if vmaf:
        axes[1].set_ylabel(f"VMAF ({report['vmaf']['model']})")
        axes[1].grid(alpha=0.3)
    for axis in axes:
        for k, t in enumerate(p["train_frames"]):
            axis.axvline(t, color="tab:green", lw=0.8, alpha=0.6, label="training frame" if k == 0 and axis is ax
                         else None)
        for k, t in enumerate(p["val_frames"]):
            axis.axvline(t, color="tab:orange", lw=1.0, ls="--", alpha=0.8,
                         label="validation frame" + ("" if p["include_val"] else " (not tested)")
                         if k == 0 and axis is ax else None)
    ax.set_ylabel("Y-PSNR (dB)")
    ax.set_title(f"Y-PSNR{' and VMAF' if vmaf else ''} per unseen test frame, x{p['scale']}, degradation {p['degradation']['method']}")
    ax.legend(loc="best", fontsize=8, ncols=2)
    ax.grid(alpha=0.3)
    gains = [np.nan if f["gain_psnr_y"] is None else f["gain_psnr_y"] for f in frames]
    colors = ["tab:red" if f["subset"] == "near" else "tab:purple" for f in frames]
    gx.bar(xs, gains, color=colors, width=0.8)
    gx.axhline(0, color="black", lw=0.8)
    gx.set_ylabel("self-transfer −\ngeneric (dB)")
    gx.set_xlabel("frame index  (bars: red = near, purple = far)")
    gx.grid(alpha=0.3)
    gx.set_xlim(-1, report["video"]["frames"])
    fig.savefig(path, dpi=100)
    return path.name


def plot_crops(crop: dict, path: Path, which: str) -> str:
    panels = crop["panels"]
    titles = []
    for name, _, values in panels:
        title = METHOD_LABELS.get(name, name)
        if values is not None:
            frame_psnr, crop_psnr, frame_vmaf = values
            title += f"\nframe {_f(frame_psnr)} dB · crop {_f(crop_psnr)} dB"
            if frame_vmaf is not None:
                title += f"\nframe VMAF {_f(frame_vmaf)}"
        titles.append(title)
    n_lines = max(t.count("\n") for t in titles)
    fig = _figure(figsize=(3.2 * len(panels), 3.9 + 0.2 * max(0, n_lines - 1)), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (name, img, values), title in zip(axes, panels, titles):
        ax.imshow(img, interpolation="nearest")
        title += "\n" * (n_lines - title.count("\n"))  # equal title heights keep the images aligned
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    x, y, w, h = crop["box"]
    what = "largest" if which == "largest_gain" else "smallest"
    fig.suptitle(f"Frame {crop['index']} (t = {crop['time']:.2f} s, {crop['subset']}): {what} Y-PSNR gain of "
                 f"self-transfer over generic, {crop['gain']:+.3f} dB; crop {w}x{h} at ({x}, {y})", fontsize=10)
    fig.savefig(path, dpi=100)
    return path.name
