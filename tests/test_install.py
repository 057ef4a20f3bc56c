"""Both an editable install and a built wheel provide flash_fx, flash_fx.patterns and flash_fx.kernels
(and never the generic top-level names `patterns` or `kernels`)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib.util, sys
import flash_fx, flash_fx.patterns, flash_fx.kernels
assert importlib.util.find_spec("patterns") is None and importlib.util.find_spec("kernels") is None
print(flash_fx.__file__, flash_fx.patterns.__file__, flash_fx.kernels.__file__)
"""


def run_check(env_path: str | None, cwd: Path) -> str:
    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_installed_package_imports(tmp_path):
    # Run from an unrelated directory so the repository root is not on sys.path.
    paths = run_check(None, tmp_path).split()
    assert paths[1].endswith(os.path.join("patterns", "__init__.py"))
    assert paths[2].endswith(os.path.join("kernels", "__init__.py"))


def test_built_wheel_imports(tmp_path):
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("flash_fx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "flash_fx/patterns/match.py" in names and "flash_fx/kernels/__init__.py" in names
    assert "flash_fx/bench/__main__.py" in names and "flash_fx/patterns/positions.py" in names
    assert not any(name.startswith(("patterns/", "kernels/")) for name in names)
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    paths = run_check(str(target), tmp_path).split()
    assert all(path.startswith(str(target)) for path in paths), paths
    entry_points = next(target.glob("flash_fx-*.dist-info")) / "entry_points.txt"
    assert "[torch_dynamo_backends]" in entry_points.read_text()
