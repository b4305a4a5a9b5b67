"""Parameter importance from the stored Optuna study, with Optuna's own evaluators.

The space is conditional: every trial has ``backend``, and only the chosen backend's parameters
(``<backend>.<field>``). Two views are computed, both with Optuna's PED-ANOVA evaluator, whose
conditional variant (Optuna 5's default) is made for such spaces:

- ``all``: every complete trial and every parameter, ``backend`` included;
- one scope per backend: only that backend's complete trials and the parameters that varied
  among them, so a field is judged against its own backend's trials.

PED-ANOVA scores how much each parameter matters for reaching the best ``target_quantile`` of
trials; it needs a handful of trials in that top set, so a scope with fewer than ``min_trials``
complete trials is skipped and the reason is kept in :attr:`Importance.notes`. The target is the
study's objective, with infeasible trials ranked behind every feasible one (the constraint is
part of what "good" means), or the accuracy drop.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import optuna
    import pandas as pd

Target = Literal["objective", "accuracy_drop"]
CONSTRAINT_ATTR = "constraints:accuracy_drop"
# PED-ANOVA is stable with at least this many trials in its top quantile (Optuna's advice).
TOP_TRIALS = 5


@dataclass(frozen=True)
class Importance:
    """Importances as a table (``scope``, ``param``, ``importance``, ``trials``) and why scopes
    were skipped."""

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def open_study(study_dir: str | Path) -> optuna.Study:
    """Load the Optuna study stored in ``<study>/study.journal``; this module writes nothing to it.

    Raises:
        FileNotFoundError: when the folder has no journal.
    """
    import optuna

    study_dir = Path(study_dir)
    journal = study_dir / "study.journal"
    if not journal.is_file():
        raise FileNotFoundError(f"'{study_dir}' has no Optuna journal (study.journal)")
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    names = optuna.get_all_study_names(storage)
    info_file = study_dir / "study.json"
    wanted = json.loads(info_file.read_text()).get("study") if info_file.is_file() else None
    name = wanted if wanted in names else names[0] if len(names) == 1 else None
    if name is None:
        raise ValueError(f"'{journal}' holds studies {names}; cannot tell which is '{study_dir.name}'")
    return optuna.load_study(study_name=name, storage=storage)


def param_importance(
    study_dir: str | Path, *, target: Target = "objective", min_trials: int = 8
) -> Importance:
    """Compute parameter importances for the whole study and for each backend.

    Args:
        study_dir: the study folder.
        target: ``"objective"`` (infeasible trials ranked last) or ``"accuracy_drop"``.
        min_trials: complete trials a scope needs before its importances are computed.
    """
    import optuna
    import pandas as pd
    from optuna.trial import TrialState

    study = open_study(study_dir)
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    values = _targets(trials, target)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def evaluate(scope: str, chosen: list[Any], params: list[str]) -> None:
        if len(chosen) < min_trials:
            notes.append(f"{scope}: {len(chosen)} complete trials, fewer than the {min_trials} needed; skipped")
            return
        if not params:
            notes.append(f"{scope}: no parameter took more than one value; nothing to rank")
            return
        if len({values[t.number] for t in chosen}) == 1:
            notes.append(f"{scope}: every trial has the same {target}; nothing to rank")
            return
        sub = optuna.create_study(direction="minimize")
        sub.add_trials([_with_value(t, values[t.number]) for t in chosen])
        quantile = min(0.5, max(0.1, TOP_TRIALS / len(chosen)))
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
        with warnings.catch_warnings(record=True) as caught:  # PED-ANOVA's doubts belong in the notes
            warnings.simplefilter("always")
            scores = optuna.importance.get_param_importances(sub, evaluator=evaluator, params=params)
        notes.extend(dict.fromkeys(f"{scope}: {w.message}" for w in caught))
        if len(params) == 1:
            notes.append(f"{scope}: only {params[0]} varied, so its importance is 1 by construction")
        for param in params:
            rows.append({"scope": scope, "param": param, "importance": float(scores.get(param, 0.0)),
                         "trials": len(chosen), "target_quantile": quantile})

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each scratch study logs its creation
    try:
        evaluate("all", trials, _varying(trials, None))
        for backend in sorted({str(t.params["backend"]) for t in trials if t.params.get("backend") is not None}):
            chosen = [t for t in trials if t.params.get("backend") == backend]
            evaluate(backend, chosen, _varying(chosen, f"{backend}."))
    finally:
        optuna.logging.set_verbosity(verbosity)
    table = pd.DataFrame(rows, columns=["scope", "param", "importance", "trials", "target_quantile"])
    table = table.sort_values(["scope", "importance"], ascending=[True, False], ignore_index=True)
    return Importance(table=table, notes=notes)


def _targets(trials: list[Any], target: Target) -> dict[int, float]:
    """The value to rank each trial by (lower is better)."""
    if target == "accuracy_drop":
        # The stored constraint is accuracy_drop - max_drop: the same order as the drop itself.
        return {t.number: _constraint(t) for t in trials}
    if target != "objective":
        raise ValueError(f"unknown importance target '{target}'; use 'objective' or 'accuracy_drop'")
    objective = {t.number: float(t.values[0]) for t in trials}
    if not objective:
        return objective
    # Infeasible trials go behind every feasible one (shifted past the worst value by at least 1),
    # keeping their order among themselves.
    shift = max(objective.values()) - min(objective.values()) + 1.0
    return {t.number: objective[t.number] + (shift if _constraint(t) > 0 else 0.0) for t in trials}


def _constraint(trial: Any) -> float:
    """The trial's stored constraint value (accuracy_drop - max_drop; <= 0 is feasible)."""
    value = trial.system_attrs.get(CONSTRAINT_ATTR, 0.0)
    if isinstance(value, list | tuple):
        value = value[0] if value else 0.0
    return float(value)


def _varying(trials: list[Any], prefix: str | None) -> list[str]:
    """Parameters (with ``prefix``, or all) that took more than one value among ``trials``."""
    seen: dict[str, set[str]] = {}
    for trial in trials:
        for name, value in trial.params.items():
            if prefix is None or name.startswith(prefix):
                seen.setdefault(name, set()).add(repr(value))
    present = {name for name, vals in seen.items() if len(vals) > 1}
    if prefix is None:
        # A conditional parameter that is set in some trials and absent in others varies too.
        present |= {name for name in seen if any(name not in t.params for t in trials)}
    return sorted(present)


def _with_value(trial: Any, value: float) -> Any:
    import optuna

    return optuna.trial.create_trial(
        params=trial.params, distributions=trial.distributions, value=value, state=optuna.trial.TrialState.COMPLETE
    )
