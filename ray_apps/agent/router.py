"""Understanding without a model: plain English to a tool call with typed arguments.

A deterministic intent router, a node of the agent's graph. It normalises the text
(lower case, number words, small typos fixed against a vocabulary), pulls out the
values people give (trainer, epochs, learning rate, GPUs, priority, job ids,
amounts, periods) and picks the tool by the words that signal each intent, most
specific first. When a required value is missing it asks one short question and
remembers what it was doing; when nothing matches it says what it can do.

Its work is bounded by construction: it reads at most MAX_SCAN_CHARS of a message,
every pattern runs in time linear in the text (numbers start only at the start of a
digit run and never backtrack; no `.*` between words), and every number it passes on
is finite and in range, else it says which value and what range it takes.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from trainers.specs import TRAINERS, default_trainer, router_phrases, router_words, servable, tunable, user_trainers

CAPABILITIES = (f"start or queue training ({', '.join(user_trainers())}), job status and the queue, cancel jobs, "
                "MLflow experiments and metrics, a job's cost, spend reports, budgets, cost forecasts, savings "
                "advice, free GPUs, checking whether a job fits, hyperparameter searches, registered models, "
                "deploying a model version, and remembering across conversations (past failures, what worked, "
                "preemptions, notes you ask me to keep or forget)")


def _one_of(names: tuple[str, ...]) -> str:
    return "|".join(map(re.escape, names))


# A job's id starts with its trainer's name, a search's with tune-<trainer>.
JOB_ID = re.compile(rf"\b(?:{_one_of(tuple(TRAINERS))}|tune-(?:{_one_of(tunable())}))-\d{{8}}-\d{{6}}-[0-9a-f]{{6}}"
                    r"(?:-r\d+)?\b")
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")
# A number starts where a digit run starts (a sign only where a word does not end) and its parts
# are possessive: a run of digits is tried once, not once per position and split.
NUMBER = r"((?:(?<![\w.-])-)?+(?<![\d.])\d++(?:\.\d++)?+(?:e-?\d++)?+)"
MAX_SCAN_CHARS = 1000  # a request is a sentence or two; the HTTP layer admits up to agent.max_message_chars
MAX_TYPO_LEN = 20      # longer than any vocabulary word: never a typo of one
WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
         "nine": "9", "ten": "10", "twelve": "12", "twenty": "20", "a couple of": "2", "a single": "1"}
VOCAB = sorted(set("""train training trainer run runs running start launch kick queue queued schedule submit status
progress cancel stop kill abort cost costs spend spent spending price budget forecast predict estimate finish remaining
gpu gpus free available idle experiment experiments metric metrics accuracy loss perplexity recommend recommendation
recommendations optimize optimise saving savings cheaper validate feasible search tune tuning hyperparameter
hyperparameters sweep finetune epochs epoch steps learning rate batch size workers worker priority high normal urgent
report week month today jobs job last latest pending waiting finished done please model models dollars
deploy registered registry version versions champion promote
remember forget memory memories before worked failed failure failures preempted preemption why stuck
""".split()) | set(user_trainers()))  # a trainer's name is worth fixing a typo towards ("mnsit")
TRAINER_WORDS = router_words()
TRAINER_PHRASES = router_phrases()
# Words that also set a parameter of the trainer they go with: (trainer, word) -> (field, value).
WORD_PARAMS = {(name, word): (param, value) for name, cls in TRAINERS.items()
               for word, param, value in cls.entry.word_params}
MEMORY_ID = re.compile(r"\b(?:note|fail)-[0-9a-f]{6,12}\b")
NOT_TEAMS = {"it", "what", "that", "there", "here", "who", "let", "he", "she", "one", "today", "yesterday", "week",
             "month", "year", "everyone", "nobody", "somebody", "someone"}
REF_WORDS = re.compile(r"\b(it|that|this|the same|that job|this job|that run|the job|the run)\b")
# What each number may be, as the tools take it: (lowest, highest, whole number, lowest excluded).
# Trainer fields follow the catalog's bounds (trainers/specs.py; a unit test keeps them equal);
# unbounded ones get a generous cap so a typed 1e20 is refused here rather than queued.
LIMITS: dict[str, tuple[float, float, bool, bool]] = {
    "epochs": (1, 100_000, True, False),
    "lr": (0, 10, False, True),
    "batch_size": (1, 1_000_000, True, False),
    "max_steps": (1, 100_000_000, True, False),
    "train_samples": (1, 100_000_000, True, False),
    "width": (1, 512, True, False),
    "num_workers": (1, 1024, True, False),
    "cpus_per_worker": (1, 512, False, False),
    "gpus_per_worker": (0, 64, False, False),
    "num_samples": (1, 64, True, False),
    "budget_usd": (0, 1_000_000, False, True),
}
LABELS = {"epochs": "The number of epochs", "lr": "The learning rate", "batch_size": "The batch size",
          "max_steps": "The number of steps", "train_samples": "The number of training samples",
          "width": "The width", "num_workers": "The number of workers", "cpus_per_worker": "CPUs per worker",
          "gpus_per_worker": "GPUs per worker", "num_samples": "The number of trials",
          "budget_usd": "A budget in USD"}


@dataclass
class Decision:
    kind: str                          # "call", "ask" or "decline"
    tool: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    text: str | None = None            # the question, or what I can do
    missing: str | None = None         # for "ask": the value still needed
    note: str | None = None            # said with the answer, e.g. that the message was cut


def normalise(text: str) -> str:
    text = text.lower().replace("’", "'")
    text = re.sub(r"\bfine[- ]?tun(e|ing)\b", "finetune", text)  # fine-tuning is training, not a search
    for word, digit in WORDS.items():
        text = re.sub(rf"\b{word}\b", digit, text)
    out = []
    for token in re.findall(r"[\w.$/:'-]+|[^\w\s]", text):
        if token.isalpha() and 4 <= len(token) <= MAX_TYPO_LEN and token not in VOCAB and \
                token not in TRAINER_WORDS:
            token = _fix_typo(token)
        out.append(token)
    return " ".join(out)


@functools.lru_cache(maxsize=4096)
def _fix_typo(token: str) -> str:
    # Typos keep their first letter ("trian", "mnsit"); "each" is not "search".
    close = [w for w in difflib.get_close_matches(token, VOCAB, n=3, cutoff=0.8) if w[0] == token[0]]
    return close[0] if close else token


def _number(raw: str, whole: bool) -> int | float:
    """The number as the tools take it; a non-finite one stays a float for `out_of_range` to refuse."""
    value = float(raw)  # digits only (NUMBER): a huge exponent gives inf, never an exception
    return int(value) if whole and math.isfinite(value) else value


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def out_of_range(args: dict, raw: dict[str, str]) -> str | None:
    """A plain sentence about the first number of a call's arguments that no tool would take."""
    values = {**{k: v for k, v in args.items() if k != "params"}, **(args.get("params") or {})}
    for name, value in values.items():
        if name not in LIMITS or not isinstance(value, (int, float)):
            continue
        low, high, whole, open_low = LIMITS[name]
        if math.isfinite(value) and (low < value if open_low else low <= value) and value <= high:
            continue
        bounds = f"above {_fmt(low)} and at most {_fmt(high)}" if open_low else f"from {_fmt(low)} to {_fmt(high)}"
        shown = raw.get(name, f"{value:g}" if isinstance(value, float) else str(value))
        return (f"{LABELS[name]} must be {'a whole number' if whole else 'a number'} {bounds}, and {shown} is "
                "not: please ask again with a value in that range.")
    return None


