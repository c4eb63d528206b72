"""M-Fed's λ schedule for the encoder pull: optional per-task freeze and negative-transfer switch.

The client objective is ``ℓ_t(θ) + λ_r · ‖θ_enc − g‖²`` (λ, not λ/2): clients compute it with
``proximal_term(model.named_parameters(), g, coefficient=λ_r)``, whose gradient is
``2 λ_r (θ_enc − g)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SCHEDULE_KINDS = ("exponential", "constant")


@dataclass
class _TaskState:
    """What the schedule remembers about one task (plain python values, checkpointable)."""

    higher_is_better: bool | None = None
    best: float | None = None
    last_round: int | None = None
    bad_rounds: int = 0
    # (round, pull_on) pairs: the pull is switched on/off for every round after ``round``.
    switches: list[tuple[int, bool]] = field(default_factory=list)
    frozen_at: int | None = None

    def pull_on(self, server_round: int) -> bool:
        """Return whether the pull is active during ``server_round``."""
        state = True
        for at, on in self.switches:
            if at < server_round:
                state = on
        return state

    def to_dict(self) -> dict[str, Any]:
        return {
            "higher_is_better": self.higher_is_better,
            "best": self.best,
            "last_round": self.last_round,
            "bad_rounds": self.bad_rounds,
            "switches": [[at, on] for at, on in self.switches],
            "frozen_at": self.frozen_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _TaskState:
        return cls(
            higher_is_better=data["higher_is_better"],
            best=data["best"],
            last_round=data["last_round"],
            bad_rounds=int(data["bad_rounds"]),
            switches=[(int(at), bool(on)) for at, on in data["switches"]],
            frozen_at=data["frozen_at"],
        )


def _relative_worsening(metric: float, best: float, higher_is_better: bool) -> float:
    """How much worse ``metric`` is than ``best``, relative to ``|best|`` (≤ 0: not worse)."""
    worse_by = best - metric if higher_is_better else metric - best
    if best == 0:
        return math.inf if worse_by > 0 else 0.0
    return worse_by / abs(best)


@dataclass
class LambdaSchedule:
    """The pull strength ``λ_r`` per task and round (rounds count from 1).

    Schedule
        ``"exponential"``: ``λ_r = min(λ_max, λ_0 · growth^(r−1))``;
        ``"constant"``: ``λ_r = constant``.

    Freeze (optional, exponential only, ``freeze_epsilon`` set)
        After :meth:`observe_alignment` reports, for round ``f``, a task-global encoder with
        ``‖θ_enc − g‖² / ‖g‖² < freeze_epsilon``, that task's λ stops growing: ``λ_r = λ_f`` for
        ``r > f`` (cross-task sharing is deemed sufficient).

    Negative-transfer switch (optional, ``threshold`` set)
        Each task keeps its running best validation metric (direction from ``higher_is_better``).
        A round is *bad* when the pull was on during it and the task's metric is worse than the
        best of the earlier rounds by more than ``threshold`` relative to ``|best|``. After
        ``patience`` consecutive bad rounds the pull is switched off (λ = 0) for that task; it is
        switched back on once the task, trained without the pull, matches or beats its best
        again. The gap between the two conditions (worse than best by > threshold vs. back at best)
        keeps the switch from flapping on noise. A switch observed for round ``r`` takes effect
        from round ``r + 1``; earlier rounds keep their λ, so :meth:`lambda_for` is a pure function
        of the state and the round.

    Parameters
    ----------
    kind : {"exponential", "constant"}
        The schedule's form.
    lambda_0 : float
        ``λ_1`` of the exponential schedule.
    growth : float
        Per-round factor of the exponential schedule.
    lambda_max : float
        Cap of the exponential schedule.
    constant : float
        λ of the constant schedule (e.g. 0.01 / 0.1 / 1.0 in sensitivity runs).
    freeze_epsilon : float, optional
        Relative squared distance below which a task's λ stops growing; None disables.
    threshold : float, optional
        Relative worsening that counts as a bad round; None disables the switch.
    patience : int
        Consecutive bad rounds before the pull is switched off.
    """

    kind: str = "exponential"
    lambda_0: float = 1e-3
    growth: float = 1.2
    lambda_max: float = 1.0
    constant: float = 0.01
    freeze_epsilon: float | None = None
    threshold: float | None = None
    patience: int = 1
    _tasks: dict[str, _TaskState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.lambda_0 <= 0 or self.growth <= 0 or self.lambda_max <= 0:
            raise ValueError("lambda_0, growth and lambda_max must be positive")
        if self.constant < 0:
            raise ValueError(f"constant must be >= 0, got {self.constant}")
        if self.freeze_epsilon is not None and self.freeze_epsilon <= 0:
            raise ValueError(f"freeze_epsilon must be positive, got {self.freeze_epsilon}")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    def _exponential(self, server_round: int) -> float:
        # In log space: growth^(r−1) overflows a float long before r is unreasonable.
        log_lambda = math.log(self.lambda_0) + (server_round - 1) * math.log(self.growth)
        if log_lambda >= math.log(self.lambda_max):
            return self.lambda_max
        return math.exp(log_lambda)

    def lambda_for(self, task: str, server_round: int) -> float:
        """Return the λ that clients of ``task`` use in ``server_round`` (0 if switched off).

        Parameters
        ----------
        task : str
            The task name.
        server_round : int
            The round, counting from 1.
        """
        if server_round < 1:
            raise ValueError(f"rounds count from 1, got {server_round}")
        state = self._tasks.get(task)
        if state is not None and not state.pull_on(server_round):
            return 0.0
        if self.kind == "constant":
            return self.constant
        if state is not None and state.frozen_at is not None:
            return self._exponential(min(server_round, state.frozen_at))
        return self._exponential(server_round)

    def observe(self, task: str, server_round: int, metric: float, higher_is_better: bool) -> None:
        """Feed ``task``'s validation metric after ``server_round`` to the negative-transfer switch.

        Call once per task and round, in increasing round order, before asking
        :meth:`lambda_for` about round ``server_round + 1``. A no-op when ``threshold`` is None.

        Parameters
        ----------
        task : str
            The task name.
        server_round : int
            The round whose model was evaluated.
        metric : float
            The task's primary validation metric (e.g. averaged over its clients).
        higher_is_better : bool
            The metric's direction; must be the same on every call for one task.
        """
        if self.threshold is None:
            return
        if not math.isfinite(metric):
            raise ValueError(f"task {task!r}: metric of round {server_round} is {metric}")
        state = self._tasks.setdefault(task, _TaskState())
        if state.last_round is not None and server_round <= state.last_round:
            raise ValueError(
                f"task {task!r}: round {server_round} observed after round {state.last_round}"
            )
        if state.higher_is_better is not None and state.higher_is_better != higher_is_better:
            raise ValueError(f"task {task!r}: higher_is_better changed between rounds")
        state.higher_is_better = higher_is_better
        state.last_round = server_round
        if state.best is None:
            state.best = metric
            return
        worsening = _relative_worsening(metric, state.best, higher_is_better)
        if state.pull_on(server_round):
            state.bad_rounds = state.bad_rounds + 1 if worsening > self.threshold else 0
            if state.bad_rounds >= self.patience:
                state.switches.append((server_round, False))
                state.bad_rounds = 0
        elif worsening <= 0:
            state.switches.append((server_round, True))
        if worsening < 0:
            state.best = metric

    def observe_alignment(self, task: str, server_round: int, relative_distance: float) -> None:
        """Freeze ``task``'s λ once its encoder is within ``freeze_epsilon`` of g.

        A no-op when ``freeze_epsilon`` is None or the task is already frozen.

        Parameters
        ----------
        task : str
            The task name.
        server_round : int
            The round after whose aggregation the distance was measured.
        relative_distance : float
            ``‖enc(θ_t^glob) − g‖² / ‖g‖²`` (see ``two_tier.relative_squared_distance``).
        """
        if self.freeze_epsilon is None:
            return
        state = self._tasks.setdefault(task, _TaskState())
        if state.frozen_at is None and relative_distance < self.freeze_epsilon:
            state.frozen_at = server_round

    def state_dict(self) -> dict[str, Any]:
        """Return the per-task state as plain python values (JSON-serialisable)."""
        return {"tasks": {task: state.to_dict() for task, state in self._tasks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the per-task state with one returned by :meth:`state_dict`."""
        try:
            tasks = {task: _TaskState.from_dict(data) for task, data in state["tasks"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"malformed λ-schedule state: {err!r}") from err
        self._tasks = tasks
