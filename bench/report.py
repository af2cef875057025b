"""Summaries and output files: printed table, JSON, markdown and PNG plot."""
import json
import math
import os

from .cases import BYTES_MODEL, DTYPES, LAYOUTS, MODES
from .impls import IMPL_LABELS

# Below this speedup fused_bn counts as slower: repeated runs here differ by about 2%.
SLOWER_THAN = 0.98

MODE_LABELS = {"train_fwd": "training forward", "train_fwd_bwd": "training forward+backward",
               "eval_fwd": "eval forward"}
LAYOUT_LABELS = {"nchw": "NCHW", "channels_last": "NHWC"}
DTYPE_LABELS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def geomean(values):
    values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _group_summary(records, key_fields):
    groups = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in key_fields), []).append(r)
    rows = []
    for key, rs in groups.items():
        row = dict(zip(key_fields, key))
        row.update({
            "cases": len(rs),
            "geomean_vs_eager": geomean([r["speedup_vs_eager"] for r in rs]),
            "geomean_vs_compiled": geomean([r["speedup_vs_compiled"] for r in rs]),
            "slower_than_eager": sum(1 for r in rs
                                     if (r["speedup_vs_eager"] or math.inf) < SLOWER_THAN),
            "slower_than_compiled": sum(1 for r in rs
                                        if (r["speedup_vs_compiled"] or math.inf) < SLOWER_THAN),
        })
        rows.append(row)
    return rows


def summarize(records):
    """Geomean speedups of fused_bn per (mode, dtype, layout), per mode, and overall."""
    order = {m: i for i, m in enumerate(MODES)}
    dtype_order = {d: i for i, d in enumerate(DTYPES)}
    layout_order = {l: i for i, l in enumerate(LAYOUTS)}
    per_group = sorted(_group_summary(records, ("mode", "dtype", "layout")),
                       key=lambda r: (order[r["mode"]], dtype_order[r["dtype"]],
                                      layout_order[r["layout"]]))
    per_mode_dtype = sorted(_group_summary(records, ("mode", "dtype")),
                            key=lambda r: (order[r["mode"]], dtype_order[r["dtype"]]))
    per_mode = sorted(_group_summary(records, ("mode",)), key=lambda r: order[r["mode"]])
    overall = _group_summary([dict(r, all="all") for r in records], ("all",))
    return {"per_mode_dtype_layout": per_group, "per_mode_dtype": per_mode_dtype,
            "per_mode": per_mode, "overall": overall[0] if overall else None}


def _fmt_ms(v):
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _fmt_x(v):
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def _fmt_gbps(v):
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.1f}"


def case_label(r):
    return (f"{DTYPE_LABELS[r['dtype']]} {LAYOUT_LABELS[r['layout']]} "
            f"{'x'.join(map(str, r['shape']))}")


def _case_columns(meta):
    cols = [("mode", lambda r: r["mode"]), ("dtype", lambda r: DTYPE_LABELS[r["dtype"]]),
            ("layout", lambda r: LAYOUT_LABELS[r["layout"]]),
            ("shape", lambda r: "x".join(map(str, r["shape"]))),
            ("fused_bn ms", lambda r: _fmt_ms(r["fused_ms"])),
            ("eager ms", lambda r: _fmt_ms(r["eager_ms"])),
            ("compiled ms", lambda r: _fmt_ms(r["compiled_ms"])),
            ("vs eager", lambda r: _fmt_x(r["speedup_vs_eager"])),
            ("vs compiled", lambda r: _fmt_x(r["speedup_vs_compiled"])),
            ("fused GB/s", lambda r: _fmt_gbps(r["fused_gbps"]))]
    if meta.get("copy_bandwidth_gbps"):
        cols.append(("% copy BW", lambda r: "n/a" if r["fused_frac_copy_bw"] is None
                     else f"{100 * r['fused_frac_copy_bw']:.0f}%"))
        cols.append(("eager backend", lambda r: r["eager_backend"]))
    cols.append(("note", lambda r: "; ".join(r["notes"])))
    return cols


def _summary_columns():
    return [("mode", lambda r: r["mode"]),
            ("dtype", lambda r: DTYPE_LABELS.get(r.get("dtype"), r.get("dtype", "all"))),
            ("layout", lambda r: LAYOUT_LABELS.get(r.get("layout"), r.get("layout", "all"))),
            ("cases", lambda r: str(r["cases"])),
            ("geomean vs eager", lambda r: _fmt_x(r["geomean_vs_eager"])),
            ("geomean vs compiled", lambda r: _fmt_x(r["geomean_vs_compiled"])),
            (f"slower than eager (<{SLOWER_THAN:g}x)", lambda r: str(r["slower_than_eager"])),
            (f"slower than compiled (<{SLOWER_THAN:g}x)",
             lambda r: str(r["slower_than_compiled"]))]