def _has(text: str, *patterns: str) -> bool:
    return any(re.search(rf"\b(?:{p})\b", text) for p in patterns)


def extract(text: str) -> dict[str, Any]:
    """Every value the text gives, under the names the tools use."""
    found: dict[str, Any] = {}
    words = re.findall(r"[a-z0-9]+", text)
    trainers = {TRAINER_WORDS[w] for w in words if w in TRAINER_WORDS}
    trainers |= {name for phrase, name in TRAINER_PHRASES.items() if phrase in text}
    if len(trainers) == 1:
        found["trainer"] = trainers.pop()
    params: dict[str, Any] = {}
    raw: dict[str, str] = {}  # the numbers as written, to name them if out of range
    for name, pattern, whole in (
            ("epochs", rf"{NUMBER}\s*(?:epochs?|passes)", True),
            ("lr", rf"(?:\blr|learning rate)\s*(?:of|=|:|at)?\s*{NUMBER}", False),
            ("batch_size", rf"batch(?: size)?\s*(?:of|=|:)?\s*{NUMBER}", True),
            ("max_steps", rf"{NUMBER}\s*steps", True),
            ("train_samples", rf"{NUMBER}\s*(?:samples|images|examples)", True),
            ("width", rf"width\s*(?:of|=|:)?\s*{NUMBER}", True),
            ("num_workers", rf"{NUMBER}\s*workers?", True),
            ("cpus_per_worker", rf"{NUMBER}\s*cpus?", False)):
        m = re.search(pattern, text)
        if m:
            params[name], raw[name] = _number(m.group(1), whole), m.group(1)
    gpus = re.search(rf"{NUMBER}\s*gpus?\b", text) or re.search(r"\b(?:a|one|single)\s+gpu\b", text)
    if gpus and not _has(text, "free", "available", "idle"):
        n = _number(gpus.group(1), True) if gpus.groups() else 1
        if "num_workers" not in params:  # N GPUs: N data-parallel workers with one GPU each
            params["num_workers"] = n
            if gpus.groups():
                raw["num_workers"] = f"{gpus.group(1)} GPUs (a worker each)"
        workers = params["num_workers"]
        if workers == n or not (math.isfinite(n) and math.isfinite(workers) and workers > 0):
            params["gpus_per_worker"] = 1.0  # a bad count is refused by name (num_workers), not divided by
        else:
            params["gpus_per_worker"] = n / workers
    for word in words:
        if (found.get("trainer"), word) in WORD_PARAMS:
            param, value = WORD_PARAMS[found["trainer"], word]
            params[param] = value
    if params:
        found["params"] = params
    found["raw"] = raw
    if _has(text, "high", "urgent", "asap", "top"):
        found["priority"] = "high"
    elif _has(text, "low", "background", "whenever"):
        found["priority"] = "low"
    elif _has(text, "normal"):
        found["priority"] = "normal"
    money = re.search(rf"\$\s*{NUMBER}|{NUMBER}\s*(?:usd|dollars?|bucks)", text)
    if money:
        raw["budget_usd"] = money.group(1) or money.group(2)
        found["budget_usd"] = _number(raw["budget_usd"], False)
    trials = re.search(rf"{NUMBER}\s*(?:trials|configs|configurations|samples)", text)
    if trials:
        raw["num_samples"] = trials.group(1)
        found["num_samples"] = _number(trials.group(1), True)
    found.update(_period(text))
    return found


