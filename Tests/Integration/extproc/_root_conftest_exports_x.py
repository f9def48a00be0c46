"""Keeps `from conftest import <helper>` in sibling suites working.

Pytest (prepend import mode, no __init__.py) imports every conftest.py as the module `conftest`, so
after this directory's conftest.py is imported, `sys.modules["conftest"]` is ours, and a sibling test
module doing `from conftest import make_cert` (meaning Tests/Integration/conftest.py) would fail. Our
conftest modules therefore re-export the root conftest's plain helpers (never its fixtures or hooks).
"""
import importlib.util
import sys
from pathlib import Path

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
_NAME = "_integration_root_conftest_copy"


def helpers():
    if not ROOT_CONFTEST.exists():
        return {}
    mod = sys.modules.get(_NAME)
    if mod is None:
        spec = importlib.util.spec_from_file_location(_NAME, ROOT_CONFTEST)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception:
            del sys.modules[_NAME]
            return {}
    out = {}
    for name, obj in vars(mod).items():
        if name.startswith("_") or name.startswith("pytest_"):
            continue
        if type(obj).__name__ == "FixtureFunctionDefinition" or hasattr(obj, "_pytestfixturefunction") \
                or hasattr(obj, "_fixture_function_marker"):
            continue
        if getattr(obj, "__module__", _NAME) != _NAME and callable(obj):
            continue  # re-imported library names (os, Path, ...) are not ours to export
        out[name] = obj
    return out
