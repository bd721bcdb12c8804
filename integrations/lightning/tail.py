"""The hook a decided save is taken in, and the rest of the saved iteration, run again on resume.

The callback decides in ``on_train_batch_end``, but Lightning's iteration goes on after that hook:
it reports the step's logged values, validates when due, steps ``ReduceLROnPlateau`` schedulers
and, after an epoch's last batch, ends the epoch (``on_train_epoch_end`` hooks, epoch-interval
schedulers, epoch metrics). On resume Lightning skips what came after the checkpoint's hook. So a
step whose validation is due is saved in ``on_validation_end`` and the last step of an epoch in
``on_train_epoch_end``, where Lightning's own restart stages continue correctly, and
:func:`finish_iteration` runs in the resumed run what they still leave out. These are private
Lightning internals (2.5 and later, tested with 2.6).

Example (inside the callback)::

    point = save_point(trainer, ends_after_batch(trainer))    # in on_train_batch_end
    finish_iteration(trainer, "on_train_batch_end", False)    # in the resumed run's on_train_start
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ckpt.integrations.lightning import resume


@dataclasses.dataclass(frozen=True)
class SavePoint:
    """Where a save is taken.

    hook: ``on_train_batch_end``, ``on_validation_end``, ``on_train_epoch_end``, ``on_train_end`` or
      ``on_exception``.
    first_loop_iter: the training loop's logging state when the save was decided (validation
      replaces it while it runs, and the training loop puts it back after).
    last: the run ends after this step by a bound that a run started again checks again (``max_steps``,
      ``Timer``'s ``max_time``; see :func:`bound_reached`): the save is taken before Lightning ends the
      epoch early (right away, or after the step's validation if one is due at it; at the epoch's last
      batch, after the epoch's end, which is not early), and
      records no stop, so that a longer run resumed from it goes on as if it had never stopped. A stop
      requested otherwise (by the module or a callback setting ``trainer.should_stop``) is saved after the
      epoch it cuts short ends, and recorded: the resumed fit ends at once, as the stopped one did.
    """

    hook: str
    first_loop_iter: bool | None
    last: bool = False


def ends_after_batch(trainer: Any) -> bool:
    """Whether the run ends after the batch that just ended: ``max_steps`` reached, or a stop requested
    (``Timer``'s ``max_time``, any callback's ``should_stop``) that Lightning may grant."""
    return 0 <= trainer.max_steps <= trainer.global_step or (trainer.should_stop and trainer.fit_loop._can_stop_early)


def bound_reached(trainer: Any) -> bool:
    """Whether the run has reached ``max_steps`` or a ``Timer``'s ``max_time``: bounds that the same command
    run again checks again (``Timer`` keeps its elapsed time in its state), and that a longer run extends.
    A ``trainer.should_stop`` set by code is no such bound: nothing asks again after a restore."""
    timer = importlib.import_module(f"{resume.lightning_package(trainer)}.callbacks").Timer
    remaining = [c.time_remaining() for c in trainer.callbacks if isinstance(c, timer)]
    return 0 <= trainer.max_steps <= trainer.global_step or any(r is not None and r <= 0 for r in remaining)


def bounds(trainer: Any) -> list[int | None]:
    """The fit's ``[max_epochs, max_steps]``, recorded with a stop, for :func:`stop_holds`."""
    return [trainer.max_epochs, trainer.max_steps]


def stop_holds(trainer: Any, should_stop: bool, saved_bounds: list[int | None] | None) -> bool:
    """Whether a stop that code requested (``should_stop``, recorded in a fit of ``saved_bounds``, see :func:`bounds`;
    None: not recorded, by an earlier version) is restored (call after the loops are restored). A stop that
    ``min_epochs`` or ``min_steps`` still holds back is: the fit it was requested in trained on, and ends when they
    are met. One that ended the fit is restored, ending the resumed fit at once, only when the fit has those bounds,
    i.e. it is the same command run again (say, after a kill during a ``trainer.test`` that followed the stopped
    fit). A fit with other bounds (a larger ``max_epochs``) goes on from the step, as after Lightning's own resume,
    which records no stop: ``EarlyStopping``, its ``wait_count`` and ``patience`` restored, stops it again after its
    next check unless the monitored value improved."""
    return should_stop and (saved_bounds is None or list(saved_bounds) == bounds(trainer)
                            or not trainer.fit_loop._can_stop_early)


def save_point(trainer: Any, last: bool) -> SavePoint:
    """Where the step that just ended is saved (``last``: :func:`ends_after_batch`): after the epoch's end
    when the epoch ends (a bound reached at its last batch included) or a stop cuts it short, else after its
    validation if one is due at it (a bound reached mid-epoch included: :func:`bound_reached`), else at once
    (before Lightning ends an epoch that a bound cuts short). Call on every rank."""
    epoch_loop = trainer.fit_loop.epoch_loop
    first_loop_iter = trainer._logger_connector._first_loop_iter
    bounded = last and bound_reached(trainer)
    if trainer.world_size > 1:  # rank 0's clock decides for every rank, as Timer's does
        bounded = trainer.strategy.broadcast(bounded, src=0)
    if epoch_loop._num_ready_batches_reached() or (last and not bounded):
        hook = "on_train_epoch_end"
    elif _validation_due(trainer):
        hook = "on_validation_end"
    else:
        hook = "on_train_batch_end"
    return SavePoint(hook=hook, first_loop_iter=first_loop_iter, last=bounded)


def others_save_point(trainer: Any) -> SavePoint:
    """Where a checkpoint that no CheckpointCallback takes is taken (a ``ModelCheckpoint``'s, which a fit may
    resume from with ``ckpt_path=``; ``trainer.save_checkpoint``): in the hook it is taken in when that is
    ``on_train_epoch_end``, ``on_validation_end`` (``ModelCheckpoint`` saves there) or, after SIGTERM, ``on_exception``
    (``OnExceptionCheckpoint``); as at the training's end when taken after it (in ``on_train_end`` or later:
    ``trainer.save_checkpoint`` after ``fit`` or in a later ``validate``/``test``/``predict``, when the training loop
    has run its last epoch end); else as at a step's end."""
    hook = trainer.lightning_module._current_fx_name
    state = trainer.state
    if hook in ("on_train_end", "on_fit_end", "teardown") or state.status == "finished" or state.fn != "fit":
        hook = "on_train_end"
    elif hook not in ("on_train_epoch_end", "on_validation_end") and not (hook == "on_exception"
                                                                        and trainer.received_sigterm):
        hook = "on_train_batch_end"  # (an error's exception: wherever it was raised)
    # the training loop's logging state is a bool once it trained a batch, which validation follows; its
    # value makes no difference to a restart (the next batch sets it to False)
    return SavePoint(hook=hook, first_loop_iter=False if hook == "on_validation_end" else None)


def _validation_due(trainer: Any) -> bool:
    """Whether the step that just ended is validated by the Trainer's interval (``val_check_interval``,
    ``check_val_every_n_epoch``), as a run going on after it would validate it: Lightning also validates
    at any step where the run stops by ``trainer.should_stop`` (a ``Timer``'s), which a longer run resumed
    from the step would not do, so that stop is left out of the question."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:  # a clock's decision cannot be foreseen
        return False
    fit_loop = trainer.fit_loop
    val_loop = fit_loop.epoch_loop.val_loop
    if val_loop._combined_loader is not None and val_loop.skip:  # no batches: Lightning skips it, hooks included
        return False
    should_stop, trainer.should_stop = trainer.should_stop, False
    try:
        return fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)
    finally:
        trainer.should_stop = should_stop


def continue_after(trainer: Any, saved_in: str) -> None:
    """Sets the restored loops to continue after the hook ``saved_in`` (call right after the restore).

    After an epoch-end checkpoint Lightning starts the next epoch, unless the run is bounded by
    ``max_steps``: then its loops stay "restarting" and continue the ended epoch with a new data
    iterator. Here they start the next epoch in both cases.
    """
    if saved_in == "on_train_epoch_end":
        trainer.fit_loop._restarting = False
        trainer.fit_loop.epoch_loop.restarting = False


def finish_iteration(trainer: Any, saved_in: str, should_stop: bool, finished: bool = False) -> None:
    """Runs what the uninterrupted run ran after the hook ``saved_in`` and a restart leaves out.

    The loggers are not called again: the run that saved the step sent them its values right after the save,
    and Lightning's own resume does not send them again either (the metrics it reports are updated).

    Call in ``on_train_start`` of the resumed run, after the logged values are restored (``finished``: in a fit
    whose training loop Lightning skips, see :func:`finish_skipped_fit`).
    """
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    connector = trainer._logger_connector
    trainer.should_stop = should_stop
    if saved_in == "on_train_batch_end" and epoch_loop.restarted_on_train_batch_end:
        # the rest of _TrainingEpochLoop.advance and on_advance_end (validation was not due), but
        # update_train_step_metrics, which only sends the loggers what on_batch_end reported
        connector.on_batch_end()
        epoch_loop.update_lr_schedulers("step", update_plateau_schedulers=True)
    elif saved_in == "on_validation_end" and (finished or should_stop and fit_loop._can_stop_early):
        # Lightning's restart runs the rest of on_advance_end in its next iteration, but a finished or stopping
        # run has none (a stop that min_epochs or min_steps holds back has one: it goes on training)
        epoch_loop.update_lr_schedulers("step", update_plateau_schedulers=True)
        if not epoch_loop._should_accumulate():
            epoch_loop._batches_that_stepped += 1
    elif saved_in == "on_train_epoch_end":
        # the rest of FitLoop.on_advance_end, with the epoch number it had (not yet completed), which the
        # schedulers step by; of update_train_epoch_metrics only its reset (the rest sends the loggers what
        # on_epoch_end reported)
        connector.on_epoch_end()
        progress = fit_loop.epoch_progress.current
        completed, progress.completed = progress.completed, progress.processed - 1
        try:
            if epoch_loop._num_ready_batches_reached():
                epoch_loop.update_lr_schedulers("epoch", update_plateau_schedulers=True)
        finally:
            progress.completed = completed
        connector.reset_results()


def hold_repeated_step_end(trainer: Any, saved_in: str | None) -> list[Any]:
    """Keeps Lightning's restart from running again the end of a step that a SIGTERM save took after it
    (``saved_in`` ``"on_exception"``) when the step validated: Lightning takes such a checkpoint for one taken in
    ``on_validation_end`` (where ``ModelCheckpoint`` saves) and runs the rest of ``on_advance_end`` again, so the
    step-interval ``ReduceLROnPlateau`` schedulers stepped a second time on that validation and the count of batches
    that stepped (the loggers' step) went one ahead. Call in ``on_train_start`` of the resumed run; returns the
    schedulers' configs held, for :func:`release` at the next batch's start (or the epoch's or training's end)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    val_progress = epoch_loop.val_loop.batch_progress
    # a SIGTERM during the validation (it stops after a batch that is not its last) stopped before the step's end,
    # which the restart runs after the rest of the validation, as it should
    if (saved_in != "on_exception" or not epoch_loop.restarted_on_last or not val_progress.is_last_batch
            or epoch_loop.val_loop.restarted_mid_evaluation or not _validation_due(trainer)):
        return []
    epoch_loop._batches_that_stepped -= 1  # the step's end, run again, counts it again
    held = [c for c in trainer.lr_scheduler_configs if c.reduce_on_plateau and c.interval == "step"]
    for config in held:
        config.interval = _HELD
    return held


def release(held: list[Any]) -> None:
    """Gives the schedulers' configs that :func:`hold_repeated_step_end` held their interval back."""
    for config in held:
        config.interval = "step"


_HELD = "held by ckpt until the next batch"


def finish_skipped_fit(trainer: Any, saved_in: str, should_stop: bool) -> None:
    """:func:`finish_iteration` in a fit restored from the last step of a finished run (``max_epochs`` or
    ``max_steps`` reached), whose training loop Lightning skips, ``reset`` and the epoch's end included: sets
    the restart stages that ``reset`` sets, counts the saved batch as completed, ends an epoch that a bound
    (``max_steps``, ``max_time``) cut short (its epoch metrics; the ``on_train_epoch_end`` hooks are not run
    again) and counts the saved epoch as completed, as the finished run did after it ended. Call in
    ``on_fit_end``, after the logged values are restored."""
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    fit_loop.update_restart_stage()
    finish_iteration(trainer, saved_in, should_stop, finished=True)
    if saved_in == "on_train_batch_end" and epoch_loop.restarted_on_train_batch_end:  # what reset would count
        epoch_loop.batch_progress.increment_completed()
        epoch_loop._batches_that_stepped += 1
    if saved_in in ("on_train_batch_end", "on_validation_end") and bound_reached(trainer):  # SavePoint.last
        trainer._logger_connector.epoch_end_reached()
        fit_loop.epoch_progress.increment_processed()
        finish_iteration(trainer, "on_train_epoch_end", should_stop, finished=True)
        saved_in = "on_train_epoch_end"
    if saved_in == "on_train_epoch_end":
        for progress in (fit_loop.epoch_progress.total, fit_loop.epoch_progress.current):
            progress.completed = progress.processed


def end_restart(trainer: Any) -> None:
    """Lets the first epoch after a resume from this callback's checkpoint end as any other (call in
    its ``on_train_epoch_end``).

    ``FitLoop`` skips the epoch-interval ``ReduceLROnPlateau`` step at the end of the epoch it
    restarted in, because Lightning does not restore the metrics it reads; they are restored here.
    The flag is cleared by Lightning right after this epoch anyway.
    """
    trainer.fit_loop._restarting = False