def _period(text: str) -> dict[str, str]:
    m = re.search(r"(?:last|past)\s+(\d++)\s*(day|days|d|hours?|h|weeks?|w)\b", text) or \
        re.search(r"\b(\d++)\s*(d|h|w)\b", text)
    if m:
        return {"since": f"{m.group(1)}{m.group(2)[0]}"}
    for words, since in (("today", "1d"), ("this week|last week|past week|weekly", "7d"),
                         ("this month|last month|past month|monthly", "30d"), ("this year|last year", "365d")):
        if _has(text, words):
            return {"since": since}
    return {}


def _job_ref(raw: str, text: str, context: dict) -> str | None:
    m = JOB_ID.search(raw)
    if m:
        return m.group(0)
    m = re.search(r"\bjob\s+#?([0-9a-z]{1,12})\b", text)
    if m and m.group(1) not in ("status", "queue", "cost", "costs", "is", "was", "will", "did", "still", "stuck",
                                "waiting", "queued", "pending", "not", "hasn"):
        return m.group(1)
    # "the last job", not "the last 3 days" / "last week"
    if re.search(r"\b(?:last|latest|most recent|previous)\b(?!\s+(?:\d|days?|weeks?|months?|hours?|years?)\b)", text):
        return "last"
    if REF_WORDS.search(text) and context.get("job_id"):
        return context["job_id"]
    return None


