"""Reports: a Markdown file plus PNG plots (matplotlib, Agg backend) in `--report-dir`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kvserve.bench.machine import describe

logger = logging.getLogger(__name__)

MATPLOTLIB_HINT = "the report needs matplotlib: pip install 'kvserve[bench]' (or: pip install matplotlib)"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(MATPLOTLIB_HINT) from None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_engines(rows: list[dict], key: str, label: str, path: Path) -> None:
    plt = _plt()
    good = [r for r in rows if key in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [f"{r['engine']}\n{r.get('mode', '')}".strip() for r in good]
    ax.barh(names, [r[key] for r in good], color="tab:blue")
    ax.set(xlabel=label, title=label)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_timeline(timeline: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    t = [s["t"] for s in timeline]
    usage = [s.get("kv_usage", 0.0) * 100 for s in timeline]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a1.plot(t, usage, color="tab:purple", lw=1.2)
    # zoom on small usage (a tiny model in a large pool) but never past 100%
    a1.set(ylabel="KV cache used (%)", title=title, ylim=(0, min(105.0, max(1.0, max(usage, default=0.0) * 1.3))))
    a2.plot(t, [s.get("num_running", 0) for s in timeline], label="running", lw=1.2)
    a2.plot(t, [s.get("num_waiting", 0) for s in timeline], label="waiting", lw=1.2)
    a2.set(xlabel="time (s)", ylabel="requests")
    a2.legend()
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_serve(levels: list[dict], path_tp: Path, path_dist: Path) -> None:
    """Output tok/s per load level, and TTFT / TPOT histograms per level."""
    plt = _plt()
    ok = [lv for lv in levels if "output_tok_s" in lv]
    plot_distributions(ok, path_dist)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [lv["label"] for lv in ok]
    ax.plot(x, [lv["output_tok_s"] for lv in ok], marker="o", label="output tok/s")
    ax.set(xlabel="concurrency / request rate", ylabel="output tok/s", title="throughput vs load")
    ax.grid(alpha=0.3)
    lat = ax.twinx()  # what the throughput costs each request
    lat.plot(x, [lv.get("ttft_ms", {}).get("p99", float("nan")) for lv in ok], marker="s", ls="--", color="tab:red",
             label="TTFT p99 (ms)")
    lat.plot(x, [lv.get("tpot_ms", {}).get("p50", float("nan")) for lv in ok], marker="^", ls=":", color="tab:green",
             label="TPOT p50 (ms)")
    lat.set(ylabel="ms")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = lat.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path_tp, dpi=90)
    plt.close(fig)


def plot_distributions(ok: list[dict], path_dist: Path) -> None:
    """Histograms of `samples["ttft_ms"]` and `samples["tpot_ms"]`, one series per entry."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
        for lv in ok:
            xs = lv.get("samples", {}).get(key, [])
            if xs:
                ax.hist(xs, bins=30, alpha=0.5, label=str(lv["label"]))
        ax.set(xlabel=f"{key[:-3].upper()} (ms)", ylabel="requests", title=f"{key[:-3].upper()} distribution")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_dist, dpi=90)
    plt.close(fig)


def plot_prefix(rows: list[dict], path: Path) -> None:
    plt = _plt()
    ok = [r for r in rows if "output_tok_s" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["mode"] for r in ok]
    a1.bar(names, [r["duration_s"] for r in ok], color=["tab:blue", "tab:gray"][:len(ok)])
    a1.set(ylabel="seconds", title="time for the request set")
    a2.bar(names, [r.get("prefix_hit_rate", 0.0) * 100 for r in ok], color="tab:green")
    a2.set(ylabel="prompt tokens from cache (%)", title="prefix-cache hit rate", ylim=(0, 100))
    for ax in (a1, a2):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report_dir: str | Path, command: str, machine: dict, settings: dict, rows: list[dict],
                 columns: list[str], plots: dict[str, str], notes: list[str] | None = None) -> Path:
    """Markdown next to already-written PNGs (`plots`: caption -> file name)."""
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    md = [f"# kvserve bench {command}", "", f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
          f"- machine: {describe(machine)}", f"- settings: `{settings}`", ""]
    if columns:
        md += [_table(rows, columns), ""]
    for r in rows:  # failed peers: reported, never dropped
        if "error" in r:
            md.append(f"- {r.get('engine', '?')} {r.get('mode', '')}: error: {r['error']}")
    for n in notes or []:
        md.append(f"- {n}")
    for caption, name in plots.items():
        md += ["", f"## {caption}", "", f"![{caption}]({name})"]
    path = d / "report.md"
    path.write_text("\n".join(md) + "\n")
    logger.info("report written to %s", path)
    return path
