"""The layers of DESIGN §2 stay honest: imports only point down (parsed with ``ast``, nothing is imported).

kernels (registration, residual, reference, defects, bandpass, trajectory, warp, synthetic, threads; plus
errors)  <  store  <  pipeline  <  edge (cli, config, demo, report). Only store touches zarr/fsspec; only
pipeline builds Dask graphs (store may use dask.array to read and write Zarr).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import driftcorr

PACKAGE = "driftcorr"
SOURCE = Path(driftcorr.__file__).resolve().parent
MODULES = {path.stem: path for path in sorted(SOURCE.glob("*.py"))}

KERNELS = ("registration", "residual", "reference", "defects", "bandpass", "trajectory", "warp", "synthetic",
           "threads")
UPPER = ("pipeline", "store", "cli", "config", "demo", "report")
HEAVY = ("dask", "distributed", "zarr", "xarray", "fsspec", "click", "pydantic")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a source file imports (anywhere in it, relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y (modules sit at the package root)
                base = PACKAGE if not node.module else f"{PACKAGE}.{node.module}"
                if node.module:
                    names.add(base)
                else:
                    names.update(f"{PACKAGE}.{alias.name}" for alias in node.names)
            elif node.module == PACKAGE:  # from driftcorr import store
                names.update(f"{PACKAGE}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names.add(node.args[0].value)
    return names


def top_levels(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def package_modules(names: set[str]) -> set[str]:
    """Package modules imported (``driftcorr.store`` -> ``store``)."""
    return {name.split(".")[1] for name in names if name.startswith(PACKAGE + ".") and name.count(".") >= 1}


IMPORTS = {name: imported_modules(path) for name, path in MODULES.items()}


def test_the_parser_sees_the_imports():
    """Guard against a vacuous pass: known imports are found."""
    assert {"registration", "store", "pipeline", "cli", "errors"} <= set(MODULES)
    assert "zarr" in top_levels(IMPORTS["store"])
    assert "dask" in top_levels(IMPORTS["pipeline"])
    assert "click" in top_levels(IMPORTS["cli"])
    assert {"store", "registration"} <= package_modules(IMPORTS["pipeline"])
    assert "errors" in package_modules(IMPORTS["registration"])


def test_parser_resolves_relative_and_absolute_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("from . import store\nfrom .register import make_plan\nimport dask.array as da\n"
                      "from driftcorr import cli\nimport importlib\n\n\ndef f():\n    import fsspec\n"
                      "    importlib.import_module('zarr')\n")
    names = imported_modules(source)
    assert {"driftcorr.store", "driftcorr.register", "dask.array", "driftcorr.cli", "fsspec", "zarr"} <= names


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k in MODULES])
def test_kernels_are_pure_numpy(kernel):
    names = IMPORTS[kernel]
    heavy = top_levels(names) & set(HEAVY)
    assert not heavy, f"kernel {kernel}.py imports {sorted(heavy)}"
    upper = package_modules(names) & set(UPPER)
    assert not upper, f"kernel {kernel}.py imports the upper layer(s) {sorted(upper)}"
    others = package_modules(names) - set(KERNELS) - {"errors"}
    assert not others, f"kernel {kernel}.py imports {sorted(others)}, which is not a kernel"


def test_synthetic_is_self_contained():
    """synthetic.py promises to import nothing else from the package (benchmarks and workers use it alone)."""
    assert not package_modules(IMPORTS["synthetic"])


@pytest.mark.parametrize("library", ["zarr", "fsspec"])
def test_only_store_touches_storage(library):
    users = sorted(name for name, names in IMPORTS.items() if library in top_levels(names))
    assert set(users) <= {"store"}, f"{library} imported by {users}"


@pytest.mark.parametrize("library", ["dask", "distributed"])
def test_only_pipeline_builds_dask_graphs(library):
    allowed = {"pipeline", "store"} if library == "dask" else {"pipeline", "cli"}
    users = sorted(name for name, names in IMPORTS.items() if library in top_levels(names))
    assert set(users) <= allowed, f"{library} imported by {users}"


def test_store_uses_dask_only_to_read_and_write():
    dask_imports = {name for name in IMPORTS["store"] if name.split(".")[0] == "dask"}
    assert dask_imports <= {"dask.array"}, dask_imports


def test_edge_libraries_stay_at_the_edge():
    for library, allowed in (("click", {"cli"}), ("pydantic", {"config"})):
        users = sorted(name for name, names in IMPORTS.items() if library in top_levels(names))
        assert set(users) <= allowed, f"{library} imported by {users}"


def test_imports_only_point_down():
    rank = {**dict.fromkeys(KERNELS, 0), "errors": 0, "store": 1, "config": 1, "pipeline": 2,
            "cli": 3, "demo": 3, "report": 3, "__init__": 4, "__main__": 4}
    unknown = sorted(set(MODULES) - set(rank))
    assert not unknown, f"new modules {unknown}: give them a layer in this test"
    for name, names in IMPORTS.items():
        for target in package_modules(names):
            if target not in MODULES:
                continue
            assert rank[target] <= rank[name], f"{name}.py (layer {rank[name]}) imports {target}.py " \
                                               f"(layer {rank[target]})"
    assert "cli" not in package_modules(IMPORTS["pipeline"]) and "demo" not in package_modules(IMPORTS["pipeline"])
    assert not package_modules(IMPORTS["store"]) & {"pipeline", "config", "cli", "demo"}
