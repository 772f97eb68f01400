"""The intent router on requests written the way users write them.

Each case: the message, what the agent knows from the previous turn, and the
expected tool with the arguments that must be there (or a question, or a refusal).
"""

import pytest

from ray_apps.agent.router import Router, normalise

JOB = "mnist-20261130-164807-9c35ae"
CTX = {"job_id": JOB}
ASK, DECLINE = "ask", "decline"

CASES = [
    # ---- training: trigger / queue, with values, paraphrases and typos
    ("train mnist for 3 epochs with lr 0.01 on 2 gpus, high priority", {}, "queue_training_job",
     {"trainer": "mnist", "priority": "high", "params": {"epochs": 3, "lr": 0.01, "num_workers": 2,
                                                         "gpus_per_worker": 1.0}}),
    ("train mnist", {}, "trigger_training_job", {"trainer": "mnist", "params": {}}),
    ("Train MNIST for two epochs please", {}, "trigger_training_job", {"params": {"epochs": 2}}),
    ("trian mnsit for 2 epocs", {}, "trigger_training_job", {"trainer": "mnist", "params": {"epochs": 2}}),
    ("kick off a digits model, 5 epochs, batch size 256", {}, "trigger_training_job",
     {"trainer": "mnist", "params": {"epochs": 5, "batch_size": 256}}),
    ("start a run of mnist with learning rate 3e-3", {}, "trigger_training_job", {"params": {"lr": 0.003}}),
    ("launch mnist on 1 gpu", {}, "trigger_training_job", {"params": {"num_workers": 1, "gpus_per_worker": 1.0}}),
    ("fine-tune the language model for 200 steps", {}, "trigger_training_job",
     {"trainer": "llm", "params": {"max_steps": 200}}),
    ("finetune gpt2 on wikitext, 100 steps, batch size 4", {}, "trigger_training_job",
     {"trainer": "llm", "params": {"max_steps": 100, "batch_size": 4}}),
    ("train the tiny llm for 30 steps", {}, "trigger_training_job",
     {"trainer": "llm", "params": {"model": "tiny", "max_steps": 30}}),
    ("queue an mnist job at low priority", {}, "queue_training_job", {"trainer": "mnist", "priority": "low"}),
    ("submit llm with 50 steps", {}, "queue_training_job", {"trainer": "llm", "params": {"max_steps": 50}}),
    ("schedule mnist 4 epochs urgent", {}, "queue_training_job", {"priority": "high", "params": {"epochs": 4}}),
    ("run mnist with 2 workers and 1 cpu each", {}, "trigger_training_job",
     {"params": {"num_workers": 2, "cpus_per_worker": 1.0}}),
    ("mnist 3 epochs lr 0.002", {}, "trigger_training_job", {"trainer": "mnist", "params": {"epochs": 3}}),
    ("train mnist on 2000 samples for 1 epoch", {}, "trigger_training_job",
     {"params": {"train_samples": 2000, "epochs": 1}}),
    ("train something", {}, ASK, {"missing": "trainer"}),
    ("start a training job for me", {}, ASK, {"missing": "trainer"}),
    ("queue a job with high priority", {}, ASK, {"missing": "trainer"}),
    # ---- status and the queue
    ("what's the status of my last job?", {}, "get_training_status", {"job_id": "last"}),
    (f"status of {JOB}", {}, "get_training_status", {"job_id": JOB}),
    ("how is it doing?", CTX, "get_training_status", {"job_id": JOB}),
    ("is the llm run done yet", {}, "get_training_status", {"job_id": "last", "trainer": "llm"}),
    ("progress of job 5ab26f", {}, "get_training_status", {"job_id": "5ab26f"}),
    ("show me the queue", {}, "get_job_queue_status", {}),
    ("what's running right now?", {}, "get_job_queue_status", {}),
    ("which of my jobs are still waiting", {}, "get_job_queue_status", {}),
    ("why is my job still waiting?", {}, "why_is_job_waiting", {"job_id": "last"}),
    ("why is job mnist-20261201-101500-abc123 stuck in the queue", {}, "why_is_job_waiting",
     {"job_id": "mnist-20261201-101500-abc123"}),
    ("list my jobs", {}, "get_job_queue_status", {}),
    # ---- cancel
    ("cancel my queued jobs", {}, "cancel_job", {"scope": "queued"}),
    ("abort all pending jobs", {}, "cancel_job", {"scope": "queued"}),
    (f"cancel {JOB}", {}, "cancel_job", {"job_id": JOB}),
    ("stop it", CTX, "cancel_job", {"job_id": JOB}),
    ("cancel", {}, ASK, {"missing": "job_id"}),
    ("kill job 9c35ae", {}, "cancel_job", {"job_id": "9c35ae"}),
    # ---- costs
    ("how much did the last llm run cost?", {}, "calculate_training_cost", {"job_id": "last", "trainer": "llm"}),
    ("and what did it cost?", CTX, "calculate_training_cost", {"job_id": JOB}),
    (f"cost of {JOB}", {}, "calculate_training_cost", {"job_id": JOB}),
    ("how expensive was my latest job", {}, "calculate_training_cost", {"job_id": "last"}),
    ("what did we spend this week", {}, "get_cost_report", {"since": "7d"}),
    ("cost report for the last 3 days", {}, "get_cost_report", {"since": "3d"}),
    ("spending by tenant this month", {}, "get_cost_report", {"since": "30d", "group_by": "tenant"}),
    ("daily spend breakdown", {}, "get_cost_report", {"group_by": "day"}),
    ("how much have we spent", {}, "get_cost_report", {}),
    ("am I within budget?", {}, "check_training_budget", {}),
    ("check my budget of $50", {}, "check_training_budget", {"budget_usd": 50.0}),
    ("are we over our 20 dollar budget this week", {}, "check_training_budget", {"budget_usd": 20.0, "since": "7d"}),
    # ---- forecasts
    ("what will job 12 cost to finish", {}, "forecast_training_cost", {"job_id": "12"}),
    ("how long until it finishes?", CTX, "forecast_training_cost", {"job_id": JOB}),
    ("forecast the cost of mnist for 5 epochs", {}, "forecast_training_cost",
     {"trainer": "mnist", "params": {"epochs": 5}}),
    ("how much would training the llm for 500 steps cost", {}, "forecast_training_cost",
     {"trainer": "llm", "params": {"max_steps": 500}}),
    ("estimate remaining time for my last job", {}, "forecast_training_cost", {"job_id": "last"}),
    ("predict what it will cost", {}, ASK, {"missing": "job_id"}),
    ("what does an mnist run cost", {}, "forecast_training_cost", {"trainer": "mnist"}),
    # ---- advice
    ("how can I make my last mnist run cheaper?", {}, "recommend_cost_optimization",
     {"job_id": "last", "trainer": "mnist"}),
    ("any recommendations to save money?", {}, "recommend_cost_optimization", {"job_id": "last"}),
    ("optimise costs for run 0123456789abcdef0123456789abcdef", {}, "recommend_cost_optimization",
     {"run_id": "0123456789abcdef0123456789abcdef"}),
    ("advice on that job", CTX, "recommend_cost_optimization", {"job_id": JOB}),
    # ---- GPUs and resources
    ("any free GPUs?", {}, "get_gpu_availability", {}),
    ("how many gpus are available", {}, "get_gpu_availability", {}),
    ("are the gpus idle?", {}, "get_gpu_availability", {}),
    ("would mnist with 4 gpus fit?", {}, "validate_job_resources",
     {"trainer": "mnist", "params": {"num_workers": 4, "gpus_per_worker": 1.0}}),
    ("can I run llm on 2 workers", {}, "validate_job_resources", {"trainer": "llm", "params": {"num_workers": 2}}),
    ("validate a job with 3 gpus", {}, ASK, {"missing": "trainer"}),
    # ---- MLflow
    ("list experiments", {}, "list_mlflow_experiments", {}),
    ("what experiments do we have", {}, "list_mlflow_experiments", {}),
    ("show mnist accuracy of recent runs", {}, "get_experiment_metrics", {"experiment": "mnist"}),
    ("perplexity of the llm runs", {}, "get_experiment_metrics", {"experiment": "llm"}),
    ("metrics for run 0123456789abcdef0123456789abcdef", {}, "get_experiment_metrics",
     {"run_id": "0123456789abcdef0123456789abcdef"}),
    # ---- search
    ("tune mnist with 8 trials and a $0.05 budget", {}, "start_hyperparameter_search",
     {"trainer": "mnist", "num_samples": 8, "budget_usd": 0.05}),
    ("run a hyperparameter search on the llm", {}, "start_hyperparameter_search", {"trainer": "llm"}),
    ("sweep mnist learning rates, 3 epochs each", {}, "start_hyperparameter_search",
     {"trainer": "mnist", "params": {"epochs": 3}}),
    ("do a hyperparameter sweep", {}, ASK, {"missing": "trainer"}),
    # ---- models
    ("which models are registered?", {}, "list_models", {}),
    ("list the mnist model versions", {}, "list_models", {"name": "mnist"}),
    ("what versions of the llm do we have", {}, "list_models", {"name": "llm"}),
    ("show me the model registry", {}, "list_models", {}),
    ("deploy mnist version 2", {}, "deploy_model", {"name": "mnist", "version": "2"}),
    ("serve the champion llm", {}, "deploy_model", {"name": "llm", "alias": "champion"}),
    ("roll out v3 of the digits model", {}, "deploy_model", {"name": "mnist", "version": "3"}),
    ("deply mnist v2", {}, "deploy_model", {"name": "mnist", "version": "2"}),
    ("put mnist version 5 into production", {}, "deploy_model", {"name": "mnist", "version": "5"}),
    ("deploy the model", {}, ASK, {"missing": "name"}),
    # ---- memory across conversations
    ("has this failed before?", {}, "recall", {"kind": "failures", "job_id": None}),
    ("has it failed like this before?", CTX, "recall", {"kind": "failures", "job_id": JOB}),
    ("has mnist failed like this before?", {}, "recall", {"kind": "failures", "trainer": "mnist"}),
    ("did the llm crash again?", {}, "recall", {"kind": "failures", "trainer": "llm"}),
    ("what lr worked best for mnist last time?", {}, "recall", {"trainer": "mnist", "kind": None}),
    ("what learning rate worked last time?", {}, "recall", {"kind": None}),
    ("what do you remember about the language model", {}, "recall", {"trainer": "llm"}),
    ("why did team-b's jobs keep getting preempted last week?", {}, "recall",
     {"kind": "preemptions", "team": "team-b", "since": "7d"}),
    ("how often were my jobs preempted this month", {}, "recall", {"kind": "preemptions", "team": None,
                                                                   "since": "30d"}),
    ("remember that lr 0.003 works best for mnist", {}, "remember",
     {"text": "lr 0.003 works best for mnist", "trainer": "mnist"}),
    ("Remember: train the llm with 2 GPUs, cancel it if it costs over $5", {}, "remember",
     {"text": "train the llm with 2 GPUs, cancel it if it costs over $5", "trainer": "llm"}),
    (f"remeber that {JOB} had bad data", {}, "remember", {"text": f"{JOB} had bad data", "job_id": JOB}),
    ("forget that", CTX, "forget", {"item_id": "that"}),
    ("please forget note-1a2b3c4d", {}, "forget", {"item_id": "note-1a2b3c4d"}),
    # ---- out of scope
    ("what's the weather in Paris?", {}, DECLINE, {}),
    ("tell me a joke", {}, DECLINE, {}),
    ("rm -rf /", {}, DECLINE, {}),
    ("hello", {}, DECLINE, {}),
]


