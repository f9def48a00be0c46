"""Fixtures for the direct Process-stream suite: `epp` processes in standalone mode with test rules.

Uses demo/stack.py to run the binary ($EPP_BINARY / $EPP_BIN, else .build/debug/epp). The endpoints are
addresses that nothing listens on: these tests talk to the picker only.
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "demo"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack  # noqa: E402

from extproc_lib import ENDPOINTS  # noqa: E402

RULES = stack.SEED_RULE + "---\n" + stack.rewrite_rule([("backend-model", None)], name="alias", model="alias") + \
    "---\n" + stack.rewrite_rule([("cafe-backend", None)], name="cafe", model='"café"') + \
    "---\n" + stack.rewrite_rule([("arm-a", 50), ("arm-b", 50)], name="ab", model="ab-test")


class EppFactory:
    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.stacks = []

    def __call__(self, extra=(), endpoints=ENDPOINTS, rules=RULES, name="epp", env=None):
        d = self.tmp.mktemp(name)
        (d / "config").mkdir()
        (d / "config" / "rules.yaml").write_text(rules)
        st = stack.Stack(d / "logs")
        self.stacks.append(st)
        return st.epp(endpoints, config_dir=d / "config", extra=list(extra), env=env)

    def stop(self):
        for st in self.stacks:
            st.stop()


@pytest.fixture(scope="module")
def epp_factory(tmp_path_factory):
    f = EppFactory(tmp_path_factory)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def epp(epp_factory):
    """A picker with the default flags."""
    return epp_factory()

