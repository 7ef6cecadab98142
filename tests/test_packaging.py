"""The built wheel (what the images install) carries the presets and DeepSpeed configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_presets_and_deepspeed_configs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("refine_af-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (REPO / "refine_af" / "presets").glob("*.yaml")}
    assert "local-cpu.yaml" in presets
    for name in presets:
        assert f"refine_af/presets/{name}" in names
    assert "refine_af/presets/deepspeed/zero2.json" in names
    assert not any(name.startswith("configs/") for name in names)


def test_configs_is_a_link_to_the_packaged_presets():
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == (REPO / "refine_af" / "presets").resolve()
    assert not (REPO / "refine_af" / "presets").is_symlink()
