"""Runs every benchmark in one go and records the run: `bench/results/latest.md` (date,
machine, versions, then each benchmark's table as printed, peers and bounds included) and
`bench/results/latest.png`, a chart of every row's ratio to its group's first row (the
lower bound or the reference peer), when matplotlib is installed.

Usage: python benches/report.py [--quick]   (what `nox -s bench` runs)
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
BENCHES = [
    "bench_cache.py",
    "bench_cached.py",
    "bench_registry.py",
    "bench_limits.py",
    "bench_engine.py",
    "bench_client.py",
]
# A printed row that ends in a ratio: "<label> <number> [unit] <ratio>x".
ROW = re.compile(
    r"^(?P<label>.*?\S)\s+[\d,.]+\s*(?:ns|µs|us|ms|/s|req/s)?\s+\|?\s*(?P<ratio>\d+(?:\.\d+)?)x\s*\|?$"
)


def machine() -> str:
    cpus = os.cpu_count()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{platform.system()} {platform.machine()}, {cpus} cores ({model})"


def versions() -> str:
    import tenuto

    rust = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    redis = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split(" sha=")[0]
    return f"tenuto {tenuto.__version__}, Python {sys.version.split()[0]}, {rust or 'rustc ?'}, {redis}"


def chart(rows: list[tuple[str, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [label[-60:] for label, _ in rows]
    ratios = [ratio for _, ratio in rows]
    height = max(4.0, 0.22 * len(rows))
    fig, ax = plt.subplots(figsize=(11, height))
    colors = ["#2a7" if "tenuto" in label.lower() else "#999" for label in labels]
    ax.barh(range(len(rows)), ratios, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.6)
    ax.set_xlabel("ratio to the group's first row (log scale; green: tenuto)")
    ax.set_title(f"tenuto benchmarks, {datetime.date.today().isoformat()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    args = sys.argv[1:]
    OUT.mkdir(parents=True, exist_ok=True)
    sections = []
    rows: list[tuple[str, float]] = []
    for bench in BENCHES:
        done = subprocess.run(
            [sys.executable, str(ROOT / "benches" / bench), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        text = done.stdout.strip() or "(no output)"
        if done.returncode != 0:
            text += f"\n\nexit {done.returncode}:\n{done.stderr.strip()[-2000:]}"
        print(text, flush=True)
        sections.append(f"## {bench}\n\n```\n{text}\n```\n")
        for line in done.stdout.splitlines():
            found = ROW.match(line.strip())
            if found:
                rows.append((f"{bench[6:-3]}: {found['label']}", float(found["ratio"])))
    header = (
        f"# Benchmark run of {datetime.datetime.now().isoformat(timespec='minutes')}\n\n"
        f"- Machine: {machine()}\n- Versions: {versions()}\n"
        f"- Command: `nox -s bench` (`python benches/report.py {' '.join(args)}`)\n"
        "- Each table: median per operation, and the ratio to its group's first row.\n"
    )
    drawn = chart(rows, OUT / "latest.png")
    if drawn:
        header += "\n![ratios](latest.png)\n"
    (OUT / "latest.md").write_text(header + "\n" + "\n".join(sections), encoding="utf-8")
    print(f"\nwrote {OUT / 'latest.md'}" + (f" and {OUT / 'latest.png'}" if drawn else ""))


if __name__ == "__main__":
    main()
