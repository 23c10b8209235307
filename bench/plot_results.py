"""Plot the engine bench's time ratios (ours vs plain PEFT) from bench/RESULTS.md.

Reads every line of RESULTS.md (or the files given) that is an `engine_bench.py
--json` object, keeps the first one per (size, device name) in document order
(RESULTS.md lists the run of record first), and draws one bar per engine and
run for prefill/decode x single/mixed4/mixed_all, on a log axis. GPU runs of record decode
through CUDA graphs (`"decode": "graphs"`, ours and the base model alike); for an older eager
run, diamonds add its `--cuda-graphs` per-step ratios (PEFT's mixed
decode on a GPU is 40x+). Horizontal ticks mark the issue's GPU targets; the
dashed line is 1.0 (the pure base model). A run of record made with --skip-peft shows
PEFT's bars from the first run of the same size and device that has them, labelled
"(earlier run)".

    python bench/plot_results.py                      # -> bench/ratios.png
    python bench/plot_results.py -o /tmp/r.png bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCEN = ["single", "mixed4", "mixed_all"]


def load_runs(paths: list[Path], marker: str = '"prefill_ratio_single"') -> list[dict]:
    """First JSON line per (size, device) holding `marker` (the `--cuda-graphs` lines hold
    '"graph_decode_ratio_single"' instead)."""
    runs, seen = [], set()
    for p in paths:
        for line in p.read_text().splitlines():
            line = line.strip()
            if not (line.startswith("{") and marker in line):
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = (r.get("size"), r.get("device_name", r.get("device")))
            if key in seen:
                continue
            seen.add(key)
            runs.append(r)
    return runs


def label(r: dict) -> str:
    dev = r.get("device_name", r.get("device", "?"))
    dev = {"cpu": "CPU"}.get(dev, dev.replace("NVIDIA ", "").replace(" 80GB HBM3", ""))
    return f"{r['size']} {r.get('dtype', '')} {dev} B={r['batch']}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", type=Path, default=[HERE / "RESULTS.md"])
    ap.add_argument("-o", "--output", type=Path, default=HERE / "ratios.png")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(args.inputs)
    graphs = load_runs(args.inputs, '"graph_decode_ratio_single"')
    graphs = [g for g in graphs if any((g["size"], g.get("device_name")) == (r["size"], r.get("device_name"))
                                       and r.get("decode", "generate") == "generate" for r in load_runs(args.inputs))]
    if not runs:
        raise SystemExit("no engine_bench JSON lines found")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    colors = plt.get_cmap("tab10")
    n = len(runs)
    width = 0.8 / (2 * n)
    # a run of record that skipped PEFT (--skip-peft) shows PEFT from the first run of the same
    # size and device that has it, labelled as such
    with_peft = {(r["size"], r.get("device_name", r.get("device"))): r
                 for r in reversed(load_runs(args.inputs, '"peft_prefill_ratio_single"'))}
    for ax, phase in zip(axes, ("prefill", "decode")):
        for i, r in enumerate(runs):
            for j, (pre, hatch) in enumerate((("", None), ("peft_", "//"))):
                src, note = r, ""
                if pre and f"{pre}{phase}_ratio_single" not in r:
                    src = with_peft.get((r["size"], r.get("device_name", r.get("device"))))
                    note = " (earlier run)"
                    if src is None:
                        continue
                vals = [src.get(f"{pre}{phase}_ratio_{sc}", float("nan")) for sc in SCEN]
                xs = [k + (2 * i + j - n + 0.5) * width for k in range(len(SCEN))]
                ax.bar(xs, vals, width, color=colors(i), hatch=hatch, edgecolor="black", linewidth=0.4,
                       label=f"{'PEFT' + note if pre else 'ours'}  {label(src)}")
            if phase == "decode" and r.get("decode", "generate") == "generate":
                # an eager-generate run: add ours with a captured CUDA graph per step (--cuda-graphs), if any
                gr = next((g for g in graphs if (g["size"], g.get("device_name")) == (r["size"], r.get("device_name"))), None)
                if gr is not None:
                    xs = [k + (2 * i - n + 0.5) * width for k in range(len(SCEN))]
                    ax.scatter(xs, [gr.get(f"graph_decode_ratio_{sc}", float("nan")) for sc in SCEN], marker="D",
                               s=22, color=colors(i), edgecolor="black", zorder=3,
                               label=f"ours, CUDA graph/step  {label(gr)}")
        # GPU targets (issue 6): prefill 1.15 everywhere; decode 1.05 / 1.15 / 1.1 x F (F per run)
        if phase == "prefill":
            targets = [(k, 1.15, "") for k in range(3)]
        else:
            targets = [(0, 1.05, ""), (1, 1.15, "")]
            targets += [(2, 1.1 * r["decode_floor_mixed_all"], "")
                        for r in runs if r.get("device") != "cpu" and "decode_floor_mixed_all" in r]
        for k, y, _ in targets:
            ax.hlines(y, k - 0.42, k + 0.42, colors="red", linewidth=1.2)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(SCEN)))
        ax.set_xticklabels(SCEN)
        ax.set_title(f"{phase}: time / pure base model")
        ax.grid(axis="y", which="both", alpha=0.25)
    axes[0].set_ylabel("ratio (log scale; red = GPU target)")
    handles, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    handles += [h for h, l in zip(h2, l2) if l not in labels]
    labels += [l for l in l2 if l not in labels]
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (n + len(graphs)), 1, 1))
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes) from {n} runs")


if __name__ == "__main__":
    main()
