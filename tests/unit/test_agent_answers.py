"""The agent's plain answers over tool results."""
from ray_apps.agent.answers import answer


def test_the_gpu_answer_names_each_gpu_group_and_what_it_may_still_add():
    result = {"total": 1.0, "used": 1.0, "free": 0.0, "queued_jobs": 1, "queued_demand": 1.0, "by_node": {},
              "groups": [{"name": "cpu", "running": 1, "idle": 0, "pending": 0, "min_workers": 1, "max_workers": 2,
                          "cpus": 2.0, "gpus": 0.0},
                         {"name": "gpu", "running": 1, "idle": 0, "pending": 1, "min_workers": 0, "max_workers": 2,
                          "cpus": 1.0, "gpus": 1.0}]}
    text = answer("get_gpu_availability", result)
    assert text.startswith("0 of 1 GPUs are free (1 in use); queued jobs want 1 more")
    assert "group gpu has 1 node(s) of 1 GPU (up to 2, 1 starting)" in text and "group cpu" not in text
    assert answer("get_gpu_availability", {**result, "groups": []}).endswith("want 1 more.")  # single head
