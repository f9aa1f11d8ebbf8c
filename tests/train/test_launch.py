"""Where a trial trains: local mode for one worker, a worker group for several; the trial-process
path keeps its checkpoints in the Train run folder and resumes from the latest periodic one."""

from __future__ import annotations

import json

from emtune.train.launch import RunFolderCheckpoints


def _folder(tmp_path, name: str, periodic: bool, step: int = 0):
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_text(name)
    if periodic:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_run_folder_checkpoints_number_resume_and_ignore_partial_copies(tmp_path) -> None:
    store = RunFolderCheckpoints(tmp_path / "train-abc")
    assert store.saved() == [] and store.resumable() is None
    first = store.save(_folder(tmp_path, "a", periodic=True, step=5))
    second = store.save(_folder(tmp_path, "b", periodic=True, step=10))
    assert [p.name for p in store.saved()] == ["checkpoint_000000", "checkpoint_000001"]
    assert store.resumable() == second and (second / "adapter_model.safetensors").read_text() == "b"
    (tmp_path / "train-abc" / ".partial-checkpoint_000002").mkdir()  # a copy cut short by a kill
    final = store.save(_folder(tmp_path, "c", periodic=False))
    assert final.name == "checkpoint_000002" and store.resumable() == second  # the final one has no Trainer state
    assert first.is_dir()


def test_trainer_for_runs_one_worker_in_the_trial_process_and_several_in_a_worker_group(write_spec, tmp_path) -> None:
    from emtune.config import ResourcesSpec, load_spec
    from emtune.study.trial import trainer_for
    from emtune.train.launch import train_in_trial_process, train_loop_per_worker

    spec = load_spec(write_spec())
    config = {"model_source": "x", "cache_dir": str(tmp_path)}
    local = trainer_for(spec, "t1", config)
    assert local.scaling_config.num_workers == 0 and local.running_in_local_mode
    assert local.train_loop_per_worker is train_in_trial_process
    assert local.train_loop_config["run_dir"].endswith("ray_results/train/train-t1")
    grouped = spec.model_copy(update={"resources": ResourcesSpec(num_workers=2)})
    workers = trainer_for(grouped, "t2", config)
    assert workers.scaling_config.num_workers == 2 and not workers.running_in_local_mode
    assert workers.train_loop_per_worker is train_loop_per_worker
    forced = spec.model_copy(update={"resources": ResourcesSpec(train_process="workers")})
    assert trainer_for(forced, "t3", config).scaling_config.num_workers == 1
