"""Developer sessions. `nox -s tests` is what CI and the README run.

The extension is built once per session as a release wheel in `dist/` (cargo skips the
work when nothing changed) and installed like a user would install it; the tests then run
against the installed wheel, not the source tree.
"""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = [
    "pytest>=8",
    "pytest-asyncio>=0.23",
    "hypothesis>=6",
    "redis>=5",
    "pydantic>=2",
    # The web integrations, their test clients, and real servers for the examples.
    "flask>=2.2",
    "fastapi>=0.100",
    "httpx",
    "httpx2",
    "gunicorn",
    "uvicorn",
    "prometheus_client",
    "opentelemetry-sdk",
]


def install_wheel(session: nox.Session) -> None:
    """Builds the release wheel (once; cargo reuses its build) and installs it."""
    shutil.rmtree("dist", ignore_errors=True)
    session.install("maturin>=1.8,<2")
    session.run("maturin", "build", "--release", "--out", "dist", external=False)
    wheels = glob.glob("dist/tenuto-*.whl")
    if len(wheels) != 1:
        session.error(f"expected one wheel in dist/, found {wheels}")
    session.install("--force-reinstall", "--no-deps", wheels[0])


# Peer libraries the benchmarks measure tenuto against, in the same run.
PEERS = [
    "cachebox",
    "moka-py",
    "cachetools",
    "dogpile.cache",
    "Flask-Caching",
    "fastapi-cache2",
    "aiocache",
    "cashews",
    "limits",
    "pyrate-limiter",
    "aiolimiter",
    "orjson",
    "prometheus_client",
    # The upstream client's peers, and the server its benchmark calls.
    "aiohttp",
    "httpx",
    "requests",
    "uvicorn",
    # The chart of bench/results/latest.png.
    "matplotlib",
]


@nox.session
def tests(session: nox.Session) -> None:
    """Rust unit tests, then the Python suite against the installed wheel."""
    session.run("cargo", "test", "--no-default-features", "--quiet", external=True)
    install_wheel(session)
    session.install(*TEST_DEPS)
    # python/ is not on sys.path here, so `import tenuto` is the installed wheel.
    session.run("pytest", "-q", *session.posargs, env={"PYTHONDONTWRITEBYTECODE": "1"})


# The soak: the fault suite's load tests with twice the clients (each at half the pace,
# so the apps are not CPU-bound on a 2-core machine), 4 s outages and three kill/pause
# rounds. Any TENUTO_CHAOS_* variable set in the environment wins (see tests/chaos.py).
# The latency margin over the command timeout is 250 ms, not 100: with 40 connections
# one uvicorn event loop on a shared 2-core machine queued requests for up to 230 ms
# (p99) while neighbours compiled, faults or not, and a paused request took +177 ms.
CHAOS_SOAK = {
    "TENUTO_CHAOS_CLIENTS": "40",
    "TENUTO_CHAOS_PACE": "0.1",
    "TENUTO_CHAOS_OUTAGE": "4",
    "TENUTO_CHAOS_ROUNDS": "3",
    "TENUTO_CHAOS_STEADY": "1",
    "TENUTO_CHAOS_LOAD": "8",
    "TENUTO_CHAOS_MARGIN": "0.25",
}


@nox.session
def chaos(session: nox.Session) -> None:
    """The fault suite as a soak: Redis killed, restarted, paused, full and evicting
    under a longer load through gunicorn and uvicorn; prints what each run counted."""
    install_wheel(session)
    session.install(*TEST_DEPS)
    env = {**CHAOS_SOAK, "PYTHONDONTWRITEBYTECODE": "1"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("TENUTO_CHAOS_")})
    session.run(
        "pytest", "-q", "-s", "tests/test_chaos.py", "-k", "under_load", *session.posargs, env=env
    )


@nox.session
def lint(session: nox.Session) -> None:
    """clippy, rustfmt, ruff, and the type stubs checked against the built module."""
    session.run("cargo", "fmt", "--check", external=True)
    session.run("cargo", "clippy", "--all-targets", "--", "-D", "warnings", external=True)
    session.run(
        "cargo",
        "clippy",
        "--all-targets",
        "--no-default-features",
        "--",
        "-D",
        "warnings",
        external=True,
    )
    session.install("ruff", "mypy")
    session.run("ruff", "check", "python", "tests", "noxfile.py", "benches", "examples")
    session.run("ruff", "format", "--check", "python", "tests", "noxfile.py", "benches", "examples")
    install_wheel(session)
    session.install(*TEST_DEPS)
    session.run(
        "python", "-m", "mypy.stubtest", "tenuto._core", "--allowlist", "stubtest-allowlist.txt"
    )
    session.run("mypy", "--strict", "tests/typing_check.py")


# The oldest and newest CPython the wheel is tested on (pyenv's, when present).
WHEEL_PYTHONS = ["3.9", "3.13"]


def _pyenv_python(version: str) -> str | None:
    root = os.path.expanduser("~/.pyenv/versions")
    found = sorted(glob.glob(os.path.join(root, f"{version}.*", "bin", "python3")))
    return found[-1] if found else shutil.which(f"python{version}")


@nox.session
def wheels(session: nox.Session) -> None:
    """One abi3 wheel (CPython 3.9+) that is manylinux2014 compliant, built with zig, and
    an sdist; then the wheel installed into fresh venvs of the oldest and newest CPython,
    with no Rust on PATH, and the test suite run against it."""
    out = "dist/wheels"
    shutil.rmtree(out, ignore_errors=True)
    session.install("maturin>=1.8,<2", "ziglang", "auditwheel")
    session.run(
        "maturin", "build", "--release", "--zig", "--compatibility", "manylinux2014",
        "--features", "abi3", "--out", out,
    )  # fmt: skip
    session.run("maturin", "sdist", "--out", out)
    wheel = glob.glob(f"{out}/tenuto-*abi3*manylinux*.whl")
    if len(wheel) != 1:
        session.error(f"expected one abi3 manylinux wheel in {out}, found {wheel}")
    session.run("auditwheel", "show", wheel[0])
    cargo_dirs = {os.path.dirname(p) for p in [shutil.which("cargo"), shutil.which("rustc")] if p}
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if p and p not in cargo_dirs
    )
    for version in WHEEL_PYTHONS:
        python = _pyenv_python(version)
        if python is None:
            session.error(f"no CPython {version} found to test the wheel on")
        venv = f".nox/wheel-{version}"
        shutil.rmtree(venv, ignore_errors=True)
        session.run(python, "-m", "venv", venv, external=True)
        pip = os.path.join(venv, "bin", "pip")
        session.run(pip, "install", "-q", wheel[0], *TEST_DEPS, external=True, env={"PATH": path})
        session.run(
            os.path.join(venv, "bin", "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
            *session.posargs, external=True,
            env={"PATH": path, "PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip


@nox.session
def demo(session: nox.Session) -> None:
    """The README's demo on the embedded memory backend (REDIS_URL set: on Redis)."""
    install_wheel(session)
    session.install("flask>=2.2", "fastapi>=0.100", "uvicorn", "httpx")  # the [demo] extra
    session.run("python", "examples/demo.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against peers and lower bounds in one run; prints ratios."""
    install_wheel(session)
    session.install("redis>=5", *PEERS)
    # Every benchmark in one run, recorded in bench/results/latest.md and latest.png.
    session.run("python", "benches/report.py", *session.posargs)