@pytest.mark.parametrize("message,context,expected,args", CASES, ids=[c[0][:40] for c in CASES])
def test_router_chooses_the_tool_and_arguments_or_asks_or_declines(message, context, expected, args):
    decision = Router().route(message, context)
    if expected == ASK:
        assert decision.kind == "ask" and decision.missing == args["missing"] and decision.text.endswith("?")
        return
    if expected == DECLINE:
        assert decision.kind == "decline" and "I can help with" in decision.text
        return
    assert (decision.kind, decision.tool) == ("call", expected), decision
    for key, value in args.items():
        if key == "params":
            assert {k: decision.args.get("params", {}).get(k) for k in value} == value, decision.args
        else:
            assert decision.args.get(key) == value, decision.args


def test_the_corpus_covers_every_tool_and_sixty_requests():
    from ray_apps.agent.tools import PlatformTools

    tools = {c[2] for c in CASES} - {ASK, DECLINE}
    assert tools == set(PlatformTools.catalog(PlatformTools.__new__(PlatformTools)))
    assert len(CASES) >= 60


def test_an_answer_to_a_question_completes_the_pending_request():
    router = Router()
    first = router.route("train something for 2 epochs")
    assert first.kind == "ask"
    pending = {"tool": first.tool, "args": first.args, "missing": first.missing, "question": first.text}
    second = router.route("mnist", {"pending": pending})
    assert (second.kind, second.tool, second.args["trainer"], second.args["params"]) == (
        "call", "trigger_training_job", "mnist", {"epochs": 2})
    again = router.route("hmm, not sure", {"pending": pending})
    assert again.kind == "ask" and again.text == first.text


