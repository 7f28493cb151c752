"""Fixtures of the Axolotl tests (the helpers they use are in ``axolotl_helpers.py``).

Tests marked ``axolotl`` need the separate Axolotl virtual environment (``.ci/axolotl.sh``). Each such module calls
``pytest.importorskip("axolotl.integrations.base")``, so the main suite skips them with a reason; a submodule,
because where Axolotl is missing this folder itself imports as a namespace package ``axolotl``. Axolotl is
imported lazily here.
"""

import os

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # telemetry uploads cannot leave these machines; retries are slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

pytest.register_assert_rewrite("axolotl_helpers")  # its assert_* helpers report values like test code

from axolotl_helpers import EXAMPLE_CONFIG, EXAMPLE_DATA, axolotl_cli, axolotl_env, base_config  # noqa: E402


@pytest.fixture()
def axolotl_cmd():
    """What the end-to-end test needs from here: the ``axolotl`` script, its environment, the example files."""
    return {"cli": axolotl_cli(), "env": axolotl_env(), "config": EXAMPLE_CONFIG, "data": EXAMPLE_DATA}


@pytest.fixture()
def load_axolotl_cfg(tiny_model_dir, tmp_path):
    """Validate a config through Axolotl's own CLI loader (``axolotl.cli.config.load_cfg``: plugin registration,
    the merged pydantic config model, then ``normalize_config``); keyword arguments override :func:`base_config`."""
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    def load(**overrides):
        return load_cfg(DictDefault(base_config(tiny_model_dir, tmp_path, **overrides)))

    return load
