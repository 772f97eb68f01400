"""Run by Python at the start of every process of the local platform's Ray head: its folder is on the
head's PYTHONPATH (`cluster._ray_env`). Standard library only.

Ray Serve's utils import pandas, and with it pyarrow, only to turn a DataFrame that a deployment
returns into JSON. That is ~40-65 MB of RSS in each of Serve's controller, proxies and the dashboard's
Serve module, none of which ever holds a DataFrame. While that one module loads, pandas is hidden from
it; the DataFrame encoder it would have registered is registered anyway, and matches once the process
imports pandas itself, so a deployment that returns a DataFrame is answered as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

SERVE_UTILS = "ray.serve._private.utils"


class _PandasDataFrame(type):
    """`isinstance(obj, DataFrame)`, true only once this process has imported pandas."""

    def __instancecheck__(cls, obj) -> bool:
        pandas = sys.modules.get("pandas")
        return pandas is not None and isinstance(obj, pandas.DataFrame)


class DataFrame(metaclass=_PandasDataFrame):
    pass


def encode_dataframe(frame) -> list:
    return frame.to_dict(orient="records")  # what Serve's own encoder returns


class _ServeUtilsLoader(importlib.machinery.SourceFileLoader):
    def exec_module(self, module) -> None:
        sys.modules["pandas"] = None  # `import pandas` raises ImportError, which Serve's utils expect
        try:
            super().exec_module(module)
        finally:
            if sys.modules.get("pandas", False) is None:  # still hidden, not imported meanwhile
                del sys.modules["pandas"]
        encoders = getattr(module, "serve_encoders", None)
        if isinstance(encoders, dict) and getattr(module, "pd", None) is None:
            encoders[DataFrame] = encode_dataframe


class ServeUtilsWithoutPandas(importlib.abc.MetaPathFinder):
    """Loads Serve's utils module with pandas hidden, unless the process already has pandas (then
    hiding it saves nothing) or the module is not a plain source file (a Ray this does not know)."""

    def find_spec(self, name, path, target=None):
        if name != SERVE_UTILS or "pandas" in sys.modules:
            return None
        sys.meta_path.remove(self)  # once per process
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or type(spec.loader) is not importlib.machinery.SourceFileLoader:
            return spec
        spec.loader = _ServeUtilsLoader(spec.loader.name, spec.loader.path)
        return spec


def run_the_sitecustomize_this_one_hides() -> None:
    """Python runs the first `sitecustomize` on the path, this one: run the next one too (a venv's or
    the system's), as it would have run without this folder on PYTHONPATH."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != os.path.abspath(__file__):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if not any(isinstance(finder, ServeUtilsWithoutPandas) for finder in sys.meta_path):
    sys.meta_path.insert(0, ServeUtilsWithoutPandas())
    run_the_sitecustomize_this_one_hides()
