"""The Debian package profiles: dependency parsing, what dpkg says is installed, the
links followed, and the science packages named wherever the host or guest installs them."""

from __future__ import annotations

import os
from pathlib import Path

from sandboxd import debianpy


def test_depends_field_yields_every_python3_alternative() -> None:
    depends = (
        "python3-certifi, python3-urllib3 (>= 1.21.1), python3:any, ca-certificates,"
        " python3-typing-extensions | python3 (>= 3.11), libc6 (>= 2.14)"
    )
    assert debianpy._python_dependencies(depends) == {
        "python3-certifi",
        "python3-urllib3",
        "python3-typing-extensions",
    }


def test_a_package_that_is_not_installed_is_left_out() -> None:
    assert debianpy.installed_closure(["python3-sandboxd-no-such-package"]) == []


def test_owned_paths_lie_directly_in_dist_packages_and_exist() -> None:
    closure = debianpy.installed_closure(["python3-requests"])
    assert "python3-urllib3" in closure  # followed from requests' Depends
    paths = debianpy.owned_top_level(closure)
    assert f"{debianpy.DIST_PACKAGES}/requests" in paths
    for path in paths:
        assert os.path.dirname(path) == debianpy.DIST_PACKAGES
        assert os.path.exists(path)
        assert not path.endswith((".pth", "__pycache__"))


def test_link_targets_are_the_outside_ends_of_links_that_resolve(tmp_path: Path) -> None:
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "fonts").mkdir(parents=True)
    outside.mkdir()
    (outside / "font.ttf").write_bytes(b"ttf")
    (tree / "own.txt").write_text("own")
    (tree / "fonts" / "font.ttf").symlink_to(outside / "font.ttf")
    (tree / "fonts" / "relative.ttf").symlink_to("../../outside/font.ttf")
    (tree / "inside.txt").symlink_to("own.txt")
    (tree / "dangling.ttf").symlink_to(outside / "missing.ttf")
    assert debianpy.link_targets([str(tree)]) == [str(outside / "font.ttf")]


def test_the_science_profile_binds_its_packages_data_and_libraries_only() -> None:
    entries = {entry.path: entry.kind for entry in debianpy.root_entries("science")}
    for package in ("numpy", "pandas", "matplotlib", "PIL"):
        assert entries.get(f"{debianpy.DIST_PACKAGES}/{package}") == "dir", package
    assert entries.get("/usr/share/matplotlib") == "dir"
    libraries = {os.path.basename(path) for path, kind in entries.items() if kind == "file"}
    # numpy's BLAS and LAPACK, Pillow's image libraries, matplotlib's qhull
    for library in ("libblas.so.3", "liblapack.so.3", "libfreetype.so.6", "libqhull_r.so.8.0"):
        assert library in libraries, library
    # The daemon's own packages and the plain profile's stay out of this list.
    for other in ("pystemd", "seccomp", "jinja2", "apt"):
        assert f"{debianpy.DIST_PACKAGES}/{other}" not in entries, other


ROOT = Path(__file__).parents[2]


def test_the_science_packages_are_in_the_deb_the_guest_and_ci() -> None:
    control = (ROOT / "packaging/debian/control").read_text()
    recommends = control.split("\nRecommends:", 1)[1].split("\nDescription:", 1)[0]
    makefile = (ROOT / "Makefile").read_text()
    apt_packages = makefile.split("APT_PACKAGES :=", 1)[1].split("\n\n", 1)[0]
    image = (ROOT / "tests/system/image.py").read_text()
    for package in debianpy.PROFILES["science"]:
        assert package in recommends.replace(",", " ").split(), package
        assert package in apt_packages.replace("\\", " ").split(), package
        assert f'"{package}"' in image, package
