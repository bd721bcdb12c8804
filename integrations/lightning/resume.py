"""Putting a restored checkpoint into a running Trainer, and the data loader where the run left it.

Lightning has no public API for a callback to restore the full training state, and with a plain
``DataLoader`` it replays a resumed epoch from its first batch. These functions use the private
internals of Lightning 2.5 and later (``trainer._checkpoint_connector``, ``trainer.fit_loop._data_fetcher``
and the loops' restart stages, added in 2.5), and say so when they are missing.

Example (inside the callback)::

    checkpoint = restore_modules(trainer, checkpoint, source=path)  # before the callbacks' on_fit_start
    restore_training_state(trainer, checkpoint, source=path)       # after them
    position = plan_data_position(trainer)                         # in on_train_start
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import packaging.version
import torch

from ckpt import casts, errors, leaves
from ckpt.integrations.lightning import rng


def restore_modules(trainer: Any, checkpoint: dict, *, source: str,
                    check_model: Callable[[dict], None] | None = None) -> dict:
    """Restores what Lightning's own restore puts back before the callbacks' ``on_fit_start``: the model,
    the datamodule and the callbacks' states (``BaseFinetuning`` adds back its parameter groups in
    ``on_fit_start`` from its state). Call on every rank, after the strategy set the model and optimizers
    up, before the other callbacks' ``on_fit_start`` (see :func:`call_first_at_fit_start`); then
    :func:`restore_training_state` with the checkpoint returned (upgraded by Lightning's migration).
    ``check_model(state_dict)`` sees the weights as the module's ``on_load_checkpoint`` left them (keys
    renamed, weights its ``on_save_checkpoint`` left out put back), before they are loaded."""
    connector = _private(trainer, "_checkpoint_connector")
    connector._loaded_checkpoint = checkpoint = migrate(lightning_package(trainer), checkpoint, source)
    # Lightning's connector.restore_model(), with the check between its hook and its load
    call = importlib.import_module(f"{lightning_package(trainer)}.trainer.call")
    call._call_lightning_module_hook(trainer, "on_load_checkpoint", checkpoint)
    if check_model is not None:
        check_model(checkpoint["state_dict"])
    trainer.strategy.load_model_state_dict(checkpoint, strict=trainer.lightning_module.strict_loading)
    connector.restore_datamodule()
    connector.restore_callbacks()
    return connector._loaded_checkpoint


def restore_training_state(trainer: Any, checkpoint: dict, *, source: str) -> None:
    """Restores the rest of ``checkpoint`` (what :func:`restore_modules` returned), as Lightning does after
    the callbacks' ``on_fit_start``: the precision plugin, loops, optimizers and LR schedulers
    (``ReduceLROnPlateau`` included); the later built-in restore then finds nothing to do. A callback's
    ``on_fit_start`` may have restored a checkpoint of its own meanwhile (``BatchSizeFinder`` does)."""
    connector = _private(trainer, "_checkpoint_connector")
    connector._loaded_checkpoint = checkpoint
    connector.restore_training_state()
    connector.resume_end()
    rank_zero_info(trainer, f"Restored all states from the ckpt checkpoint at {source}")


def optimizer_classes(trainer: Any) -> list[str]:
    """The class names of ``trainer``'s optimizers, which no Lightning checkpoint records."""
    return [type(optimizer).__qualname__ for optimizer in trainer.optimizers]


def check_optimizers(trainer: Any, saved: list[str] | None, *, source: str) -> None:
    """Raises ValueError when ``trainer``'s optimizers are not of the classes ``saved`` (from
    :func:`optimizer_classes`; None: not recorded) that the checkpoint at ``source`` was saved with: an
    optimizer's state loads into another class without complaint, and its first step fails (SGD's state
    in Adam: ``KeyError: 'step'``)."""
    current = optimizer_classes(trainer)
    if saved is not None and list(saved) != current:
        raise ValueError(f"{source} was saved with the optimizers {list(saved)}, and this run has {current}: "
                         "their states do not fit each other. Use the optimizers it was trained with, or a new "
                         "directory.")


