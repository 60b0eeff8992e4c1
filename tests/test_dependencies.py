"""gn_det's dependencies (pyproject.toml reads them from requirements/gn_det.txt) are exactly what
gn_det imports at run time: every third-party module that gn_det/ imports is declared, and nothing
declared is unused. torch, torchvision, triton and detectron2 are deliberately undeclared
(pyproject.toml says why). tests/test_packaging.py checks that the built wheel's metadata states
the file as it is."""
import ast
import importlib.metadata as metadata
import os
import re
import sys

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements", "gn_det.txt")

# Top-level import name -> the PyPI distribution that provides it (where the names differ or
# the choice is deliberate; see the comments in requirements/gn_det.txt).
DISTRIBUTION = {
    "cv2": "opencv-python-headless",
    "PIL": "Pillow",
    "numpy": "numpy",
    "pycocotools": "pycocotools",
    "faster_coco_eval": "faster-coco-eval",
    "fvcore": "fvcore",
    "yaml": "PyYAML",
    "omegaconf": "omegaconf",
}
UNDECLARED = {"torch", "torchvision", "triton", "detectron2"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def package_imports() -> dict:
    """Top-level module -> files of gn_det/ that import it (absolute imports anywhere in a file,
    in functions and try blocks too), less the standard library and gn_det itself."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "gn_det")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top != "gn_det" and top != "__future__" and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return found


def declared_requirements() -> dict:
    """Normalised distribution name -> its line in requirements/gn_det.txt."""
    out = {}
    with open(REQUIREMENTS) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out[_normalize(re.match(r"[A-Za-z0-9._-]+", line).group(0))] = line
    return out


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="needs Python 3.10+ (sys.stdlib_module_names)")
def test_install_requires_is_what_gn_det_imports():
    imports = package_imports()
    unknown = sorted(set(imports) - set(DISTRIBUTION) - UNDECLARED)
    assert not unknown, (f"gn_det imports {unknown} ({[sorted(imports[m]) for m in unknown]}): add each to "
                         "requirements/gn_det.txt and to DISTRIBUTION in this test")
    needed = {_normalize(DISTRIBUTION[m]): m for m in imports if m not in UNDECLARED}
    declared = declared_requirements()
    missing = sorted(set(needed) - set(declared))
    assert not missing, f"gn_det imports {[needed[d] for d in missing]}, but requirements/gn_det.txt lacks {missing}"
    unused = sorted(set(declared) - set(needed))
    assert not unused, f"requirements/gn_det.txt declares {unused}, which gn_det/ does not import"
    for dist in UNDECLARED:
        assert _normalize(dist) not in declared, f"{dist} must stay out of the dependencies (see pyproject.toml)"


def test_the_map_names_the_installed_distributions():
    # The map is checked against this environment: each import that gn_det makes comes from
    # the distribution the map names (e.g. cv2 from opencv-python-headless, not opencv-python).
    providers = metadata.packages_distributions()
    for module in set(package_imports()) - UNDECLARED:
        dists = {_normalize(d) for d in providers.get(module, [])}
        if not dists:
            continue  # not installed here (e.g. faster-coco-eval on Python 3.9): nothing to check
        assert _normalize(DISTRIBUTION[module]) in dists, f"{module} is provided here by {dists}, not {DISTRIBUTION[module]}"


def test_pyproject_and_setup_env_read_the_requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    # The dependencies and the extra "test" come from the requirement files (setuptools' file
    # directive: one requirement a line, comments on lines of their own), not from a second list.
    assert "dependencies" not in pyproject["project"] and "optional-dependencies" not in pyproject["project"]
    assert {"dependencies", "optional-dependencies"} <= set(pyproject["project"]["dynamic"])
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"] == {"file": ["requirements/gn_det.txt"]}
    assert dynamic["optional-dependencies"] == {"test": {"file": ["requirements/test.txt"]}}
    for name in ("gn_det.txt", "test.txt"):
        with open(os.path.join(ROOT, "requirements", name)) as f:
            for line in f:
                # setuptools takes every line but blank and comment ones as a requirement: no pip
                # options (-r, -c, --index-url), no comment after a requirement
                assert line.strip().startswith("#") or ("#" not in line and not line.startswith("-")), (name, line)
    with open(os.path.join(ROOT, "tools", "setup_env.sh")) as f:
        script = f.read()
    # The set-up installs the file, and its "already installed" stamp hashes it, so a new
    # requirement is installed into an existing environment too ...
    assert re.search(r'REQ_FILES=\([^)]*requirements/gn_det\.txt', script), "setup_env.sh must install requirements/gn_det.txt"
    assert 'cat "${REQ_FILES[@]}" | sha256sum' in script
    # ... and "in place" also needs every requirement met, so a package removed since is reinstalled.
    assert '[ "$(cat "$STAMP")" = "$want_stamp" ] && requirements_met; then' in script
