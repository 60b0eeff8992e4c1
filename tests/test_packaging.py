"""gn_det's packaging (pyproject.toml), as a user gets it: the wheel built from this checkout holds
every gn_det package's modules and JSON data (found by walking gn_det/, so subpackages added later
are covered) and nothing else of the repository; its metadata states requirements/*.txt as they are;
installed into another environment that already has torch (a detectron2 project's), it imports from
there and leaves that environment's torch as it was.

Offline throughout: pip builds with --no-build-isolation (this environment's setuptools) and installs
with --no-index --no-deps. The build runs on a copy of the checkout, so no build/ or *.egg-info
appears in the repository."""
import email.parser
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not copied: the environment, git, outputs, and anything a build or a run leaves behind.
TOP_LEVEL_SKIPPED = {".venv", ".git", "output", "datasets", ".gpu_site", ".whl", "build", "dist"}
SKIPPED_ANYWHERE = ("__pycache__", ".pytest_cache", "*.egg-info", "*.pyc")
# The files gn_det's packages consist of: its modules and the JSON data it reads at run time.
PACKAGED_SUFFIXES = (".py", ".json")


def _pip_env() -> dict:
    # No machine pip configuration (extra indexes, find-links), no index at all, no stray PYTHONPATH
    # (tools/compat_check.sh sets it to this checkout, which would hide the installed copy).
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    return env


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_pip_env(), timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _requirement_lines(name: str) -> list:
    with open(os.path.join(ROOT, "requirements", name)) as f:
        return [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]


def _key(req: Requirement) -> tuple:
    return canonicalize_name(req.name), tuple(sorted(req.extras)), str(req.specifier)


def source_package_files() -> set:
    """Paths (relative to the checkout, with "/") of gn_det/'s modules and JSON files."""
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "gn_det")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(PACKAGED_SUFFIXES):
                found.add(os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/"))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    for module in ("pip", "setuptools"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"building the wheel offline needs {module} in this environment")
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"

    def ignore(folder, names):
        skipped = set(shutil.ignore_patterns(*SKIPPED_ANYWHERE)(folder, names))
        if os.path.samefile(folder, ROOT):
            skipped |= TOP_LEVEL_SKIPPED & set(names)
        return skipped

    shutil.copytree(ROOT, source, ignore=ignore, symlinks=True)
    out = work / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
          str(source)], cwd=work)
    wheels = sorted(out.glob("gn_det-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel_path):
    with zipfile.ZipFile(wheel_path) as zf:
        names = zf.namelist()
        (path,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(path).decode()), names


def test_wheel_holds_every_gn_det_package_and_its_data_and_nothing_else(wheel):
    _, names = _metadata(wheel)
    files = {n for n in names if not n.endswith("/")}
    expected = source_package_files()
    assert any(p.endswith(".json") for p in expected), "gn_det/ holds no JSON data file: has routes.json moved out?"
    missing = sorted(expected - files)
    assert not missing, (f"the wheel lacks {missing}: a folder of gn_det/ that pyproject.toml's package discovery "
                         "misses, or a data file its package-data patterns do not cover")
    package_files = {n for n in files if n.startswith("gn_det/")}
    extra = sorted(package_files - expected)
    assert not extra, f"the wheel holds files of gn_det/ that the source tree does not: {extra}"
    tops = {n.split("/")[0] for n in files}
    dist_info = [t for t in tops if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and dist_info[0].startswith("gn_det-"), tops
    assert tops == {"gn_det", dist_info[0]}, f"the wheel holds more than gn_det: {sorted(tops)}"
    assert not any(n.startswith(("tests/", "tools/", "benchmarks/", "configs/")) for n in names)


def test_wheel_metadata_states_the_requirement_files(wheel):
    meta, _ = _metadata(wheel)
    assert meta["Name"] == "gn_det" and meta["Requires-Python"] == ">=3.9"
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    runtime = [r for r in requires if r.marker is None or "extra" not in str(r.marker)]
    # install_requires is requirements/gn_det.txt exactly: names, versions and environment markers
    want = [Requirement(line) for line in _requirement_lines("gn_det.txt")]
    assert sorted((_key(r), str(r.marker)) for r in runtime) == sorted((_key(r), str(r.marker)) for r in want)
    for name in ("torch", "torchvision", "triton", "detectron2"):  # deliberately absent: pyproject.toml says why
        assert all(canonicalize_name(r.name) != name for r in requires), name
    # the extra "test" is requirements/test.txt
    assert meta.get_all("Provides-Extra") == ["test"]
    test_extra = [r for r in requires if r not in runtime]
    assert sorted(map(_key, test_extra)) == sorted(_key(Requirement(line)) for line in _requirement_lines("test.txt"))
    for r in test_extra:
        assert r.marker.evaluate({"extra": "test"}) and not r.marker.evaluate({"extra": "other"}), str(r)


def test_wheel_installs_beside_an_existing_torch_and_imports_from_there(wheel, tmp_path):
    # A throwaway environment that already has this one's packages (torch, detectron2, ...), as a
    # detectron2 project's environment has: a venv of the base interpreter with --system-site-packages,
    # and this environment's site-packages added by a .pth (its own .pth files processed too, e.g.
    # the one that puts detectron2's sources on the path).
    env_dir = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(purelib, "_gn_det_test_parent.pth"), "w") as f:
        f.writelines(f"import site; site.addsitedir({p!r})\n" for p in parents)

    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    assert not os.path.exists(os.path.join(purelib, "torch")), "installing gn_det installed a torch"

    probe = ("import json, gn_det, torch; print(json.dumps({'gn_det': gn_det.__file__, "
             "'version': gn_det.__version__, 'torch': torch.__version__, 'torch_file': torch.__file__}))")
    outside = tmp_path / "elsewhere"  # not the checkout: its gn_det/ must not be what is imported
    outside.mkdir()
    proc = _run([python, "-c", probe], cwd=outside)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = os.path.dirname(os.path.realpath(found["gn_det"]))
    assert installed == os.path.realpath(os.path.join(purelib, "gn_det")), found
    meta, names = _metadata(wheel)
    assert found["version"] == meta["Version"], "the wheel's version is not gn_det.__version__"
    # torch untouched: the same version, imported from the same files as in this environment
    import torch
    assert found["torch"] == torch.__version__
    assert os.path.realpath(found["torch_file"]) == os.path.realpath(torch.__file__)
    # the data files are where gn_det reads them, next to its modules
    for name in names:
        if name.startswith("gn_det/") and name.endswith(".json"):
            assert os.path.isfile(os.path.join(purelib, *name.split("/"))), name
