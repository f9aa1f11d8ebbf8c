"""Every read of a private Ray or Optuna attribute, in one place.

Written against optuna 5.0.0 and ray 2.60.0 (the versions in constraints.txt). Each function
says why a public API does not do: when a pinned version moves, this module is the one to check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def reattach_trial(study: Any, number: int) -> Any:
    """A live ``optuna.Trial`` for a stored, still RUNNING trial of ``study``, by number.

    A searcher restored from a Tune checkpoint holds trial numbers only; Optuna has no public way
    to get a ``Trial`` (which ``tell``, ``set_user_attr`` and ``set_constraint`` need) back from a
    number except through its storage's trial id.
    """
    import optuna

    storage = study._storage
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def set_stored_user_attr(study: Any, frozen_trial: Any, key: str, value: Any) -> None:
    """Set a user attr on a stored trial that no live ``Trial`` object holds (closing orphans):
    ``FrozenTrial`` has no setter, so this goes through the storage with the trial's id."""
    study._storage.set_trial_user_attr(frozen_trial._trial_id, key, value)


def tuner_searcher(tuner: Any) -> Any:
    """The searcher object inside a restored ``ray.tune.Tuner`` (it carries the live-trial map),
    or None. ``Tuner.restore`` re-creates the search algorithm from its checkpoint but exposes it
    only through the local tuner's config."""
    try:
        alg = tuner._local_tuner._tune_config.search_alg
    except AttributeError:
        return None
    while alg is not None and not hasattr(alg, "study"):
        alg = getattr(alg, "searcher", None)
    return alg


def keep_ray_on_this_machine() -> None:
    """Make an already imported Ray treat this machine as the whole cluster: its node address
    becomes 127.0.0.1 and every server it starts binds loopback. Ray reads the switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``) into ``ray._private.ray_constants`` once, at import;
    the processes it starts read the environment variable, which the caller sets."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def tune_trial_folders(trials_root: Path | None, trial_id: str) -> list[Path]:
    """The folders where Ray Tune may have recorded a trial's error: first its staging folder on
    this (the driver's) machine, written the moment the trial fails (``<Ray session>/artifacts/
    <timestamp>/<experiment>/driver_artifacts/<trial folder>``, ``ray.train.constants``), then
    its folder under the study's storage (``trials_root``), where Tune copies it later."""
    from ray.train.constants import _get_ray_train_session_dir

    found: list[Path] = []
    try:
        staging = Path(_get_ray_train_session_dir())
        found += sorted(staging.glob(f"*/*/driver_artifacts/*{trial_id}*"))
    except Exception:  # noqa: BLE001 - Ray not started here: only the storage folder is left
        pass
    if trials_root is not None:
        found += sorted(Path(trials_root).glob(f"*/*{trial_id}*"))
    return found