def _summary_rows(summary):
    rows = list(summary["per_mode_dtype_layout"])
    rows += [dict(r, layout="all") for r in summary.get("per_mode_dtype", [])]
    rows += [dict(r, dtype="all", layout="all") for r in summary["per_mode"]]
    if summary["overall"]:
        rows.append(dict(summary["overall"], mode="all", dtype="all", layout="all"))
    return rows


def _text_table(columns, rows):
    cells = [[fn(r) for _, fn in columns] for r in rows]
    widths = [max([len(name)] + [len(c[i]) for c in cells]) for i, (name, _) in enumerate(columns)]
    lines = ["  ".join(name.rjust(w) for (name, _), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _markdown_table(columns, rows):
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fn(r) for _, fn in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_cases_table(records, meta):
    return _text_table(_case_columns(meta), records)


def format_summary_table(summary):
    return _text_table(_summary_columns(), _summary_rows(summary))


def headline(summary):
    fb = next((r for r in summary["per_mode"] if r["mode"] == "train_fwd_bwd"), None)
    if fb is None:
        return "no training forward+backward cases"
    text = (f"training forward+backward, geomean over {fb['cases']} cases: fused_bn is "
            f"{_fmt_x(fb['geomean_vs_eager'])} nn eager and {_fmt_x(fb['geomean_vs_compiled'])} "
            "torch.compile (higher is better)")
    fp32 = next((r for r in summary.get("per_mode_dtype", [])
                 if r["mode"] == "train_fwd_bwd" and r["dtype"] == "float32"), None)
    if fp32 is not None:
        text += (f"; float32 alone, both layouts ({fp32['cases']} cases): "
                 f"{_fmt_x(fp32['geomean_vs_eager'])} eager, {_fmt_x(fp32['geomean_vs_compiled'])} compiled")
    return text


def write_json(path, meta, parity, records, summary):
    with open(path, "w") as f:
        json.dump({"meta": meta, "parity": parity, "summary": summary, "cases": records}, f,
                  indent=1, allow_nan=True)


def bandwidth_text(bw):
    """A timing.cpu_memory_bandwidth_gbps() result in words."""
    return (f"read {bw['read']:.0f} GB/s, copy {bw['copy']:.0f} GB/s "
            f"({bw['bytes'] >> 20} MiB, read + write for the copy)")


def write_markdown(path, meta, parity, records, summary):
    copy_bw = meta.get("copy_bandwidth_gbps")
    lines = [
        f"# fused_bn benchmark: {meta['device_name']}",
        "",
        f"- device: {meta['device_description']}; threads: {meta['num_threads']}",
        f"- torch {meta['torch_version']}, CUDA {meta['cuda_version'] or 'n/a'}, "
        f"fused_bn {meta['fused_bn_version']}, commit `{meta['git_commit']}`"
        + (" (uncommitted changes)" if meta.get("git_dirty") else ""),
        f"- date: {meta['date']}; run took {meta['run_seconds']:.0f} s; timer: {meta['timer']}",
    ]
    if meta.get("memory_bandwidth_start"):
        start, end = meta["memory_bandwidth_start"], meta.get("memory_bandwidth_end") or {}
        lines.append(f"- memory bandwidth, the run's threads: {bandwidth_text(start)} at the start"
                     + (f"; {bandwidth_text(end)} at the end" if end else "")
                     + " (this shared VM's bandwidth moves about 2x over hours; the memory-bound "
                       "cases move with it)")
    lines += [
        f"- parity: **{'SKIPPED' if parity.get('skipped') else 'PASS' if parity['passed'] else 'FAIL'}**"
        f" ({parity['rule']})",
        f"- bytes model for GB/s: {BYTES_MODEL}",
    ]
    if copy_bw:
        lines.append(f"- measured device-to-device copy bandwidth: {copy_bw:.0f} GB/s "
                     "(bytes read + written)")
    lines += ["- speedup = other implementation's median time / fused_bn's (higher is better)",
              "", f"**{headline(summary)}**", "", "## Summary (geometric means)", "",
              _markdown_table(_summary_columns(), _summary_rows(summary)), "",
              "## All cases (median ms)", "", _markdown_table(_case_columns(meta), records), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# The generated tables live in docs/benchmarks.md (the README links to it),
# each between ``<!-- name -->`` and ``<!-- /name -->`` markers; links in them
# are relative to docs/.
BENCH_TABLE_MARKER = "<!-- bench-table -->"
BENCHMARKS_DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                                   "benchmarks.md")
RESULTS_LINK = "../bench/results"


def replace_doc_block(doc_path, marker, block):
    """Replaces what lies between ``<!-- marker -->`` and ``<!-- /marker -->`` in
    ``doc_path`` (docs/benchmarks.md) with ``block``. Returns False when the file
    or the markers are missing."""
    if not os.path.exists(doc_path):
        return False
    with open(doc_path) as f:
        text = f.read()
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if begin not in text or end not in text:
        return False
    text = text[:text.index(begin) + len(begin)] + "\n" + block + "\n" + text[text.index(end):]
    with open(doc_path, "w") as f:
        f.write(text)
    return True


def benchmarks_doc_section(meta, summary, md_name):
    """docs/benchmarks.md's summary block for one device, between markers named after it."""
    name = meta["device_name"]
    lines = [
        f"<!-- bench:{name} -->",
        f"**{meta['device_description']}**, torch {meta['torch_version']}, commit "
        f"`{meta['git_commit'][:12]}`, {meta['date'][:10]}; full table: "
        f"[`bench/results/{md_name}`]({RESULTS_LINK}/{md_name}).",
        "",
        f"{headline(summary)}.",
        "",
        _markdown_table(_summary_columns(), _summary_rows(summary)),
        f"<!-- /bench:{name} -->",
    ]
    return "\n".join(lines)


def update_benchmarks_doc(doc_path, meta, summary, md_name):
    """Replaces this device's block in docs/benchmarks.md (or adds it after
    BENCH_TABLE_MARKER). Returns False when the file has no marker."""
    if not os.path.exists(doc_path):
        return False
    with open(doc_path) as f:
        text = f.read()
    block = benchmarks_doc_section(meta, summary, md_name)
    begin, end = f"<!-- bench:{meta['device_name']} -->", f"<!-- /bench:{meta['device_name']} -->"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    elif BENCH_TABLE_MARKER in text:
        text = text.replace(BENCH_TABLE_MARKER, BENCH_TABLE_MARKER + "\n\n" + block, 1)
    else:
        return False
    with open(doc_path, "w") as f:
        f.write(text)
    return True


def write_plot(path, meta, records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    per_mode = max(sum(1 for r in records if r["mode"] == m) for m in modes)
    width = max(10.0, 0.32 * per_mode + 2)
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.6 * len(modes)), squeeze=False)
    all_speedups = [r[k] for r in records for k in ("speedup_vs_eager", "speedup_vs_compiled")
                    if r[k] and math.isfinite(r[k])]
    # Symmetric log2 range around 1x, so "2x faster" and "2x slower" look equally big.
    span = max([1.0] + [abs(math.log2(v)) for v in all_speedups]) + 0.6
    ticks = [2.0 ** k for k in range(-math.ceil(span), math.ceil(span) + 1)
             if abs(k) <= span]
    bar = 0.4
    for ax, mode in zip(axes[:, 0], modes):
        rs = [r for r in records if r["mode"] == mode]
        xs = range(len(rs))
        for offset, key, label, color in ((-bar / 2, "speedup_vs_eager", IMPL_LABELS["eager"],
                                           "tab:blue"),
                                          (bar / 2, "speedup_vs_compiled",
                                           IMPL_LABELS["compiled"], "tab:orange")):
            values = [r[key] if r[key] and math.isfinite(r[key]) else 1.0 for r in rs]
            # Bars grow from 1x: up when fused_bn is faster, down when slower.
            ax.bar([x + offset for x in xs], [v - 1 for v in values], bar, bottom=1.0,
                   label=f"vs {label}", color=color)
            if len(rs) <= 48:
                for x, v in zip(xs, values):
                    ax.annotate(f"{v:.2f}", (x + offset, v), ha="center", fontsize=6,
                                va="bottom" if v >= 1 else "top",
                                xytext=(0, 1 if v >= 1 else -1), textcoords="offset points")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)
        ax.set_ylim(2 ** -span, 2 ** span)
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.set_ylabel("fused_bn speedup")
        ax.set_title(f"{MODE_LABELS[mode]}: other's time / fused_bn's (above 1x: fused_bn "
                     "faster)", fontsize=10)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([case_label(r) for r in rs], rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(rs) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    # One legend for all panels, above them, where it cannot hide a bar.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(f"fused_bn speedup, {meta['device_name']} "
                 f"(torch {meta['torch_version']}, commit {meta['git_commit'][:10]})", fontsize=11,
                 x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir, stem, meta, parity, records, summary):
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    write_json(paths["json"], meta, parity, records, summary)
    write_markdown(paths["md"], meta, parity, records, summary)
    write_plot(paths["png"], meta, records)
    return paths