def check_parameter_groups(trainer: Any, checkpoint: dict, *, source: str) -> None:
    """Raises ValueError when the optimizer states of ``checkpoint`` (saved at ``source``) hold other numbers of
    parameters per group than ``trainer``'s optimizers: a fit of another stage in the same directory (a head
    trained first, then the whole model), whose restore torch refuses with "loaded state dict contains a
    parameter group that doesn't match the size of optimizer's group", naming neither. Strategies that set
    their optimizers themselves (``lightning_restore_optimizer`` False) are left to torch."""
    states = checkpoint.get("optimizer_states")
    if states is None or not getattr(trainer.strategy, "lightning_restore_optimizer", True):
        return
    saved = [[len(group["params"]) for group in state["param_groups"]] for state in states]
    current = [[len(group["params"]) for group in optimizer.param_groups] for optimizer in trainer.optimizers]
    if saved != current:
        raise ValueError(f"{source} was saved with optimizers whose parameter groups hold {saved} parameters, and "
                         f"this run's hold {current}: it trains other parameters (another stage of training, or "
                         "another model). Give each stage a directory of its own, or use the optimizers it was "
                         "trained with.")


def check_optimizer_values(trainer: Any, checkpoint: dict, *, source: str) -> None:
    """Raises ValueError naming each optimizer state value of ``checkpoint`` (saved at ``source``) that torch's
    ``Optimizer.load_state_dict`` would change in its cast into the dtype of its parameter (each state of a
    floating-point parameter but ``step``): a state saved of float32 parameters, restored for a float16 model,
    whose ``exp_avg_sq`` of 1e10 torch makes inf. Call after :func:`check_parameter_groups`."""
    states = checkpoint.get("optimizer_states")
    if states is None or not getattr(trainer.strategy, "lightning_restore_optimizer", True):
        return
    problems = []
    for k, (state, optimizer) in enumerate(zip(states, trainer.optimizers)):
        ids = [i for group in state["param_groups"] for i in group["params"]]  # (torch pairs them in this order)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, param in zip(ids, params):
            for key, value in state["state"].get(i, {}).items() if param.is_floating_point() else ():
                why = cast_refusal(value, param.dtype) if key != "step" else None
                if why is not None:
                    problems.append(f"optimizer_states[{k}]['state'][{i}][{key!r}]: {why}")
    if problems:
        raise ValueError(f"{source} holds optimizer states that this run's parameters cannot hold: "
                         + "; ".join(problems) + ". Restore it into parameters of the dtypes it was saved with.")


def cast_refusal(value: Any, dtype: torch.dtype | None) -> str | None:
    """Why a cast of ``value`` (a tensor; anything else: None) into ``dtype`` (None: none), as a state dict's
    load makes it, would change one of its values (an integer out of range, a finite float made inf), or None."""
    if not isinstance(value, torch.Tensor) or dtype is None or value.dtype == dtype:
        return None
    try:
        leaves.torch_cast(leaves.torch_to_numpy((), value), dtype)
    except casts.OutOfRangeError as e:
        return f"{e}"
    return None


def tuner_fit(trainer: Any) -> bool:
    """Whether the fit under way is one that Lightning's ``Tuner`` runs for its search alone
    (``Tuner.lr_find``, ``Tuner.scale_batch_size``): its finder callback ends the fit in ``on_fit_start``,
    and the search starts from the module's weights as they are (no ``ckpt_path`` reaches it)."""
    callbacks = importlib.import_module(f"{lightning_package(trainer)}.callbacks")
    finders = (callbacks.LearningRateFinder, callbacks.BatchSizeFinder)
    return any(isinstance(c, finders) and getattr(c, "_early_exit", False) for c in trainer.callbacks)


def loaded_checkpoint(trainer: Any) -> dict | None:
    """The checkpoint of ``trainer.fit(ckpt_path=...)`` whose training state Lightning has yet to restore
    (None when there is none, or once restored)."""
    return _private(trainer, "_checkpoint_connector")._loaded_checkpoint or None


def trainable(module: Any) -> torch.Tensor:
    """Which of ``module``'s parameters require gradients, in ``parameters()`` order (a tensor: Lightning's
    own files hold it too, read by ``torch.load(weights_only=True)``): no checkpoint holds it, and
    ``BaseFinetuning`` unfreezes in an epoch-start hook but freezes again in every ``setup``."""
    return torch.tensor([p.requires_grad for p in module.parameters()], dtype=torch.bool)


def restore_trainable(module: Any, flags: Any) -> None:
    """Sets which parameters require gradients as :func:`trainable` recorded them (if the count matches)."""
    parameters = list(module.parameters())
    if flags is not None and len(flags) == len(parameters):
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(bool(flag))


def loaders_made_in(trainer: Any) -> int | None:
    """The epoch whose start last made the training DataLoaders (None before any), which
    ``reload_dataloaders_every_n_epochs`` counts from and no Lightning checkpoint records: a resumed fit
    makes them at its start, and would reload them every ``n`` epochs from there."""
    epoch = _private(trainer.fit_loop, "_last_train_dl_reload_epoch")
    return epoch if isinstance(epoch, int) else None


def restore_loaders_made_in(trainer: Any, epoch: int | None) -> None:
    """Has the next reload of the training DataLoaders come when it came in the saved run (``epoch``: from
    :func:`loaders_made_in`; None: not recorded). Call in ``on_train_start``, after Lightning made them."""
    if epoch is not None:
        trainer.fit_loop._last_train_dl_reload_epoch = epoch


def call_first_at_fit_start(trainer: Any, hook: Callable[[Any, Any], None]) -> None:
    """Has ``hook(trainer, pl_module)`` called at fit start before every callback's ``on_fit_start``, by a
    callback put first in ``trainer.callbacks`` (once per hook): Lightning runs checkpoint callbacks last.
    Call in ``setup``: the list is replaced, not changed in place, so the setup hooks under way go on."""
    if not any(getattr(callback, "ckpt_hook", None) == hook for callback in trainer.callbacks):
        trainer.callbacks = [_first_callback_class(lightning_package(trainer))(hook), *trainer.callbacks]


def run_after_the_others(trainer: Any, ours: list[Any]) -> list[Any] | None:
    """Moves ``ours`` (callbacks of ``trainer``, kept in their order) after every other callback, so that a
    checkpoint they take in a hook holds the states the others' same hook gave (a ``ModelCheckpoint`` listed
    after them saves its file of the step there, and its state then names it); returns the list as it was
    (None: already so), for :func:`restore_order`. Call in ``setup``: the list is replaced, not changed in place."""
    callbacks = list(trainer.callbacks)
    mine = {id(c) for c in ours}
    moved = [c for c in callbacks if id(c) not in mine] + [c for c in callbacks if id(c) in mine]
    if [id(c) for c in moved] == [id(c) for c in callbacks]:
        return None
    trainer.callbacks = moved
    return callbacks


def restore_order(trainer: Any, order: list[Any] | None) -> None:
    """Puts ``trainer``'s callbacks back in ``order`` (from :func:`run_after_the_others`) when it still holds them
    all: Lightning's ``ckpt_path="best"`` reads the first checkpoint callback in the order the user gave. Those
    added since (by another CheckpointCallback's ``setup``: :func:`call_first_at_fit_start`) go first."""
    given = {id(c) for c in order or ()}
    if order is not None and given <= {id(c) for c in trainer.callbacks}:
        trainer.callbacks = [c for c in trainer.callbacks if id(c) not in given] + order


@functools.cache
def _first_callback_class(package: str) -> type:
    base = importlib.import_module(f"{package}.callbacks").Callback

    class CkptFitStart(base):  # type: ignore[misc, valid-type]
        """Runs the restore of ckpt's CheckpointCallback before the other callbacks' ``on_fit_start``."""

        def __init__(self, hook: Callable[[Any, Any], None]) -> None:
            self.ckpt_hook = hook

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.ckpt_hook(trainer, pl_module)

    return CkptFitStart


def rank_zero_info(trainer: Any, message: str) -> None:
    """Prints like Lightning's own messages (its logger, global rank 0 only)."""
    importlib.import_module(f"{lightning_package(trainer)}.utilities.rank_zero").rank_zero_info(message)


def migrate(package: str, checkpoint: dict, source: str) -> dict:
    """Lightning's upgrade of a checkpoint written by an older Lightning (a no-op for the same version);
    ``package``: ``"pytorch_lightning"`` or ``"lightning.pytorch"``.

    Raises:
      CheckpointCorruptedError: the step at ``source`` records no Lightning version it was written by (Lightning's
        upgrade raised a bare KeyError or packaging's InvalidVersion).
    """
    version = checkpoint.get(_VERSION)
    try:
        packaging.version.Version(version)
    except (TypeError, ValueError):  # (InvalidVersion is a ValueError)
        raise errors.CheckpointCorruptedError(f"{source}: its {_VERSION!r} is {version!r}, not the version of "
                                              "Lightning that wrote it", path=source) from None
    utils = importlib.import_module(f"{package}.utilities.migration.utils")
    return utils._pl_migrate_checkpoint(checkpoint, source)


_VERSION = "pytorch-lightning_version"  # (Lightning's key, in either package)


def lightning_package(trainer: Any) -> str:
    """``"pytorch_lightning"`` or ``"lightning.pytorch"``: the namespace ``trainer``'s class comes from."""
    for cls in type(trainer).__mro__:
        if cls.__name__ == "Trainer" and cls.__module__.endswith(".trainer.trainer"):
            return cls.__module__.split(".trainer.trainer")[0]
    raise TypeError(f"{type(trainer).__qualname__} is not a Lightning Trainer")


def dump_checkpoint(trainer: Any, *, hooks: bool = True) -> dict:
    """The full checkpoint dict Lightning's ``trainer.save_checkpoint`` would write (call on every rank).

    Without ``hooks``, for a dump that is not a save (to size the memory of the next save, to check
    the values before training), the module's and the callbacks' ``on_save_checkpoint`` are not called:
    a hook with side effects would see a save that never happened. Lightning has no such option, so
    the hooks are shadowed on the instances while it dumps."""
    connector = _private(trainer, "_checkpoint_connector")
    if hooks:
        return connector.dump_checkpoint(weights_only=False)
    owners = [trainer.lightning_module, *trainer.callbacks]
    own = [owner.__dict__.get("on_save_checkpoint", _NONE) for owner in owners]
    for owner in owners:
        owner.on_save_checkpoint = _no_hook
    try:
        return connector.dump_checkpoint(weights_only=False)
    finally:
        for owner, hook in zip(owners, own):
            if hook is _NONE:
                del owner.on_save_checkpoint
            else:
                owner.on_save_checkpoint = hook


_NONE = object()


def after_module_hook(trainer: Any, name: str, then: Callable[[], None]) -> None:
    """Has ``then()`` run right after the LightningModule's own hook ``name`` that Lightning calls next: it calls a
    hook on the callbacks first, then on the module, so that a checkpoint a callback takes in its hook misses what
    the module's hook changes (an average of the weights it keeps, a scheduler it steps). Call in a callback's hook
    ``name``; the module's hook is shadowed on the instance until it runs."""
    module = trainer.lightning_module
    own = module.__dict__.get(name, _NONE)
    hook = getattr(module, name)

    def shadow(*args: Any, **kwargs: Any) -> Any:
        if own is _NONE:
            delattr(module, name)
        else:
            setattr(module, name, own)
        result = hook(*args, **kwargs) if callable(hook) else None
        then()
        return result

    setattr(module, name, shadow)


def saving_hooks_overridden(trainer: Any) -> bool:
    """Whether the module or a callback of ``trainer`` has an ``on_save_checkpoint`` of its own, which may change
    what a save stores (make a value storable, as the error for an unstorable value advises)."""
    package = lightning_package(trainer)
    module_hook = importlib.import_module(f"{package}.core.hooks").CheckpointHooks.on_save_checkpoint
    callback_hook = importlib.import_module(f"{package}.callbacks").Callback.on_save_checkpoint
    return (type(trainer.lightning_module).on_save_checkpoint is not module_hook
            or any(type(c).on_save_checkpoint is not callback_hook for c in trainer.callbacks))