def _or(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else "".join(choices)


def _needs_trainer(tool: str, args: dict, question: str) -> Decision:
    return Decision("ask", tool, args, question, missing="trainer")


def _before(text: str, first: str, then: str) -> bool:
    """`first` somewhere before `then`: what `first .* then` says, in linear time."""
    a = re.search(rf"\b(?:{first})\b", text)
    return bool(a and re.search(rf"\b(?:{then})\b", text[a.end():]))


def _cut(message: str) -> tuple[str, str | None]:
    """The part of a message the router reads, and what to tell the user when that is not all of it."""
    text = message.strip()
    if len(text) <= MAX_SCAN_CHARS:
        return text, None
    head = text[:MAX_SCAN_CHARS]
    if not text[MAX_SCAN_CHARS].isspace() and re.search(r"\s", head):
        head = head.rsplit(None, 1)[0]  # a word or number cut in two would be misread: leave it out
    return head, (f"(Your message is {len(text)} characters long; I read only the first {len(head)}: "
                  "please keep a request to a sentence or two.)")


class Router:
    def route(self, message: str, context: dict | None = None) -> Decision:
        context = context or {}
        raw, note = _cut(message)
        text = normalise(raw)
        values = extract(text)
        pending = context.get("pending")
        if pending and not self._has_intent(text):
            decision = self._complete(pending, values, text)
        else:
            decision = self._decide(raw, text, values, context)
        if decision.kind in ("call", "ask"):
            refusal = out_of_range(decision.args, values["raw"])
            if refusal:
                decision = Decision("decline", text=refusal)
        decision.note = note
        return decision

    @staticmethod
    def _has_intent(text: str) -> bool:
        return bool(re.search(r"\b(train|run|start|launch|queue|status|cancel|stop|cost|spend|budget|forecast|gpu|"
                              r"gpus|experiments?|metrics?|recommend|search|tune|validate|report|deploy|models?|remember|"
                              r"forget|recall)\b",
                              text))

    def _complete(self, pending: dict, values: dict, text: str) -> Decision:
        """The user answered my question: fill in what was missing and carry on."""
        args = dict(pending["args"])
        missing = pending["missing"]
        if missing == "trainer" and "trainer" in values:
            args["trainer"] = values["trainer"]
            if "params" in values:
                args["params"] = {**args.get("params", {}), **values["params"]}
            return Decision("call", pending["tool"], args)
        if missing == "name" and "trainer" in values:
            return Decision("call", pending["tool"], {**args, "name": values["trainer"]})
        if missing == "job_id":
            m = JOB_ID.search(text) or re.search(r"\b([0-9a-z]{4,12})\b", text)
            if m:
                args["job_id"] = m.group(0) if JOB_ID.search(text) else m.group(1)
                return Decision("call", pending["tool"], args)
        return Decision("ask", pending["tool"], args, pending.get("question"), missing=missing)

    def _memory(self, raw: str, text: str, v: dict, context: dict) -> Decision | None:
        """Remember, forget, recall: tried first, since a note's own words may name any other intent."""
        trainer = {"trainer": v["trainer"]} if "trainer" in v else {}
        if re.match(r"(?:please )?(?:remember|note|keep in mind)\b", text):
            body = re.sub(r"^\s*(?:please\s+)?\S+(?:\s+in\s+mind)?\s*(?:that\b|:|,)?\s*", "", raw, flags=re.I)
            if len(body) < 3:
                return Decision("decline", text="What should I remember? Say e.g. 'remember that lr 0.003 works "
                                                "best for mnist'.")
            job = JOB_ID.search(raw)
            return Decision("call", "remember", {"text": body, **trainer, **({"job_id": job.group(0)} if job else {})})
        if re.match(r"\s*(?:please\s+)?forget\b", raw, re.I):  # as typed: "forgot ..." is no request
            named = MEMORY_ID.search(raw) or JOB_ID.search(raw)
            if not named and _has(text, "everything", "all"):
                return Decision("decline", text="I forget one memory at a time: say 'forget that' after I recall "
                                                "or remember it, or give its id (note-..., fail-..., a job id).")
            return Decision("call", "forget", {"item_id": named.group(0) if named else "that"})
        if _has(text, "preempt", "preempted", "preempting", "preemptions?"):
            team = re.search(r"\b([a-z0-9][\w-]*)'s\b", text) or re.search(r"\b(?:tenant|team) ([a-z0-9][\w-]*)", text)
            who = {"team": team.group(1)} if team and team.group(1) not in NOT_TEAMS else {}
            return Decision("call", "recall", {"kind": "preemptions", "since": v.get("since", "7d"), **who, **trainer})
        if _has(text, "fail", "failed", "fails", "failing", "failures?", "crash", "crashed", "crashes", "errors?") and \
                _has(text, "before", "again", "like this", "like that", "previously", "in the past", "ever",
                     "last time", "history", "similar", "same"):
            job = JOB_ID.search(raw)
            ref = job.group(0) if job else (context.get("job_id") if REF_WORDS.search(text) else None)
            return Decision("call", "recall", {"kind": "failures", **trainer, **({"job_id": ref} if ref else {})})
        if _has(text, "do you remember", "what do you remember", "what did i tell you", "what have i told you",
                "recall", "your memory", "memories", "what do you know about"):
            return Decision("call", "recall", {**trainer})
        if _has(text, "worked", "works", "work best", "worked best", "last time", "previously") and \
                (_has(text, "what", "which", "how", "did", "do") or "?" in text):
            return Decision("call", "recall", {**trainer})
        return None

    def _decide(self, raw: str, text: str, v: dict, context: dict) -> Decision:
        remembered = self._memory(raw, text, v, context)
        if remembered:
            return remembered
        job = _job_ref(raw, text, context)
        run = RUN_ID.search(raw)
        trainer = v.get("trainer")
        params = v.get("params", {})

        if _has(text, "cancel", "abort", "kill", "stop"):
            if _has(text, "queued", "all", "pending", "waiting", "every"):
                return Decision("call", "cancel_job", {"scope": "queued"})
            if job and job != "last":
                return Decision("call", "cancel_job", {"job_id": job})
            return Decision("ask", "cancel_job", {}, "Which job should I cancel (its id, or all your queued "
                                                     "jobs)?", missing="job_id")
        if (_has(text, "deploy", "serve", "serving", "roll ?out", "promote") or
                _before(text, "put", "(?:in|into) production")) and not _has(text, "train", "training"):
            version = re.search(r"\bv(?:ersion)?\s*#?(\d+)\b", text)
            alias = re.search(r"\b(?:alias|tag(?:ged)?)\s+['\"]?([a-z][\w-]*)", text) or \
                re.search(r"\b(champion|challenger|production|staging)\b", text)
            args = {**({"version": version.group(1)} if version else {}),
                    **({"alias": alias.group(1)} if alias and not version else {})}
            if not trainer:
                return Decision("ask", "deploy_model", args, f"Deploy which model: {_or(servable())}?",
                                missing="name")
            return Decision("call", "deploy_model", {"name": trainer, **args})
        if _has(text, "tune", "tuning", "hyperparameters?", "sweep", "search", "hpo"):
            args = {**({"num_samples": v["num_samples"]} if "num_samples" in v else {}),
                    **({"budget_usd": v["budget_usd"]} if "budget_usd" in v else {}),
                    **({"params": params} if params else {})}
            if not trainer:
                return _needs_trainer("start_hyperparameter_search", args,
                                      f"Search over which trainer: {_or(tunable())}?")
            return Decision("call", "start_hyperparameter_search", {"trainer": trainer, **args})
        if _has(text, "recommend", "recommendations?", "optimi[sz]e", "savings?", "save money", "cheaper",
                "advice", "advise", "reduce (?:the )?costs?", "cut costs?"):
            if run:
                return Decision("call", "recommend_cost_optimization", {"run_id": run.group(0)})
            return Decision("call", "recommend_cost_optimization",
                            {"job_id": job or "last", **({"trainer": trainer} if trainer else {})})
        if _has(text, "forecast", "predict", "estimate", "how long", "remaining", "eta", "to finish", "left") or \
                (_has(text, "will", "would") and _has(text, "costs?", "take", "price")):
            if job:
                return Decision("call", "forecast_training_cost",
                                {"job_id": job, **({"trainer": trainer} if trainer and job == "last" else {})})
            if trainer:
                return Decision("call", "forecast_training_cost", {"trainer": trainer, "params": params})
            return Decision("ask", "forecast_training_cost", {}, "Which job should I forecast (its id), or which "
                                                                 "trainer and settings (e.g. mnist for 5 epochs)?",
                            missing="job_id")
        if _has(text, "budget"):
            return Decision("call", "check_training_budget",
                            {k: v[k] for k in ("budget_usd", "since") if k in v})
        if _has(text, "report", "breakdown", "spend", "spent", "spending", "per tenant", "by tenant", "by day") \
                and not job:
            args = {"since": v.get("since", "30d")}
            if _has(text, "by day", "per day", "daily"):
                args["group_by"] = "day"
            elif _has(text, "by tenant", "per tenant", "per team", "by team"):
                args["group_by"] = "tenant"
            return Decision("call", "get_cost_report", args)
        if _has(text, "costs?", "price", "how much", "expensive", "dollars"):
            if job:
                return Decision("call", "calculate_training_cost",
                                {"job_id": job, **({"trainer": trainer} if trainer and job == "last" else {})})
            if trainer:  # "how much does mnist cost": before it runs, that is a forecast
                return Decision("call", "forecast_training_cost", {"trainer": trainer, "params": params})
            return Decision("call", "get_cost_report", {"since": v.get("since", "30d")})
        if _has(text, "validate", "feasible", "fit", "fits", "enough resources", "can i run", "is there room") or \
                _before(text, "would", "run"):
            if not trainer:
                return _needs_trainer("validate_job_resources", {"params": params},
                                      f"Check which trainer: {_or(user_trainers())}?")
            return Decision("call", "validate_job_resources", {"trainer": trainer, "params": params})
        if _has(text, "gpus?", "accelerators?", "cuda") and not trainer:
            return Decision("call", "get_gpu_availability", {})
        if _has(text, "why") and _has(text, "waiting", "pending", "queued", "stuck", "not running", "not started",
                                      "wait", "hasn't started", "not start", "still queued"):
            return Decision("call", "why_is_job_waiting",
                            {"job_id": job or "last", **({"trainer": trainer} if trainer and not job else {})})
        if _has(text, "queue", "waiting", "pending", "what's running", "what is running", "my jobs", "jobs") and \
                not _has(text, "train", "start", "launch", "submit") and not job:
            return Decision("call", "get_job_queue_status", {})
        if _has(text, "status", "progress", "how is", "how's", "doing", "done yet", "finished", "state") and \
                not _has(text, "train", "start", "launch"):
            if job:
                return Decision("call", "get_training_status",
                                {"job_id": job, **({"trainer": trainer} if trainer and job == "last" else {})})
            return Decision("call", "get_training_status", {"job_id": "last",
                                                            **({"trainer": trainer} if trainer else {})})
        if _has(text, "models?", "registry", "registered", "versions?") and not params and \
                not _has(text, "train", "start", "launch", "kick off", "queue", "finetune"):
            return Decision("call", "list_models", {"name": trainer} if trainer else {})
        if _has(text, "experiments?") and not _has(text, "metrics?", "accuracy", "loss", "perplexity", "best"):
            return Decision("call", "list_mlflow_experiments", {})
        if _has(text, "metrics?", "accuracy", "loss", "perplexity", "best run", "results?"):
            if run:
                return Decision("call", "get_experiment_metrics", {"run_id": run.group(0)})
            return Decision("call", "get_experiment_metrics", {"experiment": trainer or default_trainer()})
        if _has(text, "train", "training", "run", "start", "launch", "kick off", "fine tune", "finetune", "queue",
                "schedule", "submit") or (trainer and params):
            queued = "priority" in v or _has(text, "queue", "schedule", "submit")
            tool = "queue_training_job" if queued else "trigger_training_job"
            args = {"params": params, **({"priority": v["priority"]} if queued and "priority" in v else {})}
            if not trainer:
                return _needs_trainer(tool, args, "Which trainer: " + _or(
                    tuple(f"{name} ({TRAINERS[name].entry.summary})" for name in user_trainers())) + "?")
            return Decision("call", tool, {"trainer": trainer, **args})
        return Decision("decline", text=f"I didn't understand that. I can help with: {CAPABILITIES}.")
