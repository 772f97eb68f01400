from pathlib import Path

import pytest

from ray_apps.config import PROJECT_ROOT, SettingsError, load_settings
from ray_apps.training import job_env_vars


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "platform.yaml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "OPPEN_DATA_DIR", "OPPEN_RAY__GCS_PORT"):
        monkeypatch.delenv(key, raising=False)


def test_project_file_loads_with_local_defaults():
    s = load_settings(PROJECT_ROOT / "configs" / "platform.yaml")
    assert s.is_local
    assert s.dashboard_url == "http://127.0.0.1:8265"
    assert s.tracking_uri == "http://127.0.0.1:5000"
    assert s.data_dir == PROJECT_ROOT / ".oppen"
    assert s.costs_file.exists()


def test_file_values_and_relative_data_dir(tmp_path):
    s = load_settings(write(tmp_path, "data_dir: state\nray:\n  gcs_port: 6400\nmlflow:\n  port: 5055\n"))
    assert s.ray.gcs_port == 6400
    assert s.tracking_uri == "http://127.0.0.1:5055"
    assert s.data_dir == PROJECT_ROOT / "state"  # relative to the project, not the cwd


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("OPPEN_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("OPPEN_RAY__GCS_PORT", "6401")
    s = load_settings(write(tmp_path, "ray:\n  gcs_port: 6400\n"))
    assert s.dashboard_url == "http://10.0.0.5:8265"
    assert not s.is_local
    assert s.tracking_uri == "http://mlflow.internal:5000"
    assert s.data_dir == tmp_path / "d"
    assert s.ray.gcs_port == 6401
    assert s.gcs_address == "10.0.0.5:6401"  # the remote head's GCS, for the autoscaler
    assert s.job_env()["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    # A remote head's pods each run one Ray: its jobs find it by themselves.
    assert "RAY_ADDRESS" not in job_env_vars(s)


def test_a_local_head_s_jobs_name_its_gcs(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    s = load_settings(write(tmp_path, "ray:\n  gcs_port: 6400\n"))
    assert s.is_local and job_env_vars(s)["RAY_ADDRESS"] == s.gcs_address == "127.0.0.1:6400"
    assert job_env_vars(s)["OPPEN_DATA_DIR"] == str(s.data_dir)


def test_jobs_name_the_cpu_group_for_preprocessing_where_the_cluster_has_one(tmp_path, monkeypatch):
    from ray_apps.config import CONFIG_DIR

    s = load_settings(write(tmp_path, f"cluster_file: {CONFIG_DIR / 'cluster.yaml'}\n"))
    assert job_env_vars(s)["OPPEN_PREPROCESS_GROUP"] == "cpu"           # the shipped cpu + gpu groups
    single = load_settings(write(tmp_path, f"cluster_file: {CONFIG_DIR / 'cluster.single-head.yaml'}\n"))
    assert "OPPEN_PREPROCESS_GROUP" not in job_env_vars(single)          # one head: nowhere else to go
    gpu_only = tmp_path / "gpu-only.yaml"
    gpu_only.write_text("worker_groups:\n  - {name: gpu, cpus: 1, gpus: 1, max_workers: 1}\n")
    assert "OPPEN_PREPROCESS_GROUP" not in job_env_vars(load_settings(write(tmp_path, f"cluster_file: {gpu_only}\n")))


def test_bad_value_names_file_field_and_fix(tmp_path):
    path = write(tmp_path, "ray:\n  gcs_port: -2\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    msg = str(err.value)
    assert str(path) in msg and "ray.gcs_port" in msg and "-2" in msg and "To fix" in msg


def test_bad_env_value_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("OPPEN_RAY__GCS_PORT", "many")
    with pytest.raises(SettingsError, match=r"\$OPPEN_RAY__GCS_PORT"):
        load_settings(write(tmp_path, ""))


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match=r"mlflow\.prot.*remove it"):
        load_settings(write(tmp_path, "mlflow:\n  prot: 5000\n"))


def test_ray_address_must_be_the_dashboard_url(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(SettingsError, match=r"RAY_ADDRESS.*http"):
        load_settings(write(tmp_path, ""))


@pytest.mark.parametrize("text,match", [("ray: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping")])
def test_malformed_file(tmp_path, text, match):
    with pytest.raises(SettingsError, match=match):
        load_settings(write(tmp_path, text))


def test_ray_address_of_the_platform_s_own_head_is_still_local(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")   # as `eval "$(oppen env)"` leaves it
    assert load_settings(write(tmp_path, "")).is_local
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    s = load_settings(write(tmp_path, ""))
    assert not s.is_local and s.client_env()["RAY_ADDRESS"] == "http://10.0.0.5:8265"
