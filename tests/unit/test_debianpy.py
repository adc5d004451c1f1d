"""The Debian package profile: dependency parsing and what dpkg says is installed."""

from __future__ import annotations

import os

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
