"""The package as users install it: ``python -m build`` makes an sdist and,
from it, a wheel; the wheel installs into a fresh virtualenv with every C
part built; a machine without a compiler or the OpenSSL headers gets told
what to install.

Builds run without build isolation (setuptools and build come with the
test tools), so no test reaches for a package index.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed files alone, as a release would ship them (no build/ or .venv/)."""
    tree = tmp_path_factory.mktemp("source")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        target = tree / os.fsdecode(name)
        if (ROOT / os.fsdecode(name)).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / os.fsdecode(name)).read_bytes())
    return tree


def _build(tree: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )


def test_the_wheel_built_from_the_sdist_installs_into_a_fresh_virtualenv(
    source_tree: Path, tmp_path: Path
) -> None:
    built = _build(source_tree, tmp_path / "dist")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert sdist.stat().st_size and wheel.stat().st_size

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
        check=True,
    )
    installed = Path(
        subprocess.run(
            [python, "-c", "import starttls_proxy, sys; sys.stdout.write(starttls_proxy.__file__)"],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,  # not the checkout, which python -c would import from
        ).stdout
    ).parent
    assert installed.is_relative_to(fresh)
    assert os.access(installed / "tls" / "helper" / "stp-helper", os.X_OK)
    assert (installed / "keys" / "provider" / "keyref.so").is_file()
    assert list(installed.glob("keys/_service.*.so"))
    assert list(installed.parent.glob("protocols/_smtp_data.*.so"))
    for package in ("proxy", "privileged", "tls", "sandbox", "keys"):
        assert (installed / package / "__init__.py").is_file(), package

    # The dependencies are the test environment's: this test installs nothing
    # from an index. The fresh environment's own copy comes first all the same.
    dependencies = next(p for p in sys.path if p.endswith("site-packages"))
    version = subprocess.run(
        [fresh / "bin" / "starttls-proxy", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": dependencies},
    ).stdout
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert version == f"starttls-proxy {project['version']}\n"


@pytest.mark.parametrize(
    "compiler",
    ["/nonexistent/cc", "gcc -nostdinc"],
    ids=["no compiler", "no OpenSSL headers"],
)
def test_a_missing_toolchain_is_named(source_tree: Path, tmp_path: Path, compiler: str) -> None:
    built = _build(source_tree, tmp_path / "dist", CC=compiler)
    assert built.returncode != 0
    assert "it needs a C compiler and the OpenSSL 3 headers" in built.stdout + built.stderr
    assert "apt-get install gcc libssl-dev" in built.stdout + built.stderr
