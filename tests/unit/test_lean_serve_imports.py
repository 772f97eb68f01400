"""What keeps Serve's and the platform API's processes light: pandas stays out of the processes that
load Ray Serve with the head's site hook, MLflow out of an app until a route uses it. Real
interpreters (the hook runs at a process's start), the installed Ray, pandas and MLflow."""

import json
import os
import subprocess
import sys

import pytest

from ray_apps import cluster
from ray_apps.config import Settings

# Imports Serve's replica the way a Serve process does, then reports what is loaded and what Serve's
# own JSON encoding (http_util: jsonable_encoder with serve_encoders) makes of a response.
PROBE = """
import json, sys
{first}
import ray.serve._private.replica
from fastapi.encoders import jsonable_encoder
from ray.serve._private.utils import serve_encoders
import numpy as np
loaded_before = 'pandas' in sys.modules
import pandas as pd
body = {{"frame": pd.DataFrame({{"x": [1, 2]}}), "array": np.arange(2), "error": ValueError("no")}}
print(json.dumps({{"pandas_before": loaded_before, "encoded": jsonable_encoder(body, custom_encoder=serve_encoders)}}))
"""


def probe(first: str = "", hooks: bool = True) -> dict:
    env = {**os.environ, "PYTHONPATH": str(cluster.SITE_HOOKS) if hooks else ""}
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


EXPECTED = {"frame": [{"x": 1}, {"x": 2}], "array": [0, 1], "error": "no"}


@pytest.mark.parametrize("hooks", [True, False], ids=["with the head's hook", "plain"])
def test_serve_loads_without_pandas_under_the_hook_and_still_encodes_a_dataframe_once_one_exists(hooks):
    got = probe(hooks=hooks)
    assert got["pandas_before"] is (not hooks)
    assert got["encoded"] == EXPECTED


def test_a_process_that_already_has_pandas_keeps_serve_s_own_encoder():
    got = probe(first="import pandas", hooks=True)
    assert got["pandas_before"] is True and got["encoded"] == EXPECTED


def test_the_head_s_environment_puts_the_hook_first_and_keeps_a_user_s_pythonpath(monkeypatch):
    assert (cluster.SITE_HOOKS / "sitecustomize.py").is_file()
    monkeypatch.setenv("PYTHONPATH", "/opt/mine")
    settings = Settings()
    assert cluster._ray_env(settings, settings.topology())["PYTHONPATH"] == f"{cluster.SITE_HOOKS}{os.pathsep}/opt/mine"
    monkeypatch.delenv("PYTHONPATH")
    assert cluster._ray_env(settings, settings.topology())["PYTHONPATH"] == str(cluster.SITE_HOOKS)


def _app_raising(exc: Exception, *, after_start: bool = False):
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from ray_apps.serve.http_common import answers_errors_as_problems

    app = FastAPI()
    answers_errors_as_problems(app)

    @app.get("/boom")
    def boom():
        if after_start:
            def body():
                yield b"partial"
                raise exc
            return StreamingResponse(body())
        raise exc

    return app


def test_an_unreachable_mlflow_answers_503_and_its_other_errors_stay_errors():
    from fastapi.testclient import TestClient
    from mlflow.exceptions import MlflowException
    from requests.exceptions import ConnectionError as RequestsConnectionError

    for exc in (MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/get failed"),
                RequestsConnectionError("refused")):
        resp = TestClient(_app_raising(exc)).get("/boom")
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"] == "10" and "MLflow is unavailable" in resp.json()["detail"]["reason"]
    not_found = TestClient(_app_raising(MlflowException("Run 'x' not found")), raise_server_exceptions=False)
    assert not_found.get("/boom").status_code == 500
    with pytest.raises(RequestsConnectionError):  # the answer had begun: nothing can be said instead
        TestClient(_app_raising(RequestsConnectionError("refused"), after_start=True)).get("/boom")


def test_the_platform_api_does_not_load_mlflow_until_a_route_needs_it():
    code = ("import sys; import ray_apps.serve.platform_api, ray_apps.agent.http, ray_apps.serve.model_app; "
            "print(sorted(m for m in ('mlflow', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(cluster.SITE_HOOKS)},
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_sitecustomize_further_down_the_path_still_runs(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITE_HOOK_RAN = True\n")
    code = ("import builtins, sys; "
            "print(getattr(builtins, 'OTHER_SITE_HOOK_RAN', False), type(sys.meta_path[0]).__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cluster.SITE_HOOKS), str(tmp_path)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "ServeUtilsWithoutPandas"]
