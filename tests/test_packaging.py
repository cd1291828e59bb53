"""`make install` installs pinned versions (constraints.txt), and the pins
stay inside the ranges pyproject.toml declares."""
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(r) for r in project["dependencies"] + [r for reqs in extras.values() for r in reqs]]


def test_every_declared_dependency_is_pinned_inside_its_range():
    pins = _pins()
    declared = _declared()
    assert declared
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} is outside pyproject.toml's {req.specifier}"
        )


def test_the_installed_packages_are_the_pinned_versions():
    pins = _pins()
    assert len(pins) > len(_declared())  # what they bring is pinned too
    wrong = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}, "installed versions differ from constraints.txt (run make install): " + repr(wrong)
