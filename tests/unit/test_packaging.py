"""pyproject.toml lists packages explicitly (the top-level folders map onto `vitrine.*`): none may be forgotten."""

import tomllib

from vitrine.settings import REPO_ROOT


def test_every_package_folder_is_listed_in_pyproject() -> None:
    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = tool["package-dir"]
    listed = set(tool["packages"])
    found = set()
    for package, folder in mapping.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO_ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed
