"""The callback's behaviour, free of any Lightning namespace: it only duck-types the trainer.

The concrete classes (``pytorch_lightning.py``, ``lightning_pytorch.py``) add Lightning's ``Checkpoint``
base of one namespace each, so that Lightning adds no ``ModelCheckpoint`` beside it, orders it last
and returns it as ``trainer.checkpoint_callback``.

What happens when:

- ``setup`` (fit): every rank opens the :class:`ckpt.Checkpointer` (not under ``fast_dev_run``, a smoke
  test that saves and restores nothing); under ``torch.distributed`` they
  coordinate through its store (rank 0 decides and commits; replicated state is written by rank 0
  only, the shards of sharded state, FSDP2's DTensors, by the ranks that hold them). Until the training
  ends, the callbacks run after every other callback (a ``ModelCheckpoint`` listed after them included).
- fit start: every rank learns the latest committed step from rank 0 and, with ``restore`` and no
  ``trainer.fit(ckpt_path=...)``, restores the full training state from it in Lightning's own order:
  the model, datamodule and callbacks' states before the other callbacks' ``on_fit_start`` (a callback
  put first in ``trainer.callbacks`` does it), the loops, optimizers and schedulers in this callback's
  ``on_fit_start``, after them (each rank reads the step itself: the directory must be reachable from
  every rank, as with any shared checkpoint; a sharded model and its optimizers read only their own
  shards, at any number of devices).
- ``on_train_start``: the checkpoint dict is built once and checked, so that a value ckpt cannot
  store fails before training; the data iterator is moved to the batch after the checkpoint and the
  RNG states are set as they were when it was taken.
- ``on_train_epoch_start``: the RNG states are recorded; a mid-epoch resume replays the epoch's
  shuffling from them.
- ``on_train_batch_end``: once per new ``trainer.global_step`` (accumulating batches and repeated
  steps decide nothing), rank 0's policy decides for every rank; a save snapshots the state on the
  training thread right after the LightningModule's own hook, which Lightning calls after the callbacks'
  (what it changes is saved), and writes it in the background. SIGTERM saves the step too. A step whose
  validation is due is saved after it (``on_validation_end``, after the module's; the next step is, when
  it does not run), and the last step of an epoch after the epoch's end (``on_train_epoch_end``):
  Lightning skips on resume what a checkpoint taken before them owes, and the resumed run finishes the
  rest of the saved iteration (see :mod:`ckpt.integrations.lightning.tail`).
- ``on_train_end``: saves the final step if it is not saved, and waits for the write.
- ``on_fit_end``: a fit restored from a finished run's last step, whose training Lightning skips
  (``on_train_start`` included), gets the logged values and the rest of the saved iteration there.
- ``on_exception``: after SIGTERM, saves the current step (all ranks got the signal's exception at
  the same batch); otherwise only waits for the save in flight.
"""
from __future__ import annotations

import dataclasses
import importlib
import reprlib
import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

import ckpt
from ckpt import arguments, preemption, storage, training
from ckpt.path import step as step_lib
from ckpt.training import Checkpointer, preservation_policies, save_decision_policies

from ckpt.integrations.lightning import monitor as monitor_lib
from ckpt.integrations.lightning import checkpoint_io, logged, pruning, resume, rng, sharded, tail, translate
from ckpt.integrations.lightning.weights import check_model

log = logging.getLogger(__name__)


class CheckpointCallbackMixin:
    """Saves the full Lightning training state with ckpt on step end and resumes it on fit start.

    Args:
      directory: the root directory of the steps (local, ``gs://`` or ``s3://``).
      save_decision_policy: when to save (``ckpt.training.save_decision_policies``); default: the
        first step, then whenever no save is in flight, and on preemption.
      preservation_policy: what to keep (``ckpt.training.preservation_policies``); default: all.
      monitor: a key of ``trainer.callback_metrics``; the best step by it is kept beside what
        ``preservation_policy`` keeps (by default the latest step) and is ``best_model_path``. A key
        that none of the directory's steps holds at the end of fit is warned of (a misspelt name).
      mode: ``"min"`` or ``"max"``: which ``monitor`` value is best.
      async_save: write in the background (the training thread only takes the snapshot).
      restore: on fit start, resume from the latest step unless ``trainer.fit(ckpt_path=...)`` is given.
      step_name_format: step directory names (``ckpt.path.step.standard_name_format(...)``).
      context: ``ckpt.Context`` options.
      local: a local tier (``ckpt.LocalCheckpointOptions("/mnt/ssd/exp1", ...)``) with policies of its
        own: ``directory`` (e.g. ``s3://...``) becomes the durable tier, which gets the steps
        ``save_decision_policy`` wants, copied from the local tier in the background; the final step
        and a SIGTERM's step go to both. Fit resumes from the newest step of either tier.

    Example::

        from ckpt.integrations.lightning import CheckpointCallback
        from ckpt.training import save_decision_policies as sdp, preservation_policies as pp

        trainer = pl.Trainer(max_steps=10_000, callbacks=[CheckpointCallback(
            "runs/exp1",
            save_decision_policy=sdp.AnySavePolicy([sdp.FixedIntervalPolicy(500),
                                                    sdp.PreemptionCheckpointingPolicy()]),
            preservation_policy=pp.LatestN(2), monitor="train_loss")])
        trainer.fit(model, dataloader)     # run the same command again after a crash: it continues
    """

    lightning_package: str = ""  # the namespace of the concrete class's Checkpoint base

    def __init__(self, directory: str | os.PathLike | None = None, *,
                 save_decision_policy: save_decision_policies.SaveDecisionPolicy | None = None,
                 preservation_policy: preservation_policies.PreservationPolicy | None = None,
                 monitor: str | None = None, mode: str = "min", async_save: bool = True, restore: bool = True,
                 step_name_format: step_lib.NameFormat | None = None,
                 context: ckpt.Context | None = None, local: ckpt.LocalCheckpointOptions | None = None,
                 **model_checkpoint_options: Any) -> None:
        super().__init__()
        if model_checkpoint_options or directory is None:
            raise TypeError(_instead_of(model_checkpoint_options))
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"monitor must be a metric name (str) or None, got {monitor!r}")
        for name, flag in (("async_save", async_save), ("restore", restore)):
            arguments.instance_of(flag, bool, name)  # "no" would have meant yes
        training.check_options(save_decision_policy=save_decision_policy, preservation_policy=preservation_policy,
                               step_name_format=step_name_format, context=context, local=local)
        self.directory = os.fspath(directory)
        storage.location(self.directory)  # an empty path or an unknown URL scheme fails here, not at fit
        self.monitor = monitor
        self.mode = mode
        self.async_save = async_save
        self.restore = restore
        self._checkpointer_options = dict(
            save_decision_policy=save_decision_policy,
            preservation_policy=monitor_lib.preservation_policy(preservation_policy, monitor, mode),
            step_name_format=step_name_format, context=context, local=local)
        self._checkpointer: Checkpointer | None = None  # every rank's, from setup (fit) on
        self._paths = {"best": "", "last": ""}  # the paths while this process has no Checkpointer
        self._open = False
        self._trainer: Any = None
        self._latest_step: int | None = None  # the latest step on disk at fit start, on every rank
        self._decided_step: int | None = None  # the global step of the last decision (None: not training)
        self._training_started = False  # this callback's state is taken from the fit's on_train_start on
        self._saved_step: int | None = None
        self._at_step_boundary = True  # False after a batch that only accumulated gradients
        self._prepare_after_step = False  # prepare the next save's memory at the next step that does not save
        self._restored_logged = False  # until the end of the first epoch after a restore of the logged values
        self._pending: tuple[tail.SavePoint, bool] | None = None  # a decided save waiting for its hook, force
        self._saving_at: tail.SavePoint | None = None  # the save point of the checkpoint being taken
        self._epoch_rng: dict | None = None  # {"epoch": int, "rng": the states at the epoch's start}
        self._loaded_state: dict | None = None  # this callback's state from a restored checkpoint
        self._epoch_start_action: str | None = None  # for the next on_train_epoch_start (see _start_epoch)
        self._restoring: tuple[str, dict, bool] | None = None  # path, checkpoint, set by torch (sharded.restores_itself)
        self._accumulation_after_epoch: int | None = None  # the Trainer's, while the saved epoch's is in force
        self._callbacks_order: list | None = None  # trainer.callbacks as given, while this fit runs ours last
        self._metrics = monitor_lib.MeasuredMetrics(monitor)  # a save's metrics: monitor only where measured
        self._silenced: tuple | None = None  # the warnings filter of _silence_replay_warning, while it is in force
        self._held: list = []  # schedulers' configs held by tail.hold_repeated_step_end until the next batch

    # ------------------------------------------------------------------ what Lightning reads
    @property
    def state_key(self) -> str:
        """Unique per directory (as ``ModelCheckpoint``'s is per options), so that a Trainer takes several
        callbacks (one keeping the best step, one saving periodically); each restores its own state."""
        return self._generate_state_key(directory=self.directory)

    @property
    def checkpointer(self) -> Checkpointer | None:
        """The underlying :class:`ckpt.Checkpointer` (after ``setup`` of a fit), else None."""
        return self._checkpointer

    @property
    def last_model_path(self) -> str:
        """The directory of the latest step the checkpointer lists ("" if none): committed or, in a multi-process job
        (DDP), one whose async save (with a local tier, whose promotion) is queued, listed on every rank alike from the
        moment it is queued, as Orbax lists the step in flight. ``trainer.fit`` returns once its steps are committed."""
        if self._checkpointer is None and self._paths["last"]:
            return self._paths["last"]
        checkpoints = self._committed_steps()
        return str(checkpoints[-1].path) if checkpoints else ""

    @last_model_path.setter
    def last_model_path(self, path: str) -> None:  # Lightning's spawn launchers copy it from rank 0
        self._paths["last"] = path

    @property
    def best_model_path(self) -> str:
        """The directory of the best step by ``monitor`` (the latest without ``monitor``) of those
        :attr:`last_model_path` reads. In a DDP job a step counts with rank 0's metrics on every rank, from the
        moment its save is queued (those its manifest holds once committed): the same directory on every rank."""
        if self._checkpointer is None and self._paths["best"]:
            return self._paths["best"]
        best = monitor_lib.best_step(self._committed_steps(), self.monitor, self.mode)
        return "" if best is None else str(best.path)

    @best_model_path.setter
    def best_model_path(self, path: str) -> None:
        self._paths["best"] = path

    def _committed_steps(self) -> Sequence[ckpt.CheckpointMetadata]:
        """The Checkpointer's steps, or in a process that has none (an evaluation script, the main process
        of ``ddp_spawn``), those of the directory, read without writing to it."""
        if self._checkpointer is not None:
            return self._checkpointer.checkpoints
        directory = storage.location(self.directory)  # "~/runs", file:// as the Checkpointer reads them
        if isinstance(directory, Path) and not directory.is_dir():
            return []
        with Checkpointer(self.directory, step_name_format=self._checkpointer_options["step_name_format"]) as reader:
            return reader.checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What Lightning's checkpoint lacks for an exact resume: per rank, the RNG states now and at the
        start of the epoch and the logged values and metrics; the hook the checkpoint was taken in, the
        ``accumulate_grad_batches`` in force, which parameters require gradients, the optimizers' classes and the
        epoch the training DataLoaders were last made in, the masks of pruned parameters, and whether code requested
        a stop (``trainer.should_stop``) with the bounds (``max_epochs``, ``max_steps``) of the fit it stopped."""
        trainer = self._trainer
        if trainer is None or not self._training_started:  # e.g. BatchSizeFinder's checkpoint before training
            return {}
        peers = _peers(trainer)  # any of them may be taking the checkpoint; the first keeps the epoch's record
        point = next((c._saving_at for c in peers if c._saving_at is not None), None) or tail.others_save_point(trainer)
        state = logged.capture(trainer, in_validation_end=point.hook == "on_validation_end")
        if point.hook == "on_validation_end":  # validation ran inside the training loop's logging
            state.update(first_loop_iter=point.first_loop_iter, current_fx=None)
        # a stop by a bound (a Timer of interval "epoch" stops at an epoch's end, after the step was decided)
        # is no stop to record: a longer run goes on from the step
        bounded = point.last or tail.bound_reached(trainer)
        return {"rng": self._gather(rng.capture(resume.train_loaders(trainer))),
                "epoch_rng": self._gather(peers[0]._epoch_rng), "logged": self._gather(state),
                "saved_in": point.hook, "should_stop": bool(trainer.should_stop) and not bounded,
                "bounds": tail.bounds(trainer),
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "trainable": resume.trainable(trainer.lightning_module),
                "optimizers": resume.optimizer_classes(trainer),
                "loaders_made_in": resume.loaders_made_in(trainer),
                "pruning": pruning.masks(trainer.lightning_module)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = state_dict

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Before Lightning hands the callbacks their states: when none is under this callback's key (the
        directory was moved or copied, or written by a version whose key was ``"CheckpointCallback"``),
        this callback takes another CheckpointCallback's, which is the same record of the run."""
        own = self._own_state(checkpoint)
        if own:
            checkpoint["callbacks"][self.state_key] = own

    def _own_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """This callback's state in ``checkpoint`` ({} if none): under its key, or another CheckpointCallback's."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return states[self.state_key]
        name = type(self).__qualname__
        found = [v for k, v in states.items() if isinstance(k, str) and (k == name or k.startswith(name + "{"))]
        return found[0] if found else {}

    # ------------------------------------------------------------------------------- hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._check_namespace(trainer)
        self._trainer = trainer
        # ckpt_path= may name a step directory, as "best" does
        checkpoint_io.install(trainer.strategy, self._checkpointer_options["step_name_format"])
        if stage == "fit":
            self._training_started = False
            _warn_of_model_logging(trainer)
            resume.call_first_at_fit_start(trainer, self._restore_modules)
            self._callbacks_order = resume.run_after_the_others(trainer, _peers(trainer))
        if stage == "fit" and not self._open and not trainer.fast_dev_run:  # (a smoke test: nothing saved)
            # the callback is the directory's only writer: what crashed saves left is removed
            self._checkpointer = Checkpointer(self.directory, cleanup_tmp_directories=True,
                                              **self._checkpointer_options)
            preemption.listen(self._checkpointer)  # Lightning stops on SIGTERM, after on_exception saved the step
            self._open = True

    def _restore_modules(self, trainer: Any, pl_module: Any) -> None:
        """At fit start, before the other callbacks' ``on_fit_start`` (as Lightning's own restore): finds
        the latest step and restores the model, datamodule and callbacks from it (nothing under ``fast_dev_run``,
        which opens no Checkpointer: restored, the smoke test would start at the latest step and train no batch;
        nothing in a fit that Lightning's ``Tuner`` runs for its search, which starts from the module as given).
        With ``trainer.fit(ckpt_path=...)`` of a checkpoint this callback wrote, which Lightning has restored the
        modules and callbacks from, keeps it for :meth:`on_fit_start`: a callback's ``on_fit_start`` may restore
        a checkpoint of its own meanwhile (``BatchSizeFinder`` does), which ends Lightning's."""
        peers = _peers(trainer)
        if self not in peers:  # taken out of the Trainer after a fit of its own, whose fit-start callback stays
            return
        sharded.check_strategy(trainer)
        found_by_peer = trainer.strategy.broadcast([_latest(c._checkpointer if c._open else None) for c in peers],
                                                   src=0)
        found = found_by_peer[peers.index(self)]
        self._latest_step = None if found is None else found[0]
        # with several callbacks, the one whose directory holds the newest step restores (the first, if equal)
        newest = max(((f[0], -i) for i, (c, f) in enumerate(zip(peers, found_by_peer)) if f is not None and c.restore),
                     default=None)
        if (self.restore and found is not None and trainer.ckpt_path is None
                and peers[-newest[1]] is self and not resume.tuner_fit(trainer)):
            step, path = found
            set_by_torch = sharded.restores_itself(trainer)
            loaded = sharded.load(trainer, path) if set_by_torch else translate.load(self._checkpointer, step)
            checkpoint = translate.from_checkpointables(loaded, source=path)
            for peer in peers:  # (each takes its record from the checkpoint: see on_load_checkpoint)
                _check_record(peer._own_state(checkpoint), path)
            masks = self._own_state(checkpoint).get("pruning")

            def prepare_model(state: dict) -> None:
                pruning.reapply(pl_module, masks, state)  # the weights load into the module pruned as saved
                check_model(state, pl_module, source=path, strict=pl_module.strict_loading)

            checkpoint = resume.restore_modules(trainer, checkpoint, source=path, check_model=prepare_model)
            self._restoring = (path, checkpoint, set_by_torch)
        elif (trainer.ckpt_path is not None and self is peers[0] and _loaded_state(trainer)
              and resume.loaded_checkpoint(trainer) is not None):
            _check_record(_loaded_state(trainer), str(trainer.ckpt_path))
            self._restoring = (str(trainer.ckpt_path), resume.loaded_checkpoint(trainer), False)
            pruning.reapply(pl_module, _loaded_state(trainer).get("pruning"), {})  # Lightning loaded the weights

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """After the other callbacks' ``on_fit_start``: restores the rest of the step found before them.
        With ``trainer.fit(ckpt_path=...)`` of a checkpoint this callback wrote, restores it the same way
        (Lightning would restore the loops after every ``on_fit_start``, too late to set where they go on)."""
        if self._restoring is None:
            return
        (path, checkpoint, set_by_torch), self._restoring = self._restoring, None
        resume.check_optimizers(trainer, _loaded_state(trainer).get("optimizers"), source=path)
        resume.check_parameter_groups(trainer, checkpoint, source=path)
        resume.check_optimizer_values(trainer, checkpoint, source=path)
        resume.restore_training_state(trainer, checkpoint, source=path)
        if set_by_torch:
            sharded.set_states(trainer, checkpoint)
        tail.continue_after(trainer, _loaded_state(trainer).get("saved_in", "on_train_batch_end"))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._training_started = True
        step = trainer.global_step
        if self._latest_step is not None and self._latest_step > step:
            raise ValueError(
                f"{self.directory} already holds step {self._latest_step}, but this run starts at step {step}"
                + (f" (from ckpt_path={trainer.ckpt_path!r})" if trainer.ckpt_path else " (restore=False)")
                + ": its checkpoints would collide with those steps. Use a new directory, or remove the steps "
                f"after {step}.")
        self._prepare(trainer)  # un-storable values fail now
        self._prepare_after_step = self.async_save  # optimizers make their state in their first step
        self._decided_step = step
        self._saved_step = self._latest_step
        self._at_step_boundary = True
        self._pending = None
        self._restored_logged = False
        if self is _peers(trainer)[0]:  # the first of several callbacks continues the data (once)
            self._resume_data_and_rng(trainer)
        self._loaded_state = None
        self._metrics.start(trainer.callback_metrics)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        action, self._epoch_start_action = self._epoch_start_action, None
        if self is _peers(trainer)[0]:  # the others' checkpoints take its record
            self._start_epoch(trainer, action)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._end_restart()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._at_step_boundary = step != self._decided_step
        if not self._at_step_boundary or trainer.fast_dev_run:
            return
        self._decided_step = step
        last = tail.ends_after_batch(trainer)
        # a save still waiting for its step's validation, which did not run (a validation loader without
        # batches): it is taken at this step instead
        missed = self._pending is not None
        decision, forced = self._decide(trainer, step, last)
        if decision or missed:  # rank 0's save follows its should_save (SIGTERM: both tiers)
            self._prepare_after_step = False  # the save makes its own memory, kept for the next ones
            point = tail.save_point(trainer, last)
            self._pending = (point, forced or missed)
            if point.hook == "on_train_batch_end":
                resume.after_module_hook(trainer, point.hook, lambda: self._save(trainer, step, *self._pending))
        elif self._prepare_after_step:
            self._prepare_after_step = False
            self._prepare(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is not None and self._pending[0].hook == "on_validation_end" and not trainer.sanity_checking:
            resume.after_module_hook(trainer, "on_validation_end", lambda: self._save_after_validation(trainer))

    def _save_after_validation(self, trainer: Any) -> None:
        # a stop this validation requested (EarlyStopping, the module) cuts the epoch short: saved after the epoch's
        # end; a bound reached at this step (SavePoint.last) is saved here, before Lightning ends the epoch
        if self._pending is not None and (self._pending[0].last or not tail.ends_after_batch(trainer)):
            self._save(trainer, trainer.global_step, *self._pending)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_restart()  # an epoch resumed after its last batch
        if self._restored_logged:  # the metrics Lightning's restart does not trust are restored
            self._restored_logged = False
            tail.end_restart(trainer)
        if self._pending is not None:
            point, force = self._pending
            self._save(trainer, trainer.global_step, dataclasses.replace(point, hook="on_train_epoch_end"), force)
        if self._accumulation_after_epoch is not None:
            trainer.accumulate_grad_batches, self._accumulation_after_epoch = self._accumulation_after_epoch, None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # a fit restored from a finished run's last step trains nothing (Lightning skips its training loop and
        # on_train_start): it ends with the metrics the finished run ended with
        if not self._training_started and self is _peers(trainer)[0]:
            _finish_saved_iteration(trainer, _loaded_state(trainer), skipped=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_restart()  # a fit that ends at once
        step = trainer.global_step
        if step != self._saved_step and not trainer.fast_dev_run:
            self._save(trainer, step, tail.SavePoint(hook="on_train_end", first_loop_iter=None))
        if self._checkpointer is not None:
            self._checkpointer.wait()
            why = monitor_lib.never_logged(self.monitor, self._checkpointer.checkpoints, trainer.callback_metrics)
            if why is not None and trainer.global_rank == 0:
                log.warning("ckpt: %s", why)
        self._restore_callbacks_order(trainer)  # the module's on_train_end and on_fit_end see the order given

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end_restart()
        step = trainer.global_step
        if (trainer.received_sigterm and self._decided_step is not None and self._at_step_boundary
                and step != self._saved_step and not trainer.fast_dev_run):
            try:
                self._save(trainer, step, tail.SavePoint(hook="on_exception", first_loop_iter=None))
            except Exception:
                log.exception("ckpt: the save of step %d after SIGTERM failed", step)
        elif trainer.received_sigterm and not self._at_step_boundary:
            log.warning("ckpt: SIGTERM arrived while gradients were being accumulated, so nothing was saved; the "
                        "run resumes from %s", "the start" if self._saved_step is None else
                        f"step {self._saved_step}, the last one saved")
        self._restore_callbacks_order(trainer)
        try:
            self._close()
        except Exception:
            log.exception("ckpt: the save in flight failed")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._restore_callbacks_order(trainer)
            self._close()

    def _restore_callbacks_order(self, trainer: Any) -> None:
        resume.restore_order(trainer, self._callbacks_order)
        self._callbacks_order = None

    # ------------------------------------------------------------------------------ saving
    def _decide(self, trainer: Any, step: int, last: bool) -> tuple[bool, bool]:
        """Rank 0's decision, on every rank (time- and signal-based policies, SIGTERM and ``should_stop`` may
        differ between ranks): whether to save (the policy's, or yes when SIGTERM arrived or the run ends after
        this step, ``last``), and whether the save is forced (for those two)."""
        forced = last or trainer.received_sigterm
        decision = self._checkpointer.should_save(step) or forced
        if trainer.world_size > 1:
            decision, forced = trainer.strategy.broadcast((decision, forced), src=0)
        return decision, forced

    def _save(self, trainer: Any, step: int, point: tail.SavePoint, force: bool = True) -> None:
        """Snapshots the full training state, taken in ``point``, and writes it (call on every rank).
        Without ``force``, as rank 0's ``should_save`` just decided (with two tiers: to the tiers that
        want the step)."""
        self._pending, self._saving_at = None, point
        try:
            items = translate.to_checkpointables(resume.dump_checkpoint(trainer))
        finally:
            self._saving_at = None
        self._saved_step = step
        metrics = self._metrics(trainer.callback_metrics)
        if self.async_save:
            self._checkpointer.save_checkpointables_async(step, items, force=force, metrics=metrics)
        else:
            self._checkpointer.save_checkpointables(step, items, force=force, metrics=metrics)

    def _prepare(self, trainer: Any) -> None:
        """Checks what a save would store now, and has the memory of the next async save of it made and touched
        in the background: copying into fresh memory faults its pages in, which made a first save block several
        times as long. No ``on_save_checkpoint`` hook sees this dump, which saves nothing: a value ckpt cannot
        store fails here unless such a hook of the module or a callback may convert it (the save checks it then)."""
        try:
            items = translate.to_checkpointables(resume.dump_checkpoint(trainer, hooks=False))
        except TypeError:
            if resume.saving_hooks_overridden(trainer):
                return
            raise
        if self._checkpointer is not None and self.async_save:
            self._checkpointer.prepare_async_save(items)

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._checkpointer.close()

    # ----------------------------------------------------------------------------- resuming
    def _resume_data_and_rng(self, trainer: Any) -> None:
        """Continues the data where the checkpoint left it, with the RNG states it recorded."""
        saved = _loaded_state(trainer)
        self._restored_logged = _finish_saved_iteration(trainer, saved)
        self._held = tail.hold_repeated_step_end(trainer, saved.get("saved_in"))
        resume.restore_trainable(trainer.lightning_module, saved.get("trainable"))  # after BaseFinetuning's setup
        resume.restore_loaders_made_in(trainer, saved.get("loaders_made_in"))
        if trainer.fit_loop.restarted_mid_epoch:  # Lightning skips the epoch-start hooks
            if saved.get("accumulate_grad_batches") is not None:  # which GradientAccumulationScheduler sets it in
                self._accumulation_after_epoch = trainer.accumulate_grad_batches
                trainer.accumulate_grad_batches = saved["accumulate_grad_batches"]
            swa = importlib.import_module(f"{resume.lightning_package(trainer)}.callbacks").StochasticWeightAveraging
            if any(isinstance(c, swa) for c in trainer.callbacks) and trainer.global_rank == 0:
                log.warning("ckpt: resuming mid-epoch with StochasticWeightAveraging: Lightning's restart skips the "
                            "epoch-start hook that swaps in its learning-rate scheduler, so the rest of this epoch "
                            "differs from a run never stopped. Save at epochs' ends with it, or use "
                            "EMAWeightAveraging / WeightAveraging, which resume exactly from any step.")
        saved_rng = _for_rank(saved.get("rng"), trainer.global_rank)
        epoch_rng = _for_rank(saved.get("epoch_rng"), trainer.global_rank)
        resume.load_loader_states_left_unloaded(trainer)
        position = resume.plan_data_position(trainer)
        loaders = resume.train_loaders(trainer)
        if position is not None and epoch_rng is not None:
            self._silence_replay_warning()
        if position is not None and position.replay_epoch:
            epoch = trainer.current_epoch if epoch_rng is None else epoch_rng["epoch"]
            resume.rank_zero_info(trainer, f"Continuing epoch {epoch} after its batch {position.skip} (ckpt)")
            saved_ranks = len(saved.get("rng") or ())
            if saved_ranks not in (0, trainer.world_size) and trainer.global_rank == 0:
                log.warning("ckpt: step %d was saved mid-epoch by %d processes and this run has %d: each process "
                            "trained its own share of epoch %d's samples, so the rest of the epoch cannot be the "
                            "samples the saved run had left; it goes on after batch %d of each process's share at %d "
                            "processes (some samples are seen twice in this epoch, others not at all). Resume with "
                            "%d processes, or from a step saved at an epoch's end, to continue exactly.",
                            trainer.global_step, saved_ranks, trainer.world_size, epoch, position.skip,
                            trainer.world_size, saved_ranks)
            if epoch_rng is not None:
                rng.restore(epoch_rng["rng"], loaders)
                if epoch > 0:
                    resume.new_epoch_iterator(trainer)
            self._epoch_rng = epoch_rng
            skipped = resume.skip_batches(trainer, position.skip, epoch)
            if skipped < position.skip and trainer.global_rank == 0:
                log.warning("ckpt: the training data of epoch %d ended after %d batches, where the checkpoint had "
                            "trained %d: it is shorter than when it was saved, and the epoch ends here",
                            epoch, skipped, position.skip)
            if position.epoch_start_hook:
                self._epoch_start_action = "keep"
        if saved_rng is not None:
            rng.restore(saved_rng, loaders)
        if position is not None and position.new_epoch and trainer.current_epoch > 0:
            if position.epoch_start_hook:
                self._epoch_start_action = "iterate"
            else:
                self._start_epoch(trainer, "iterate")

    def _silence_replay_warning(self) -> None:
        """Silences Lightning's warning that a plain DataLoader replays the epoch, which it gives as its epoch loop
        restarts: this callback replays the data order instead (from a checkpoint that recorded it: not a file of
        ModelCheckpoint's, which stays warned of). Only this fit's: :meth:`_end_restart` removes the filter."""
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        self._silenced = warnings.filters[0]

    def _end_restart(self) -> None:
        """Ends what the restart held until Lightning's epoch loop restarted (call in the first hook after it): the
        schedulers :func:`tail.hold_repeated_step_end` held, and the filter of :meth:`_silence_replay_warning`, so that
        other fits of the process resumed mid-epoch from Lightning's own files are warned of."""
        tail.release(self._held)
        self._held = []
        if self._silenced is not None:
            if self._silenced in warnings.filters:
                warnings.filters.remove(self._silenced)
            self._silenced = None

    def _start_epoch(self, trainer: Any, action: str | None) -> None:
        """Records the RNG states at the start of an epoch (and, with ``"iterate"``, then makes its
        data iterator, as Lightning does for every epoch but the first); ``"keep"`` keeps the record."""
        if action == "keep":
            return
        self._epoch_rng = {"epoch": trainer.current_epoch, "rng": rng.capture(resume.train_loaders(trainer))}
        if action == "iterate":
            resume.new_epoch_iterator(trainer)

    # ------------------------------------------------------------------------- distributed
    def _gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (only ``[value]`` in a single process)."""
        if self._trainer is None or self._trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return [value]
        out: list[Any] = [None] * self._trainer.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def _check_namespace(self, trainer: Any) -> None:
        package = resume.lightning_package(trainer)
        if package != self.lightning_package:
            other = "lightning_pytorch" if package == "lightning.pytorch" else "pytorch_lightning"
            raise TypeError(
                f"this CheckpointCallback is built on {self.lightning_package}, but the Trainer comes from "
                f"{package}; Lightning only recognises callbacks of its own namespace. Use "
                f"ckpt.integrations.lightning.{other}.CheckpointCallback.")


# ModelCheckpoint's options, and what CheckpointCallback takes instead
_MODEL_CHECKPOINT = {
    "dirpath": "the directory, the first argument: CheckpointCallback('runs/exp1')",
    "filename": "none: each step is a directory named by the step (step_name_format)",
    "every_n_train_steps": "save_decision_policy=save_decision_policies.FixedIntervalPolicy(n)",
    "train_time_interval": "save_decision_policy=save_decision_policies.ContinuousCheckpointingPolicy("
                           "minimum_interval_secs=s)",
    "every_n_epochs": "save_decision_policy=FixedIntervalPolicy(steps per epoch * n)",
    "save_on_train_epoch_end": "none: a step is saved after the validation or epoch end that is due at it",
    "save_top_k": "monitor= keeps the best step (and the latest); the k best: monitor='val_loss', preservation_"
                  "policy=preservation_policies.BestN(get_metric_fn=lambda m: m.get('val_loss', math.inf), "
                  "reverse=True, n=k) (reverse: lowest first; a step not validated since the save before it has no "
                  "val_loss)",
    "save_last": "none: the latest step is always kept",
    "save_weights_only": "none: the full state is saved; load_weights reads only the weights",
    "save_on_exception": "none: the step is saved on SIGTERM (a preemption); an error in training saves nothing, "
                         "and a run started again resumes from the last step saved before it",
    "verbose": "none", "auto_insert_metric_name": "none", "enable_version_counter": "none",
}


def _instead_of(options: dict[str, Any]) -> str:
    """The error for ``CheckpointCallback(**options)``: what to pass instead of ModelCheckpoint's options."""
    if not options:
        return "CheckpointCallback needs the directory to save in: CheckpointCallback('runs/exp1')"
    lines = [f"  {name}: {_MODEL_CHECKPOINT[name]}" for name in options if name in _MODEL_CHECKPOINT]
    unknown = [name for name in options if name not in _MODEL_CHECKPOINT]
    message = f"CheckpointCallback got unexpected keyword arguments {sorted(options)}"
    if lines:
        message += "; these are ModelCheckpoint's. Instead:\n" + "\n".join(lines)
    if unknown:
        taken = [p.name for p in inspect.signature(CheckpointCallbackMixin).parameters.values()
                 if p.kind is not p.VAR_KEYWORD]
        message += f"\nIt takes: {', '.join(taken)}"
    return message


def _warn_of_model_logging(trainer: Any) -> None:
    """Warns (rank 0) of each logger told to upload the model's checkpoints (``WandbLogger(log_model=True)``,
    ``MLFlowLogger``'s, ``LitLogger``'s): they upload the files of Lightning's ``ModelCheckpoint``, which hands them
    over in ``after_save_checkpoint``; a CheckpointCallback's steps are directories, which they would not upload."""
    for logger in trainer.loggers if trainer.global_rank == 0 else ():
        if getattr(logger, "_log_model", False):
            log.warning("ckpt: %s(log_model=%r) uploads the .ckpt files of Lightning's ModelCheckpoint; a "
                        "CheckpointCallback's steps are directories, which it is not given and would not upload, so "
                        "it records no model. Upload a step's directory yourself (callback.best_model_path or "
                        "last_model_path: wandb's Artifact.add_dir, mlflow's log_artifacts), or add a ModelCheckpoint "
                        "beside the CheckpointCallback for the logger.", type(logger).__name__, logger._log_model)


def _peers(trainer: Any) -> list[CheckpointCallbackMixin]:
    """The Trainer's CheckpointCallbacks, in its order."""
    return [c for c in trainer.callbacks if isinstance(c, CheckpointCallbackMixin)]


def _loaded_state(trainer: Any) -> dict:
    """The callbacks' state from the checkpoint restored ({} if none): every CheckpointCallback's state in a
    checkpoint is the same record of the run, but a callback added since has none."""
    return next((c._loaded_state for c in _peers(trainer) if c._loaded_state), {})


def _finish_saved_iteration(trainer: Any, saved: dict, skipped: bool = False) -> bool:
    """Puts back the logged values of the restored checkpoint ``saved`` (this rank's) and runs the rest of the
    iteration it was saved in (``skipped``: in a fit whose training loop Lightning skipped); False when it has
    none (no restore, or a checkpoint of an earlier version)."""
    saved_logged = _for_rank(saved.get("logged"), trainer.global_rank)
    if saved_logged is None:
        return False
    logged.restore(trainer, saved_logged)
    finish = tail.finish_skipped_fit if skipped else tail.finish_iteration
    finish(trainer, saved["saved_in"], tail.stop_holds(trainer, saved["should_stop"], saved.get("bounds")))
    return True


def _latest(checkpointer: Checkpointer | None) -> tuple[int, str] | None:
    latest = checkpointer.latest if checkpointer is not None else None
    return None if latest is None else (latest.step, str(latest.path))


def _check_record(state: Any, source: str) -> None:
    """Raises CheckpointCorruptedError naming the step at ``source`` and the field where the callback's record of the
    run in it (:meth:`CheckpointCallbackMixin.state_dict`) holds what the callback never stores, before anything is
    restored from it: such a value failed the resume with a bare TypeError or KeyError deep in the restore, or was
    taken as it was (``accumulate_grad_batches`` -3 stepped the optimizers at odd batches)."""
    if not isinstance(state, dict):
        raise ckpt.errors.CheckpointCorruptedError(
            f"{source}: its CheckpointCallback record is a {type(state).__name__}, not a dict", path=source)
    for field, (what, valid) in _RECORD.items():
        value = state.get(field)
        if value is not None and not valid(value):
            raise ckpt.errors.CheckpointCorruptedError(
                f"{source}: its CheckpointCallback record holds {field} = {reprlib.repr(value)}, where the callback "
                f"stores {what}", path=source)


def _per_rank(valid: Any) -> Any:
    """A check of a per-rank list whose entries ``valid`` accepts."""
    return lambda value: isinstance(value, list) and all(valid(entry) for entry in value)


def _is_epoch_rng(entry: Any) -> bool:
    return entry is None or (isinstance(entry, dict) and type(entry.get("epoch")) is int and entry["epoch"] >= 0
                             and rng.is_state(entry.get("rng")))


# The fields of the record (what state_dict stores there, and the check of a value read)
_RECORD = {
    "rng": ("a list of RNG states, one per process", _per_rank(rng.is_state)),
    "epoch_rng": ("a list of an epoch and its RNG states, one per process", _per_rank(_is_epoch_rng)),
    "logged": ("a list of logged values, one per process", _per_rank(logged.is_state)),
    "saved_in": ("the name of a hook", lambda v: isinstance(v, str)),
    "should_stop": ("a bool", lambda v: isinstance(v, bool)),
    "accumulate_grad_batches": ("a number of batches (1 or more)", lambda v: type(v) is int and v >= 1),
    "trainable": ("a bool tensor", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 1),
    "optimizers": ("a list of class names", _per_rank(lambda name: isinstance(name, str))),
    "loaders_made_in": ("an epoch", lambda v: type(v) is int),
    "pruning": ("masks by parameter name", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(m, torch.Tensor) for k, m in v.items())),
}


def _for_rank(states: list[Any] | None, rank: int) -> Any:
    """This rank's entry of a per-rank list (rank 0's when the run had fewer ranks)."""
    if not states:
        return None
    return states[rank] if rank < len(states) else states[0]
