"""The benchmark's Markdown table and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROLES = ("frontends", "broker", "worker", "iobatcher", "workers", "master", "mosec-http", "nginx", "litserve", "ray")


def reference_batch(cell: dict[str, Any]) -> int:
    """The in-process batch size a cell is compared with: the request's own rows, or for
    one-instance requests the batch their concurrency can form (at most 64 rows)."""
    return cell["instances"] if cell["instances"] > 1 else min(cell["concurrency"], 64)


def enrich(results: dict[str, Any]) -> list[dict[str, Any]]:
    inprocess = {row["batch_size"]: row for row in results["inprocess"]}
    cells = results["cells"]
    for cell in cells:
        cell["rps"] = cell["requests"] / cell["duration_s"]
        cell["samples_per_s"] = cell["rps"] * cell["instances"]
    for peer, key in (("naive-2", "x_naive2"), ("mosec", "x_mosec"), ("mosec-orjson", "x_mosec_orjson")):
        base = {(c["instances"], c["concurrency"]): c["rps"] for c in cells if c["server"] == peer}
        for cell in cells:
            reference = base.get((cell["instances"], cell["concurrency"]))
            cell[key] = cell["rps"] / reference if reference else None
    for cell in cells:
        limit = inprocess.get(reference_batch(cell))
        cell["x_inprocess"] = cell["samples_per_s"] / limit["samples_per_s"] if limit else None
    return cells


def markdown(results: dict[str, Any]) -> str:
    cells = enrich(results)
    lines = ["## In-process limit (serving signature called directly)", "",
             "| batch | samples/s | latency p50 ms | CPU ms/sample |", "| ---: | ---: | ---: | ---: |"]
    for row in results["inprocess"]:
        lines.append(f"| {row['batch_size']} | {row['samples_per_s']:.0f} | {row['latency_p50_ms']:.2f} | "
                     f"{row['cpu_ms_per_sample']:.3f} |")
    lines += ["", f"## Served ({results['duration_s']:.0f} s per cell, median of {results.get('repeat', 1)} run(s), "
              f"{results['cpus']} CPUs, load from wrk -t1 or bench.client_load, closed loop)", "",
              "| server | inst/req | conc | req/s | samples/s | p50 ms | p99 ms | errors | PSS MB | "
              "CPU ms/req by role | load gen CPU ms/req | host busy | mean batch | × naive-2 | × mosec | × mosec-orjson | "
              "× in-process |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: |"]
    for c in cells:
        roles = ", ".join(f"{r} {c['cpu_ms_per_request'][r]:.3f}" for r in ROLES if r in c["cpu_ms_per_request"])
        errors = c["errors"] + c.get("wrong", 0)
        lines.append(
            f"| {c['server']} | {c['instances']} | {c['concurrency']} | {c['rps']:.0f} | {c['samples_per_s']:.0f} | "
            f"{c['p50_ms']:.2f} | {c['p99_ms']:.2f} | {errors} | {c['pss_mb']:.0f} | {roles} | "
            f"{c['load_cpu_s'] * 1000 / max(1, c['requests']):.3f} | {_fmt(_percent(c.get('host_busy')), '.0f')} | "
            f"{_fmt(c.get('mean_batch_rows'), '.1f')} | {_fmt(c['x_naive2'], '.2f')} | {_fmt(c['x_mosec'], '.2f')} | "
            f"{_fmt(c['x_mosec_orjson'], '.2f')} | {_fmt(c['x_inprocess'], '.2f')} |")
    lines += ["", "× in-process compares samples/s with the in-process limit at the request's own batch size "
              "(one-instance requests: min(concurrency, 64)). Errors count non-200 answers, socket errors and, "
              "for the client, answers that differ from in-process TensorFlow. Host busy: the share of all "
              "CPUs (%) not idle during the cell, load generator included; well under 100 % means the server "
              "left CPU unused while its requests waited (bound by its latency, not by CPU).", "",
              "## Memory (total PSS of the server's process tree after the load)", "",
              "| server | PSS MB |", "| --- | ---: |"]
    lines += [f"| {m['server']} | {m['pss_mb']:.0f} |" for m in results["memory"]]
    return "\n".join(lines) + "\n"


def _percent(share: float | None) -> float | None:
    return None if share is None else share * 100


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = enrich(results)
    servers = sorted({c["server"] for c in cells}, key=lambda s: (s.split("-")[0], s))
    for metric, label, filename in (("rps", "requests/s", "throughput.png"), ("p99_ms", "p99 latency (ms)", "latency.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, instances in zip(axes, (1, 32)):
            for server in servers:
                points = sorted((c["concurrency"], c[metric]) for c in cells
                                if c["server"] == server and c["instances"] == instances)
                if points:
                    ax.plot(*zip(*points), marker="o", label=server)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.set_title(f"{instances} instance(s) per request")
            ax.grid(alpha=0.3)
            if metric == "p99_ms":
                ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("naive", "tfbroker"):
        points = sorted((int(m["server"].split("-")[1]), m["pss_mb"]) for m in results["memory"]
                        if m["server"].startswith(kind + "-") and m["server"].split("-")[1].isdigit())
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{kind} ({'workers' if kind == 'naive' else 'frontends'})")
    ax.set_xlabel("HTTP processes")
    ax.set_ylabel("total PSS (MB)")
    ax.set_title("Memory against the number of HTTP processes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)
