"""The repository's own docs stay true to the tree: the README's layout names every module and package, the
layering contract covers every library module, and every docs/ or README reference a docstring makes exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flowgrpo_core"


def _top_level_names() -> set[str]:
    names = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    return names


def test_readme_layout_names_every_module_and_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    words = set(re.findall(r"[\w.]+/?", layout))
    missing = sorted(name for name in _top_level_names() if name not in words)
    assert not missing, f"README's layout does not mention {missing}"


def test_the_layers_contract_covers_every_library_module():
    # the contract's one long line of library modules (pyproject.toml is read as text: no tomllib on 3.10)
    text = (ROOT / "pyproject.toml").read_text()
    library = next(line for line in text.splitlines() if '"flowgrpo_core.advantages :' in line)
    listed = {name.strip(' ",') for name in library.split(":")}
    modules = {"flowgrpo_core." + name.removesuffix(".py").removesuffix("/") for name in _top_level_names()}
    modules -= {"flowgrpo_core.data", "flowgrpo_core.cli", "flowgrpo_core.stages"}  # data; the layers above
    assert not sorted(modules - listed), "add these to the layers contract in pyproject.toml"


def test_docstring_references_to_docs_resolve_inside_the_clone():
    # "docs/x.md" must be in docs/; an upper-case "NAME.md" (README, CONTRIBUTING, PROVENANCE...) anywhere in
    # the repository, outside the virtual environment
    docs, upper = re.compile(r"\bdocs/[\w-]+\.md\b"), re.compile(r"\b[A-Z][A-Z_]+\.md\b")
    present = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = set()
    sources = [
        *ROOT.glob("flowgrpo_core/**/*.py"),
        *ROOT.glob("components/*.py"),
        *ROOT.glob("pipelines/*.py"),
    ]
    for path in sources:
        text = path.read_text()
        missing |= {(path.name, ref) for ref in docs.findall(text) if not (ROOT / ref).is_file()}
        missing |= {(path.name, ref) for ref in upper.findall(text) if ref not in present}
    assert not missing, sorted(missing)
