"""The PNG figures of BENCHMARKS.md (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def forward(rows: list[dict], path: Path) -> None:
    plt = _plt()
    labels = sorted({f"{r['model']}.{r['graph']}" for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.4
    for k, batch in enumerate(sorted({r["batch"] for r in rows})):
        ratio = {f"{r['model']}.{r['graph']}": r["speedup"] for r in rows if r["batch"] == batch}
        ax.bar([i + k * width for i in range(len(labels))], [ratio[name] for name in labels], width,
               label=f"batch {batch}")
    ax.axhline(1.5, color="red", linestyle="--", linewidth=1, label="target 1.5x")
    ax.set_xticks([i + width / 2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("onnxruntime speed-up over PyTorch eager")
    ax.set_title("Case 1: one forward pass per graph (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def serving(rows: list[dict], path: Path) -> None:
    """Requests/s and p99 against clients, one row of panels per model, a line per server and protocol (rows of
    results that predate the model and protocol columns: one model, REST in the server's name)."""
    plt = _plt()
    rows = [{**r, "model": r.get("model", ""), "protocol": r.get("protocol", "")} for r in rows
            if r["throughput"] > 0 and r.get("p99_ms") is not None and r["p99_ms"] == r["p99_ms"]]  # not NaN
    models = list(dict.fromkeys(r["model"] for r in rows))
    colour = {server: f"C{i % 10}" for i, server in enumerate(dict.fromkeys(
        r["server"].removesuffix(" (REST)") for r in rows))}  # one colour per server, both protocols
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for (a, b), model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        for server, protocol in dict.fromkeys((r["server"], r["protocol"]) for r in mine):
            pts = sorted((r["concurrency"], r["throughput"], r["p99_ms"]) for r in mine
                         if (r["server"], r["protocol"]) == (server, protocol))
            style = "--" if "REST" in server or protocol == "REST" else "-"
            label = f"{server}, {protocol}" if protocol else server
            c = colour[server.removesuffix(" (REST)")]
            a.plot([p[0] for p in pts], [p[1] for p in pts], style, color=c, marker="o", label=label)
            b.plot([p[0] for p in pts], [p[2] for p in pts], style, color=c, marker="o", label=label)
        for ax, ylabel in ((a, "requests / s"), (b, "p99 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylabel)
            if model:
                ax.set_title(model, fontsize=9)
        b.set_yscale("log")
        a.legend(fontsize=6)
    fig.suptitle("Case 2: serving over gRPC (solid) and REST (dashed), CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diffusion(result: dict, path: Path) -> None:
    plt = _plt()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r["side"] for r in rows], [r["images_per_s"] for r in rows], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel(f"images / s ({result['requests']} requests x {result['steps']} DDIM steps)")
    ax.set_title("Case 3: diffusion sampling (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roofline(result: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    names = ["numpy MatMul", "onnxruntime MatMul", f"iteration graph, {result['batch']} rows"]
    values = [result["peak"]["numpy_gflops"], result["peak"]["onnxruntime_gflops"], result["achieved_gflops"]]
    ax.barh(names, values, color=["grey", "grey", "tab:green"])
    ax.axvline(0.5 * result["peak_gflops"], color="red", linestyle="--", linewidth=1, label="50% of peak")
    ax.set_xlabel("GFLOP/s (float32)")
    ax.set_title("Case 4: achieved vs measured matrix-multiply peak")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
