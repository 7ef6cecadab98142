#!/usr/bin/env python3
"""Hash-pinned lock files for the images, one per flavour, generated from pyproject.toml.

Each image installs only from a wheelhouse filled from its lock (``pip install --no-index
--require-hashes``), so ``docker build`` needs no network. What a flavour resolves is
``[tool.refine-af.locks]`` in pyproject.toml; every lock records the sha256 of its
inputs, so ``tests/test_locks.py`` fails when pyproject.toml changes and a lock is stale.

    python scripts/lock.py            # rewrite images/locks/*.txt (needs uv and an index)
    python scripts/lock.py --check    # exit 1 when any lock is stale (no network)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK_DIR = ROOT / "images" / "locks"
INPUTS_LINE = "# inputs-sha256: "
PROJECT_REQ = re.compile(r"^refine-af(?:\[(?P<extras>[^\]]*)\])?$")
# Where torch's CPU build comes from when pip's config names no local wheel folder.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def flavours(pyproject: dict | None = None) -> dict[str, dict]:
    """``[tool.refine-af.locks]``: flavour -> {requirements, python, no_deps, torch}."""
    pyproject = pyproject or tomllib.loads(PYPROJECT.read_text())
    return pyproject["tool"]["refine-af"]["locks"]


def requirements(flavour: dict, pyproject: dict) -> list[str]:
    """The flavour's top-level requirements, ``refine-af[extras]`` expanded to its pins
    (the project itself is installed from its own wheel, built from the checkout)."""
    project = pyproject["project"]
    out: list[str] = []
    for req in flavour["requirements"]:
        match = PROJECT_REQ.match(req)
        if not match:
            out.append(req)
            continue
        out += project["dependencies"]
        for extra in filter(None, (match["extras"] or "").split(",")):
            out += project["optional-dependencies"][extra.strip()]
    if flavour.get("torch") == "cpu":
        out = [r + "+cpu" if r.startswith("torch==") else r for r in out]
    return out


def inputs_digest(name: str, pyproject: dict) -> str:
    """sha256 over everything that decides a flavour's lock."""
    flavour = flavours(pyproject)[name]
    payload = {"flavour": flavour, "requirements": requirements(flavour, pyproject)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def lock_path(name: str) -> Path:
    return LOCK_DIR / f"{name}.txt"


def recorded_digest(path: Path) -> str | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(INPUTS_LINE):
            return line.removeprefix(INPUTS_LINE).strip()
    return None


def stale(pyproject: dict | None = None) -> list[str]:
    """Flavours whose lock is missing or was made from other inputs."""
    pyproject = pyproject or tomllib.loads(PYPROJECT.read_text())
    return [
        name
        for name in flavours(pyproject)
        if recorded_digest(lock_path(name)) != inputs_digest(name, pyproject)
    ]


def pip_find_links() -> list[str]:
    """pip's configured find-links (where a local torch CPU wheel may lie)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.split() if out.returncode == 0 else []


def compile_lock(name: str, pyproject: dict, uv: str) -> None:
    flavour = flavours(pyproject)[name]
    reqs = requirements(flavour, pyproject)
    with tempfile.TemporaryDirectory() as tmp:
        infile = Path(tmp) / f"{name}.in"
        infile.write_text("\n".join(reqs) + "\n")
        outfile = Path(tmp) / f"{name}.txt"
        cmd = [uv, "pip", "compile", str(infile), "-o", str(outfile), "--quiet"]
        cmd += ["--generate-hashes", "--no-header", "--no-annotate"]
        cmd += ["--python-version", flavour["python"], "--python-platform", flavour["platform"]]
        if flavour.get("no_deps"):
            cmd.append("--no-deps")
        if flavour.get("torch") == "cpu":
            links = pip_find_links()
            if links:
                cmd += [arg for link in links for arg in ("--find-links", link)]
            else:
                cmd += ["--extra-index-url", TORCH_CPU_INDEX]
            cmd += ["--index-strategy", "unsafe-best-match"]
        subprocess.run(cmd, check=True)
        header = (
            f"# Lock {name} for the images, made by `make lock` (scripts/lock.py) from\n"
            f"# pyproject.toml [tool.refine-af.locks.{name}]: "
            f"python {flavour['python']}, {flavour['platform']}.\n"
            f"{INPUTS_LINE}{inputs_digest(name, pyproject)}\n"
        )
        lock_path(name).write_text(header + outfile.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale locks")
    parser.add_argument("--uv", default="uv", help="the uv executable (default: uv on PATH)")
    parser.add_argument("flavour", nargs="*", help="flavours to lock (default: all)")
    args = parser.parse_args()
    pyproject = tomllib.loads(PYPROJECT.read_text())
    if args.check:
        bad = stale(pyproject)
        for name in bad:
            print(
                f"stale lock: {lock_path(name).relative_to(ROOT)}; fix: make lock", file=sys.stderr
            )
        return 1 if bad else 0
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.flavour or flavours(pyproject):
        print(f"locking {name} ...", file=sys.stderr)
        compile_lock(name, pyproject, args.uv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
