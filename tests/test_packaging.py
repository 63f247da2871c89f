"""A newcomer's set-up: the checkout named as users clone it, and dimba_core installed as a package."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the working tree in a folder named as the README clones it, with ../shared beside it."""
    root = tmp_path_factory.mktemp("clone")
    checkout = root / "ComfyUI-Dimba"
    for path in tracked_files():
        target = checkout / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED, target_is_directory=True)
    return checkout


def test_readme_test_command_runs_in_a_checkout_named_comfyui_dimba(checkout):
    """The README says `git clone ... ComfyUI-Dimba`; a folder name that is no Python identifier must work."""
    command = re.search(r"^    (python -m pytest tests\S*.*)$", README, re.M).group(1).split()
    collected = subprocess.run([sys.executable, *command[1:], "-p", "no:cacheprovider", "--collect-only"],
                               cwd=checkout, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0 and " error" not in collected.stdout, collected.stdout[-3000:]
    part = subprocess.run([sys.executable, "-m", "pytest", "tests/test_model.py", "-q", "-p", "no:cacheprovider"],
                          cwd=checkout, capture_output=True, text=True, timeout=600)
    assert part.returncode == 0 and "passed" in part.stdout, part.stdout[-3000:]


@pytest.fixture(scope="module")
def installed(checkout, tmp_path_factory):
    """`pip install .` (of the copy: pip builds in the source folder) into a folder of its own, no dependencies."""
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--target", str(target), str(checkout)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode and "setuptools" in r.stderr and "No module named" in r.stderr:
        pytest.skip("setuptools is not installed here")
    assert r.returncode == 0, r.stderr[-3000:]
    return target


def outside(installed, tmp_path, *args, timeout=300):
    """Run python in an empty folder with only the installed copy of dimba_core importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_pip_install_gives_the_package_and_nothing_of_the_comfyui_pack(installed, tmp_path):
    assert (installed / "dimba_core" / "ops" / "__init__.py").is_file()
    assert (installed / "dimba_core" / "train").is_dir()
    assert not (installed / "nodes").exists() and not (installed / "tests").exists()
    r = outside(installed, tmp_path, "-c", "import dimba_core; print(dimba_core.__file__)")
    assert r.returncode == 0 and r.stdout.startswith(str(installed)), r.stderr
    r = outside(installed, tmp_path, "-m", "dimba_core", "--help")
    assert r.returncode == 0 and "generate" in r.stdout


def test_readme_example_and_try_it_from_any_folder(installed, tmp_path):
    """The README's Python example, and the try-it commands exactly as printed, outside the checkout."""
    example = re.search(r"## Python example\s+```python\n(.*?)```", README, re.S).group(1)
    (tmp_path / "example.py").write_text(example, encoding="utf-8")
    r = outside(installed, tmp_path, "example.py")
    assert r.returncode == 0 and "torch.Size([2, 8, 64, 64])" in r.stdout, r.stderr[-3000:]

    pytest.importorskip("diffusers")
    block = re.search(r"### Try it.*?```sh\n(.*?)```", README, re.S).group(1)
    for line in block.strip().splitlines():
        words = shlex.split(line)
        assert words[:2] == ["python", "-m"], line
        r = outside(installed, tmp_path, *words[1:], timeout=600)
        assert r.returncode == 0, (line, r.stderr[-3000:])
    assert list((tmp_path / "out").glob("*.png"))