def _no_hook(*args: Any) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a restored run stands in its epoch, as Lightning's loops will continue it.

    skip: batches of the epoch in progress already trained (with ``replay_epoch``).
    replay_epoch: an epoch is in progress: its data order must be drawn again from the RNG states
      recorded at its start, and ``skip`` batches passed over.
    new_epoch: a new epoch starts with the next batch; Lightning makes no iterator for it (after a
      restore it reuses the one from ``setup_data``, which drew its seeds before the RNG states
      were restored, and for which stateful loaders may not have had their states yet).
    epoch_start_hook: ``on_train_epoch_start`` runs before the next batch.
    """

    skip: int
    replay_epoch: bool
    new_epoch: bool
    epoch_start_hook: bool


def plan_data_position(trainer: Any) -> DataPosition | None:
    """How to position the data of a restored fit; None when Lightning restores it (stateful loaders
    whose states it loaded), nothing was restored, or Lightning first finishes the saved epoch and then
    iterates as usual. Call in ``on_train_start``, after ``FitLoop.reset`` set the restart stages."""
    fit_loop = trainer.fit_loop
    fetcher = _private(fit_loop, "_data_fetcher")
    if (not fit_loop.is_resuming or fetcher is None or _private(fit_loop, "restarted_on_epoch_end")
            or (_loaders_are_stateful(fetcher) and not _unloaded_loader_states(fit_loop))):
        return None
    hook = not fit_loop.restarted_mid_epoch
    epoch_loop = fit_loop.epoch_loop
    if epoch_loop.restarting:  # Lightning continues the saved epoch's batch count (see _TrainingEpochLoop.reset)
        on_batch_end = _private(epoch_loop, "restarted_on_train_batch_end")
        done = epoch_loop.batch_progress.current.completed + int(on_batch_end)
        if done < trainer.num_training_batches:
            return DataPosition(skip=done, replay_epoch=True, new_epoch=False, epoch_start_hook=hook)
        if not on_batch_end:
            return None
    return DataPosition(skip=0, replay_epoch=False, new_epoch=True, epoch_start_hook=hook)


def load_loader_states_left_unloaded(trainer: Any) -> None:
    """Loads the restored states of stateful loaders into them and makes the data iterator again, where
    Lightning meant to while its loops restart but did not: ``setup_data`` made the loaders before the
    restore (``trainer.estimated_stepping_batches`` read in ``configure_optimizers``), and skips them
    after it (Lightning issue #20550). Call in ``on_train_start``, before :func:`plan_data_position`."""
    fit_loop = trainer.fit_loop
    states = _unloaded_loader_states(fit_loop)
    if fit_loop.restarting and states:
        fit_loop._combined_loader._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []
        iter(fit_loop._data_fetcher)


def new_epoch_iterator(trainer: Any) -> None:
    """Makes the epoch's data iterator, as ``_TrainingEpochLoop.on_run_start`` does for epochs after the first,
    once stateful loaders have ended the saved epoch with the restored states that Lightning left unloaded, and
    the samplers have the epoch's number (a DataLoader with workers draws its first indices as the iterator is
    made)."""
    fit_loop = trainer.fit_loop
    states = _unloaded_loader_states(fit_loop)
    if states:
        fit_loop._combined_loader._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []
        # states taken at an epoch's end give iterators that end at once (torchdata's StatefulDataLoader): made
        # here, they end that epoch, as in Lightning's own restart; their draws are undone, so that the next
        # epoch's iterator draws what it drew in the run never stopped
        draws = rng.capture(train_loaders(trainer))
        iter(fit_loop._data_fetcher)
        rng.restore(draws, train_loaders(trainer))
    _set_sampler_epoch(trainer, fit_loop.epoch_progress.current.processed)  # the number FitLoop gives them
    iter(fit_loop._data_fetcher)


def _unloaded_loader_states(fit_loop: Any) -> list[dict]:
    """The restored states of stateful loaders that Lightning has not loaded: it loads them in ``setup_data``
    only while its loops restart, and a checkpoint taken at an epoch's end starts the next epoch instead
    (see :func:`ckpt.integrations.lightning.tail.continue_after`)."""
    return _private(fit_loop, "_combined_loader_states_to_load")


def skip_batches(trainer: Any, count: int, epoch: int) -> int:
    """Draws ``count`` batches of the current epoch, leaving the fetcher's counters as Lightning expects;
    returns how many there were (fewer when the data has become shorter: the epoch then ends at once).

    The samplers get ``epoch`` first (Lightning sets it only after ``on_train_start``; a
    ``DistributedSampler`` shuffles by it). Lightning adds the restored batch count to ``fetched``
    when the epoch loop starts, so the batches drawn here are taken off it again.
    """
    _set_sampler_epoch(trainer, epoch)
    fetcher = trainer.fit_loop._data_fetcher
    drawn = 0
    while drawn < count:
        try:
            next(fetcher)
        except StopIteration:  # an IterableDataset without __len__ shorter than when it was saved
            break
        drawn += 1
    fetcher.fetched -= drawn
    return drawn


def _set_sampler_epoch(trainer: Any, epoch: int) -> None:
    """Gives the training loaders' samplers with ``set_epoch`` (a ``DistributedSampler`` shuffles by it) ``epoch``."""
    for loader in train_loaders(trainer):
        for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)


def train_loaders(trainer: Any) -> list[Any]:
    """The training DataLoaders as Lightning iterates them (after its own processing)."""
    fetcher = _private(trainer.fit_loop, "_data_fetcher")
    if fetcher is None or fetcher._combined_loader is None:
        return []
    return list(fetcher.combined_loader.flattened)


def _loaders_are_stateful(fetcher: Any) -> bool:
    loaders = fetcher.combined_loader.flattened
    return bool(loaders) and all(hasattr(dl, "state_dict") and hasattr(dl, "load_state_dict") for dl in loaders)


def _private(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(f"{type(obj).__qualname__} has no {name}: ckpt.integrations.lightning needs Lightning "
                           "2.5 or later (tested with 2.6)") from None
