#!/usr/bin/env python3
"""Loss curves of one run or several overlaid, as a PNG (matplotlib, headless).

    python3 tools/plot.py logs/<RUN_ID>.txt --out curves.png
    python3 tools/plot.py logs/a_seed*.txt logs/b_seed*.txt --labels a1,a2,a3,b1,b2,b3 --out compare.png

Four panels: train loss against step, train loss against training wallclock, val_bpb (the in-training
validation points as lines, and each scored pass of the artifact as a marker at the last step), and
training tokens/s against step. A run's label is its RUN_ID unless --labels gives one per log.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402

# Markers of the scored passes in the val_bpb panel (any other pass gets the default marker).
PASS_MARKERS = {"pre_quantization_post_ema": "o", "quantized": "s", "quantized_sliding_window": "^",
                "quantized_ttt_chunk": "*", "quantized_ttt_lora": "*"}


def figure(logs, labels=None):
    """The four-panel Figure of the parsed logs (tests inspect its axes)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on the training machines
    import matplotlib.pyplot as plt

    labels = labels or [log.run_id or Path(log.path or "run").stem for log in logs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    by_step, by_time, bpb, speed = axes.flat
    for i, (log, label) in enumerate(zip(logs, labels)):
        color = f"C{i % 10}"
        steps = [s.step for s in log.steps]
        by_step.plot(steps, [s.train_loss for s in log.steps], color=color, label=label)
        by_time.plot([s.train_time_ms / 1000 for s in log.steps], [s.train_loss for s in log.steps], color=color, label=label)
        speed.plot(steps, [s.tok_s for s in log.steps], color=color, label=label)
        if log.val_points:
            bpb.plot([v.step for v in log.val_points], [v.val_bpb for v in log.val_points], color=color, marker=".", label=label)
        last = log.steps_done or (log.val_points[-1].step if log.val_points else 0)
        for m in log.metrics.values():
            if m.name in ("final", "final_ttt"):  # the same figure as the pass behind it
                continue
            bpb.scatter([last], [m.val_bpb], color=color, marker=PASS_MARKERS.get(m.name, "x"),
                        label=f"{label} {m.name}" if len(logs) <= 3 else None, zorder=3)
    by_step.set(xlabel="step", ylabel="train loss (nats/token)", title="train loss by step")
    by_time.set(xlabel="training wallclock (s)", ylabel="train loss (nats/token)", title="train loss by wallclock")
    bpb.set(xlabel="step", ylabel="val_bpb", title="validation bpb (markers: passes on the artifact)")
    speed.set(xlabel="step", ylabel="tokens/s", title="training throughput")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(logs, out: Path, labels=None) -> Path:
    import matplotlib.pyplot as plt
    fig = figure(logs, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="run logs (logs/<RUN_ID>.txt)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--labels", help="comma-separated, one per log (default: each RUN_ID)")
    args = parser.parse_args(argv)
    for p in args.logs:
        if not p.is_file():
            sys.exit(f"error: log {p} does not exist")
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.logs):
        sys.exit(f"error: --labels has {len(labels)} names for {len(args.logs)} logs: give one per log")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("error: matplotlib is not installed: pip install -r requirements-test.txt")
    print(save([runlog.read_log(p) for p in args.logs], args.out, labels))


if __name__ == "__main__":
    main()