def test_typos_are_fixed_only_against_the_vocabulary():
    assert normalise("Trian the mnsit modle, 3 epocs") == "train the mnist model , 3 epochs"
    assert "paris" in normalise("weather in paris")


# ---- bounded work and values: what a probe of the running agent sent

ADVERSARIAL = {
    "digits": "1" * 4000,
    "letters": "a" * 5000,
    "exponents": "1e" * 2000,
    "signed exponents": "1e-" * 1400,
    "dotted digits": "1." * 2000,
    "train train": "train " * 1000,
    "spaces": "train" + " " * 4000 + "mnist",
    "punctuation": "!?.,;:-$#" * 450,
    "would ... run": "would " * 700,
    "put ... production": "put in " * 600,
    "numbers and units": "1 epochs 2 gpus lr 3 batch 4 " * 150,
    "distinct near-typos": " ".join(f"tr{a}{b}n" for a in "abcdefghijklmnopqrstuvwxyz" for b in "aeiou") * 8,
    "dollars": "$" + "9" * 3999,
    "job refs": "job #" * 800,
}


@pytest.mark.parametrize("message", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_messages_route_quickly(message):
    import time

    start = time.perf_counter()
    decision = Router().route(message, {"job_id": JOB})
    assert time.perf_counter() - start < 0.5  # a bound, not a benchmark: before, 4,000 digits took seconds
    assert decision.kind in ("call", "ask", "decline")


@pytest.mark.parametrize("message,value,bounds", [
    ("train mnist for 1e999 epochs", "1e999", "from 1 to 100,000"),
    ("train mnist for -5 epochs", "-5", "from 1 to 100,000"),
    ("train mnist for 99999999999999999999 epochs", "99999999999999999999", "from 1 to 100,000"),
    ("train something for 1e999 epochs", "1e999", "from 1 to 100,000"),
    ("train mnist with lr 1e999", "1e999", "above 0 and at most 10"),
    ("train mnist with learning rate -0.01", "-0.01", "above 0 and at most 10"),
    ("train mnist on 1e999 gpus", "1e999 GPUs", "from 1 to 1,024"),
    ("train mnist on 0 workers with 2 gpus", "0", "from 1 to 1,024"),
    ("tune mnist with 1e400 trials", "1e400", "from 1 to 64"),
    ("check my budget of $1e999", "1e999", "above 0 and at most 1,000,000"),
])
def test_numbers_out_of_range_get_a_plain_answer_not_an_exception(message, value, bounds):
    decision = Router().route(message)
    assert decision.kind == "decline" and decision.tool is None, decision
    assert f"and {value}" in decision.text and bounds in decision.text


def test_numbers_in_range_still_pass():
    decision = Router().route("train mnist for 100000 epochs with lr 10 on 1024 gpus")
    assert decision.args["params"] == {"epochs": 100000, "lr": 10.0, "num_workers": 1024, "gpus_per_worker": 1.0}


def test_a_long_message_is_read_up_to_a_bound_and_the_answer_says_so():
    from ray_apps.agent.router import MAX_SCAN_CHARS

    long = "train mnist for 3 epochs " + "really " * 1000
    decision = Router().route(long)
    assert (decision.kind, decision.tool, decision.args["params"]) == ("call", "trigger_training_job", {"epochs": 3})
    assert f"{len(long.strip())} characters" in decision.note and "first" in decision.note
    # A number cut at the bound is left out, not read as its first digits.
    cut = "x" * (MAX_SCAN_CHARS - 30) + " train mnist for 12345678901234567890 epochs"
    decision = Router().route(cut)
    assert decision.kind == "call" and "epochs" not in decision.args["params"] and decision.note
    assert Router().route("train mnist for 3 epochs").note is None
