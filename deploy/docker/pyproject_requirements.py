"""Print the project's runtime requirements from pyproject.toml, one per line.

The Dockerfile installs these in a layer of their own, before the source is copied, so that
editing the code does not re-download every dependency. torch is left out on purpose: the
image installs it first from the PyTorch index that matches the base (CUDA or CPU build),
and a plain `torch` requirement from PyPI would pull a different build.

Usage: python pyproject_requirements.py PYPROJECT [EXTRA ...]
"""

from __future__ import annotations

import sys

import tomllib

# Installed separately from a build-specific index (see the Dockerfile's TORCH_INDEX_URL).
SEPARATELY_INSTALLED = frozenset({"torch"})


def requirement_name(requirement: str) -> str:
    """The distribution name of a PEP 508 requirement string, lower-cased."""
    name_end = len(requirement)
    for separator in "<>=!~;[ (@":
        position = requirement.find(separator)
        if position != -1:
            name_end = min(name_end, position)
    return requirement[:name_end].strip().lower()


def runtime_requirements(pyproject_path: str, extras: list[str]) -> list[str]:
    """Dependencies plus those of the named extras, minus the separately installed ones.

    Raises KeyError naming the extra when an extra is not declared in the pyproject.
    """
    with open(pyproject_path, "rb") as pyproject_file:
        project = tomllib.load(pyproject_file)["project"]
    requirements = list(project.get("dependencies", []))
    declared_extras = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in declared_extras:
            raise KeyError(f"extra {extra!r} is not declared; declared extras: {sorted(declared_extras)}")
        requirements.extend(declared_extras[extra])
    unique = dict.fromkeys(r for r in requirements if requirement_name(r) not in SEPARATELY_INSTALLED)
    return list(unique)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write(__doc__.split("\n\n")[-1] + "\n")
        return 2
    try:
        lines = runtime_requirements(argv[1], argv[2:])
    except KeyError as error:
        sys.stderr.write(f"{error.args[0]}\n")
        return 2
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
