"""A failure's root cause through Ray's wrappers, built from Ray's own exception classes as Ray
builds them (the messages are the shapes Ray 2.60 produces; see emtune.study.failures)."""

from __future__ import annotations

import pickle

import pytest

from emtune.study.failures import failure_reason, failure_report, root_cause, tune_trial_error
from emtune.study.internals import tune_trial_folders

TRACEBACK = '''Traceback (most recent call last):
  File "/site-packages/ray/train/v2/_internal/execution/worker_group/thread_runner.py", line 48, in _run_target
    result = target()
  File "/work/emtune/train/worker.py", line 120, in train_loop_per_worker
    run_training(config)
  File "/work/emtune/evaluation/scoring.py", line 42, in exact_match
    return answer + 1
           ~~~~~~~^~~
TypeError: can only concatenate str (not "int") to str
'''


def _worker_group_error(failures: dict, snippets: dict[str, str]):
    from ray.train import WorkerGroupError

    message = "\n".join(f"[Rank {ranks} Error Snippet]:\n{text}" for ranks, text in snippets.items())
    return WorkerGroupError(message, failures)


def test_worker_error_names_type_message_rank_and_last_frames() -> None:
    error = _worker_group_error({0: TypeError('can only concatenate str (not "int") to str')}, {"0": TRACEBACK})
    assert str(error).splitlines()[0] == "Training failed due to worker errors:"  # what was recorded before
    cause = root_cause(error)
    assert cause.line() == 'TypeError: can only concatenate str (not "int") to str (Train worker rank 0)'
    assert cause.frames == (
        "/site-packages/ray/train/v2/_internal/execution/worker_group/thread_runner.py:48 in _run_target: "
        "result = target()",
        "/work/emtune/train/worker.py:120 in train_loop_per_worker: run_training(config)",
        "/work/emtune/evaluation/scoring.py:42 in exact_match: return answer + 1",
    )
    report = failure_report(error)
    assert report.splitlines()[0] == cause.line() and report.splitlines()[-1].startswith("  /work/emtune/evaluation")
    # pickled across processes (how Tune and Ray move it) it says the same
    assert failure_report(pickle.loads(pickle.dumps(error))) == report


def test_several_failing_workers_report_the_lowest_rank_and_the_count() -> None:
    error = _worker_group_error({1: ValueError("b"), 0: ValueError("a")}, {"0": "ValueError: a\n", "1": "ValueError: b\n"})
    assert failure_reason(error) == "ValueError: a (Train worker rank 0, 2 workers failed)"


def _actor_died(pid: int = 4242, class_name: str = "RayTrainWorker"):
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    return ActorDiedError(ActorDiedErrorContext(
        class_name=class_name, actor_id=bytes(16), pid=pid,
        error_message=("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
                       "Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file. "
                       "Some common causes include: (1) the process was killed by the OOM killer")))


def test_a_dead_worker_says_how_it_died_through_the_controller_or_the_health_check() -> None:
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    expected = ("ActorDiedError: the process died: Worker unexpectedly exits with a connection error code 2. "
                "End of file. (Train worker, pid 4242)")
    assert failure_reason(ControllerError(_actor_died())) == expected
    health = WorkerHealthCheckFailedError("Worker health check failed.", _actor_died(77))
    error = _worker_group_error({0: health}, {"0": str(health)})
    assert failure_reason(error) == ("ActorDiedError: the process died: Worker unexpectedly exits with a connection "
                                     "error code 2. End of file. (Train worker rank 0, pid 77)")


def test_a_dead_trial_process_is_named_as_the_user_knows_it() -> None:
    """Tune runs a trial's function in an ``ImplicitFunc`` actor: the reason says the trial's process."""
    assert failure_reason(_actor_died(31, "ImplicitFunc")).endswith("End of file. (the trial's process, pid 31)")
    assert failure_reason(_actor_died(31, "SomethingElse")).endswith("End of file. (SomethingElse, pid 31)")


def test_a_ray_task_error_reports_its_cause_and_remote_frames() -> None:
    from ray.exceptions import RayTaskError

    remote = ('ray::extract_to_file() (pid=12, ip=127.0.0.1)\n  File "/work/emtune/defenses/persona_vectors.py", '
              'line 210, in extract_to_file\n    raise KeyError(layer)\nKeyError: 7')
    error = RayTaskError("extract_to_file", remote, KeyError(7), pid=12, ip="127.0.0.1").as_instanceof_cause()
    cause = root_cause(error)
    assert cause.line() == "KeyError: 7"
    assert cause.frames == ("/work/emtune/defenses/persona_vectors.py:210 in extract_to_file: raise KeyError(layer)",)


def test_plain_exceptions_follow_their_cause_chain_and_hint_on_oom() -> None:
    def allocate() -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    try:
        try:
            allocate()
        except RuntimeError as inner:
            raise ValueError("Training failed on worker 0") from inner
    except ValueError as outer:
        cause = root_cause(outer)
    assert cause.line() == ("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (out of memory: lower "
                            "training.per_device_batch_size or data.max_length, or use more GPUs)")
    assert cause.frames[-1].endswith('in allocate: raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")')
    assert failure_reason(KeyError("x")) == "KeyError: 'x'" and failure_report(KeyError("x")) == "KeyError: 'x'"


@pytest.mark.parametrize("pickled", [True, False])
def test_the_error_tune_recorded_for_a_trial_is_found_by_its_id(tmp_path, pickled) -> None:
    folder = tmp_path / "tune" / "run_trial_a1b2c3d4_2_kl_weight=0.1_2026-11-28_04-00-00"
    folder.mkdir(parents=True)
    error = _worker_group_error({0: TypeError("bad operand")}, {"0": TRACEBACK.replace(
        'can only concatenate str (not "int") to str', "bad operand")})
    if pickled:
        (folder / "error.pkl").write_bytes(pickle.dumps(error))
    (folder / "error.txt").write_text(f"Failure # 1 (occurred at 2026-11-28_04-00-05)\n{TRACEBACK}")
    report = tune_trial_error(tune_trial_folders(tmp_path, "a1b2c3d4"))
    first = "TypeError: bad operand (Train worker rank 0)" if pickled else (
        'TypeError: can only concatenate str (not "int") to str')
    assert report.splitlines()[0] == first
    assert report.splitlines()[-1] == "  /work/emtune/evaluation/scoring.py:42 in exact_match: return answer + 1"
    assert tune_trial_folders(tmp_path, "ffffffff") == [] and tune_trial_error([]) is None


def test_a_dead_trial_process_recorded_as_text_says_it_died(tmp_path) -> None:
    """Tune's error.txt for a trial whose process was killed (the words Ray 2.60 writes)."""
    (tmp_path / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-11-28_07-56-55)\nThe actor died unexpectedly before finishing this task.\n"
        "\tclass_name: ImplicitFunc\n\tactor_id: 48ad291e9a652fb0f423fdb701000000\n\tpid: 15906\n\tip: 127.0.0.1\n"
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
        "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the "
        "process was killed by the OOM killer due to high memory usage\n")
    assert tune_trial_error([tmp_path]) == ("ActorDiedError: the process died: Worker unexpectedly exits with a "
                                            "connection error code 2. End of file. (the trial's process, pid 15906)")
