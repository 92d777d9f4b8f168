"""`SWA`: Stochastic Weight Averaging as a `model.fit` callback.

The callback wires the pieces together and nothing more: from the SWA start on it drives the
optimizer's learning rate with a `keras_swa.schedules` schedule (constant `swa_lr`, or the paper's
cyclic schedule from `swa_lr` down to `swa_lr_min`), captures the weights into an
`AveragedWeights` at the end of every cycle (where the cyclic learning rate is at its minimum),
and at the end of training writes the averages into the model, recomputes BatchNorm statistics
with `keras_swa.update_bn` and, if asked, exports a SavedModel with `keras_swa.export_saved_model`.

Reference: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018, arXiv 1803.05407.
"""

import contextlib
import numbers
import os
import warnings

from keras_swa import backend
from keras_swa import model_variables, rule_arguments
from keras_swa.arguments import is_int
from keras_swa.averaged_weights import AveragedWeights
from keras_swa.backend import keras
from keras_swa.backup_files import FileStateBackup
from keras_swa.batch_norm import update_bn
from keras_swa.distribution import find_strategy
from keras_swa.export import export_saved_model
from keras_swa.schedules import Cyclic

__all__ = ["SWA"]

_CYCLE_UNITS = ("epoch", "step")


def _is_positive_number(value):
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and value > 0
        and value == value  # not NaN
        and value != float("inf")
    )


class SWA(keras.callbacks.Callback):
    """Stochastic Weight Averaging for `model.fit`.

    From the SWA start on, the weights are captured at the end of every cycle of `cycle_length`
    epochs (or steps) into an equal-weight running average. If `swa_lr` is given the callback also
    sets the optimizer's learning rate from the start on: constant `swa_lr`, or, with
    `swa_lr_min`, the paper's cyclic schedule that falls linearly from `swa_lr` to `swa_lr_min`
    within each cycle, so that captures happen where the learning rate is `swa_lr_min`. At the end
    of training the averages are written into the model, the BatchNorm statistics are recomputed
    for them from `bn_data` (one pass, exact cumulative averages), and with `export_dir` a
    SavedModel is written.

    The number of captures is logged as `swa_n`, the learning rate as `learning_rate`, in each
    epoch's logs (and so in the `History`).

    Args:
        start_epoch: first epoch (0-based) of the SWA phase: an int, or a float in (0, 1) read as a
            fraction of the `epochs` passed to `fit`. With `cycle_unit="epoch"` the first capture
            is at the end of epoch `start_epoch + cycle_length - 1`. Give this or `start_step`;
            when neither is given SWA starts at epoch 0.
        start_step: number of optimizer steps (`optimizer.iterations`) before the SWA phase;
            only with `cycle_unit="step"`.
        cycle_length: positive int, the length of a cycle in `cycle_unit`s; one capture per
            cycle. Defaults to 1.
        cycle_unit: `"epoch"` or `"step"`. Defaults to `"epoch"`.
        swa_lr: the SWA learning rate (a1 in the paper); `None` leaves the optimizer's learning
            rate alone and only averages. Defaults to `None`.
        swa_lr_min: the learning rate at the end of each cycle (a2); makes the schedule cyclic.
            Requires `swa_lr` and `swa_lr_min <= swa_lr`. Defaults to `None` (constant `swa_lr`).
        bn_data: data for the final BatchNorm pass (anything `keras_swa.update_bn` accepts,
            usually the training data without augmentation). Required when the model has
            BatchNormalization layers.
        bn_steps: number of batches of `bn_data` to use. Defaults to `None` (all of it).
        bn_batch_size: batch size for array `bn_data` (datasets are already batched).
            Defaults to `None` (`update_bn`'s default).
        export_dir: if given, the final model is exported there as a SavedModel
            (`keras_swa.export_saved_model`; on JAX it needs TensorFlow installed).
        overwrite_export: replace an existing SavedModel at `export_dir`. Defaults to `False`.
        mode: `"swa"` (equal-weight average) or `"ema"` (exponential moving average with
            `decay`, captured on the same cycle ends). Defaults to `"swa"`.
        decay: EMA decay in [0, 1), required with `mode="ema"` and refused otherwise.
        include_non_trainable: average the non-trainable variables too (with a `variables`
            predicate: offer them to it too). Defaults to `False`.
        nonfinite: a capture with NaN/Inf weights (training diverged) `"raise"`s an error that
            names the epoch or step and the first bad variable, is `"skip"`ped with a
            warning (not counted), or is averaged in as it is with `"ignore"` (no check, one
            read of the weights fewer per capture). Only `"ignore"` can poison the average.
            Defaults to `"raise"`.
        backup_dir: a directory for SWA's own crash-safe state (averages, count, captures).
            Use it with `keras.callbacks.BackupAndRestore`: pass the same directory and the
            same frequency, and put `SWA` BEFORE `BackupAndRestore` in the callbacks list. A
            run killed at any point and restarted with the same command then ends with the
            same captures and averages as an uninterrupted one. Under
            MultiWorkerMirroredStrategy, as with BackupAndRestore, only the chief writes it
            (the other workers write a temporary folder beside it and delete it) and every
            worker restores from it, so it must be on storage that all workers can read.
            On JAX the state is a `.weights.h5` file plus a JSON file per saved step
            (`keras_swa.backup_files`) instead of a TensorFlow checkpoint.
            Defaults to `None` (no state saved).
        backup_freq: `"epoch"` or a positive int number of steps, as BackupAndRestore's
            `save_freq`. Defaults to `"epoch"`.
        swa_validation_data: `(x, y)` arrays or a dataset: at the end of every
            `swa_validation_freq`-th epoch with captures, the averaged weights are evaluated on
            it (with BatchNorm recomputed from `bn_data`) and the results are logged as
            `val_swa_loss`, `val_swa_<metric>`. Every variable of the model is restored
            afterwards, so training follows exactly the same trajectory. Defaults to `None`.
        swa_validation_freq: positive int, evaluate every this many epochs. Defaults to 1.
        verbose: 0 (silent) or 1: a message at each capture (step captures: one message at
            the epoch's end), on resume and at the end of training, printed as Keras' own
            callbacks print theirs (`"\nEpoch 5: SWA ..."`), so to absl logging when
            `keras.config.disable_interactive_logging()` is in effect. Defaults to 1.
        variables: what to average, resolved against the model at train begin: `None` (all
            trainable variables, see `include_non_trainable`), a list of the model's variables,
            or a callable `variable -> bool` applied to each trainable variable (e.g.
            `lambda v: v.path.startswith("head")`). The others keep the last iterate at the
            end. Defaults to `None`.
        dynamic_decay: with `mode="ema"`, warm the decay up as
            `min(decay, (1 + n) / (10 + n))` (tensorflow-addons' `dynamic_decay`; see
            `AveragedWeights`). Defaults to `False`.
        warmup_power: with `mode="ema"`, timm's warm-up
            `min(decay, 1 - (1 + n / warmup_gamma) ** -warmup_power)`. Defaults to `None`.
        warmup_gamma: see `warmup_power`. Defaults to 1.0.
        avg_fn: a custom averaging rule `(average, value, n_averaged) -> new_average`
            (torch's `avg_fn`), traced into the one compiled update; leave `mode="swa"`.
            Defaults to `None`.

    Example:

    ```python
    swa = keras_swa.SWA(start_epoch=0.75, swa_lr=0.01, bn_data=x_train)
    model.fit(x_train, y_train, epochs=40, callbacks=[swa])
    # `model` now holds the SWA weights with recomputed BatchNorm statistics.
    ```
    """

    def __init__(
        self,
        start_epoch=None,
        start_step=None,
        cycle_length=1,
        cycle_unit="epoch",
        swa_lr=None,
        swa_lr_min=None,
        bn_data=None,
        bn_steps=None,
        bn_batch_size=None,
        export_dir=None,
        overwrite_export=False,
        mode="swa",
        decay=None,
        include_non_trainable=False,
        nonfinite="raise",
        backup_dir=None,
        backup_freq="epoch",
        swa_validation_data=None,
        swa_validation_freq=1,
        verbose=1,
        variables=None,
        dynamic_decay=False,
        warmup_power=None,
        warmup_gamma=1.0,
        avg_fn=None,
    ):
        backend.require_backend("SWA")
        # Refused by name where they do not run yet (e.g. on JAX), never silently skipped.
        backend.require_argument_backend("SWA", "backup_dir", backup_dir)
        backend.require_argument_backend("SWA", "export_dir", export_dir)
        if export_dir is not None and backend.backend_name() == "jax":
            from keras_swa.backends.jax_export import require_tensorflow

            require_tensorflow("keras_swa.SWA(export_dir=...)", f"export_dir={export_dir!r}")
        super().__init__()
        if start_epoch is not None and start_step is not None:
            raise ValueError(
                "Give either `start_epoch` or `start_step`, not both. "
                f"Received: start_epoch={start_epoch!r}, start_step={start_step!r}"
            )
        if start_epoch is not None:
            if is_int(start_epoch):
                if start_epoch < 0:
                    raise ValueError(
                        "`start_epoch` must be a non-negative int or a float in (0, 1). "
                        f"Received: start_epoch={start_epoch!r}"
                    )
            elif not (
                isinstance(start_epoch, float) and 0.0 < start_epoch < 1.0
            ):
                raise ValueError(
                    "`start_epoch` must be a non-negative int or a float in (0, 1) (a fraction "
                    f"of the epochs passed to fit). Received: start_epoch={start_epoch!r}"
                )
        if start_step is not None and not (is_int(start_step) and start_step >= 0):
            raise ValueError(
                f"`start_step` must be a non-negative int. Received: start_step={start_step!r}"
            )
        if not (is_int(cycle_length) and cycle_length >= 1):
            raise ValueError(
                "`cycle_length` must be a positive integer. "
                f"Received: cycle_length={cycle_length!r}"
            )
        if cycle_unit not in _CYCLE_UNITS:
            raise ValueError(
                f"`cycle_unit` must be one of {_CYCLE_UNITS}. Received: cycle_unit={cycle_unit!r}"
            )
        if start_step is not None and cycle_unit != "step":
            raise ValueError(
                "`start_step` counts optimizer steps and needs `cycle_unit='step'`; use "
                "`start_epoch` with epoch cycles. "
                f"Received: start_step={start_step!r}, cycle_unit={cycle_unit!r}"
            )
        if swa_lr is not None and not _is_positive_number(swa_lr):
            raise ValueError(f"`swa_lr` must be a positive number. Received: swa_lr={swa_lr!r}")
        if swa_lr_min is not None:
            if swa_lr is None:
                raise ValueError(
                    "`swa_lr_min` makes the schedule cyclic and needs `swa_lr` (the learning "
                    f"rate at the start of each cycle). Received: swa_lr=None, "
                    f"swa_lr_min={swa_lr_min!r}"
                )
            if not _is_positive_number(swa_lr_min):
                raise ValueError(
                    f"`swa_lr_min` must be a positive number. Received: swa_lr_min={swa_lr_min!r}"
                )
            if swa_lr_min > swa_lr:
                raise ValueError(
                    "`swa_lr_min` must not exceed `swa_lr`: the cyclic schedule falls from "
                    f"`swa_lr` to `swa_lr_min`. Received: swa_lr={swa_lr!r}, "
                    f"swa_lr_min={swa_lr_min!r}"
                )
        if bn_steps is not None and not (is_int(bn_steps) and bn_steps >= 1):
            raise ValueError(f"`bn_steps` must be a positive int. Received: bn_steps={bn_steps!r}")
        if export_dir is not None and not isinstance(export_dir, (str, bytes)) and not hasattr(
            export_dir, "__fspath__"
        ):
            raise TypeError(f"`export_dir` must be a path. Received: export_dir={export_dir!r}")
        if backup_freq != "epoch" and not (is_int(backup_freq) and backup_freq >= 1):
            raise ValueError(
                "`backup_freq` must be 'epoch' or a positive int number of steps. "
                f"Received: backup_freq={backup_freq!r}"
            )
        if backup_dir is not None and not isinstance(backup_dir, (str, bytes)) and not hasattr(
            backup_dir, "__fspath__"
        ):
            raise TypeError(f"`backup_dir` must be a path. Received: backup_dir={backup_dir!r}")
        if not (is_int(swa_validation_freq) and swa_validation_freq >= 1):
            raise ValueError(
                "`swa_validation_freq` must be a positive int. "
                f"Received: swa_validation_freq={swa_validation_freq!r}"
            )
        if verbose not in (0, 1):  # True and False are 1 and 0
            raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
        # AveragedWeights' own checks, made now: the callback creates it only at train begin.
        rule_arguments.check_rule(
            mode, decay, nonfinite, dynamic_decay, warmup_power, warmup_gamma, avg_fn
        )
        if variables is not None and not callable(variables):
            if not isinstance(variables, (list, tuple)):
                raise TypeError(
                    "`variables` must be a list of the model's variables or a callable "
                    f"`variable -> bool`. Received: variables={variables!r}"
                )
            if not variables:
                raise ValueError(
                    "`variables` is empty: there would be nothing to average. "
                    f"Received: variables={variables!r}"
                )
            if include_non_trainable:
                raise ValueError(
                    "`include_non_trainable` widens the candidates of a `variables` predicate "
                    "and means nothing with a list of variables: list the non-trainable ones "
                    "too. Received: variables=[...], include_non_trainable=True"
                )

        self.start_epoch = start_epoch
        self.start_step = start_step
        self.cycle_length = int(cycle_length)
        self.cycle_unit = cycle_unit
        self.swa_lr = None if swa_lr is None else float(swa_lr)
        self.swa_lr_min = None if swa_lr_min is None else float(swa_lr_min)
        self.bn_data = bn_data
        self.bn_steps = bn_steps
        self.bn_batch_size = bn_batch_size
        self.export_dir = export_dir
        self.overwrite_export = bool(overwrite_export)
        self.mode = mode
        self.decay = decay
        self.include_non_trainable = include_non_trainable
        self.variables = variables
        self.dynamic_decay = dynamic_decay
        self.warmup_power = warmup_power
        self.warmup_gamma = warmup_gamma
        self.avg_fn = avg_fn
        self.nonfinite = nonfinite
        self.backup_dir = backup_dir
        self.backup_freq = backup_freq
        self._backup = None
        self._restored = False
        self._resumed = False
        self.swa_validation_data = swa_validation_data
        self.swa_validation_freq = int(swa_validation_freq)
        self.verbose = int(verbose)

        self.averaged = None
        self.captures = []  # (epoch, step, learning rate) of every capture, for inspection
        self._start_epoch = None  # resolved at train begin
        self._start_iteration = start_step  # optimizer.iterations when the SWA phase begins
        self._last_swa_step = 0
        self._cyclic = None  # the Cyclic schedule, built at train begin
        self._known_iteration = None  # optimizer.iterations as last read within this epoch
        self._current_lr = None  # the learning rate this callback last set in this fit
        self._epoch = None  # the epoch running or last finished, for the messages
        self._pending_steps = []  # step captures of this epoch, reported at its end

        # Batch hooks are bound per instance, only when needed: a callback that overrides
        # `on_train_batch_end` turns off Keras' asynchronous dispatch for the whole fit.
        if cycle_unit == "step" or (backup_dir is not None and backup_freq != "epoch"):
            self.on_train_batch_end = self._on_step_end
        if cycle_unit == "step" or swa_lr_min is not None:
            self.on_train_batch_begin = self._set_learning_rate_for_step

    # ------------------------------------------------------------------ helpers

    def _iterations(self):
        return int(self.model.optimizer.iterations.numpy())

    def _cycle_steps(self):
        if self.cycle_unit == "step":
            return self.cycle_length
        return self.cycle_length * self._steps_per_epoch

    def _schedule(self):
        if self.swa_lr_min is None:
            return None
        return Cyclic(self.swa_lr, self.swa_lr_min, self._cycle_steps())

    def _in_swa_phase(self):
        return self._start_iteration is not None

    def _log(self, message, new_line=True):
        """Prints `Epoch N: SWA <message>` as Keras' callbacks print theirs (`verbose=1`).

        `new_line` starts with a line break that ends the epoch's progress bar line first, as
        `ModelCheckpoint` and `ReduceLROnPlateau` do; with interactive logging disabled the
        message goes to absl logging instead (`keras_swa.backend.print_msg`).
        """
        if not self.verbose:
            return
        prefix = "SWA" if self._epoch is None else f"Epoch {self._epoch + 1}: SWA"
        backend.print_msg(("\n" if new_line else "") + f"{prefix} {message}")

    def _selected_variables(self, model):
        """The model, or the variables `variables` picks from it (checked against it)."""
        if self.variables is None:
            return model
        if callable(self.variables):
            candidates = (
                model.variables if self.include_non_trainable else model.trainable_variables
            )
            selected = [v for v in candidates if self.variables(v)]
            if not selected:
                kind = "" if self.include_non_trainable else "trainable "
                raise ValueError(
                    f"`variables` selected none of the model's {len(candidates)} {kind}"
                    f"variables. Received: variables={self.variables!r}"
                )
            return selected
        own = {id(v) for v in model.variables}
        seen = set()
        for v in self.variables:
            if id(v) not in own:
                raise ValueError(
                    f"`variables` must be variables of the model; {model_variables.variable_name(v)!r} is not "
                    f"one of them. Received: variables={self.variables!r}"
                )
            if id(v) in seen:
                raise ValueError(
                    f"`variables` lists {model_variables.variable_name(v)!r} twice. "
                    f"Received: variables={self.variables!r}"
                )
            seen.add(id(v))
        return list(self.variables)

    # ------------------------------------------------------------------ crash-safe state

    def _state(self):
        return {
            "start_epoch": self._start_epoch,
            "start_iteration": self._start_iteration,
            "last_swa_step": self._last_swa_step,
            "captures": [list(c) for c in self.captures],
        }

    def _maybe_restore(self):
        """After BackupAndRestore has restored the model: load the SWA state of that step."""
        if self._backup is None or self._restored:
            return
        self._restored = True
        step = self._iterations()
        if step == 0:
            return  # a fresh run
        state = self._backup.restore(step)
        self._start_epoch = state["start_epoch"]
        self._start_iteration = state["start_iteration"]
        self._last_swa_step = state["last_swa_step"]
        self.captures = [tuple(c) for c in state["captures"]]
        self._resumed = True
        self._log(
            f"resumed at optimizer step {step} with "
            f"n_averaged={int(self.averaged.n_averaged.numpy())}."
        )

    def _make_backup(self, model):
        """The backup of SWA's state for this backend: TensorFlow checkpoints on TensorFlow
        (`keras_swa.backends.tensorflow_backup`), `.weights.h5` + JSON files elsewhere
        (`keras_swa.backup_files`)."""
        if backend.backend_name() == "tensorflow":
            from keras_swa.backends.tensorflow_backup import StateBackup

            return StateBackup(self.backup_dir, self.averaged, strategy=find_strategy(model))
        return FileStateBackup(self.backup_dir, self.averaged)

    def _save_state(self):
        if self._backup is not None:
            self._backup.save(self._iterations(), self._state())

    def _on_step_end(self, batch, logs=None):
        if self.cycle_unit == "step":
            self._capture_on_step_cycle(batch, logs)
        if self.backup_freq != "epoch" and self._backup is not None:
            if self._iterations() % self.backup_freq == 0:
                self._save_state()

    # ------------------------------------------------------------------ train begin / end

    def on_train_begin(self, logs=None):
        model = self.model
        epochs = self.params.get("epochs") if self.params else None
        self._steps_per_epoch = (self.params or {}).get("steps")
        if isinstance(self.start_epoch, float):
            if not epochs:
                raise ValueError(
                    "A fractional `start_epoch` needs the number of epochs of `fit`. "
                    f"Received: start_epoch={self.start_epoch!r}, epochs={epochs!r}"
                )
            self._start_epoch = int(round(self.start_epoch * epochs))
        elif self.start_epoch is not None:
            self._start_epoch = self.start_epoch
        elif self.start_step is None:
            self._start_epoch = 0
        if self._start_epoch is not None and epochs and self._start_epoch >= epochs:
            warnings.warn(
                f"SWA starts at epoch {self._start_epoch} but fit runs {epochs} epochs "
                "(0-based epochs 0.."
                f"{epochs - 1}): no weights will be averaged. "
                f"Received: start_epoch={self.start_epoch!r}",
                stacklevel=2,
            )

        bn_layers = [
            layer for layer in backend.batch_norm_layers(model) if layer.trainable
        ]
        if bn_layers and self.bn_data is None:
            names = ", ".join(repr(layer.name) for layer in bn_layers)
            raise ValueError(
                "The model has BatchNormalization layers whose statistics must be recomputed "
                f"for the averaged weights ({names}): pass `bn_data` (e.g. the training "
                "inputs) to keras_swa.SWA. Received: bn_data=None"
            )
        if bn_layers:
            self._check_bn_data(model)
            if backend.backend_name() == "jax":
                # Fails now, not after training, where the final BN pass would refuse it.
                from keras_swa.backends import jax_batch_norm

                jax_batch_norm.check_distribution()
        if self.swa_lr is not None:
            # Fails here, before any training, if the learning rate cannot be set.
            backend.set_learning_rate(model.optimizer, backend.get_learning_rate(model.optimizer))
        execution = backend.steps_per_execution(model)
        if execution > 1:
            if self.swa_lr_min is not None:
                raise ValueError(
                    "The cyclic SWA schedule changes the learning rate every step, which "
                    f"`steps_per_execution={execution}` does not allow from a callback. Compile "
                    "with steps_per_execution=1, or put keras_swa.schedules.Cyclic (or "
                    "PaperSchedule) in the optimizer and pass swa_lr=None. "
                    f"Received: swa_lr_min={self.swa_lr_min!r}, steps_per_execution={execution}"
                )
            if self.cycle_unit == "step":
                bad = [
                    (name, value)
                    for name, value in (
                        ("cycle_length", self.cycle_length),
                        ("start_step", self.start_step or 0),
                    )
                    if value % execution
                ]
                if self._steps_per_epoch and self._steps_per_epoch % execution:
                    bad.append(("steps per epoch", self._steps_per_epoch))
                if bad:
                    text = ", ".join(f"{n}={v}" for n, v in bad)
                    raise ValueError(
                        "Step captures must land on cycle ends, but fit runs "
                        f"{execution} steps per execution and {text} is not a multiple of it. "
                        f"Received: steps_per_execution={execution}, {text}"
                    )
        if self.swa_lr_min is not None and self.cycle_unit == "epoch" and not self._steps_per_epoch:
            raise ValueError(
                "The cyclic schedule with epoch cycles needs the number of steps per epoch; "
                "pass `steps_per_epoch` to fit or use `cycle_unit='step'`. "
                f"Received: steps per epoch={self._steps_per_epoch!r}"
            )
        self._cyclic = self._schedule()
        self._current_lr = None
        self._epoch = None
        self._pending_steps = []
        if self.averaged is None:
            with self._strategy_scope(model):
                self.averaged = AveragedWeights(
                    self._selected_variables(model),
                    mode=self.mode,
                    decay=self.decay,
                    include_non_trainable=self.include_non_trainable,
                    nonfinite=self.nonfinite,
                    dynamic_decay=self.dynamic_decay,
                    warmup_power=self.warmup_power,
                    warmup_gamma=self.warmup_gamma,
                    avg_fn=self.avg_fn,
                    name="swa",
                )
        if self.backup_dir is not None and self._backup is None:
            self._backup = self._make_backup(model)
        self._restored = False
        self._check_export_dir()

    @staticmethod
    def _strategy_scope(model):
        """The model's `tf.distribute` strategy scope (a list of variables does not name one);
        on other backends nothing: their state does not live in TensorFlow variables."""
        if backend.backend_name() != "tensorflow":
            return contextlib.nullcontext()
        return find_strategy(model).scope()

    def _check_bn_data(self, model):
        """Cheap checks of array `bn_data` before training (datasets are checked by the pass)."""
        data = self.bn_data
        shape = getattr(data, "shape", None)
        if shape is None:
            return
        shape = tuple(shape)
        if not shape or shape[0] == 0:
            raise ValueError(
                "`bn_data` is empty: the BatchNorm statistics cannot be recomputed from it. "
                f"Received: bn_data with shape={shape}"
            )
        inputs = getattr(model, "inputs", None) or []
        if len(inputs) == 1:
            expected = tuple(inputs[0].shape)[1:]
            if len(expected) != len(shape) - 1 or any(
                e is not None and e != s for e, s in zip(expected, shape[1:])
            ):
                raise ValueError(
                    f"`bn_data` does not fit the model input of shape {(None,) + expected}. "
                    f"Received: bn_data with shape={shape}"
                )

    def _check_export_dir(self):
        """Fails before training, not after it, if the export could not be written."""
        if self.export_dir is None:
            return
        path = os.fspath(self.export_dir)
        if os.path.isfile(path):
            raise FileExistsError(
                "`export_dir` is an existing file, not a directory for the SavedModel. "
                f"Received: export_dir={path!r}"
            )
        resumable = self._backup is not None and self._backup.steps()
        if os.path.isdir(path) and not self.overwrite_export and not resumable:
            raise FileExistsError(
                "`export_dir` already exists; pass `overwrite_export=True` to replace it. "
                f"Received: export_dir={path!r}"
            )
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise PermissionError(
                f"Cannot write the SavedModel: {parent!r} is not writable. "
                f"Received: export_dir={path!r}"
            )

    def on_train_end(self, logs=None):
        self._maybe_restore()  # a run resumed after its last epoch trains no epoch at all
        self._report_step_captures()
        n = int(self.averaged.n_averaged.numpy()) if self.averaged is not None else 0
        if n == 0:
            warnings.warn(
                "SWA captured no weights during this fit (the SWA start was never reached), so "
                "the model is left as training ended it. "
                f"Received: start_epoch={self.start_epoch!r}, start_step={self.start_step!r}",
                stacklevel=2,
            )
            return
        # The tracked variables: all of the model's, or those `variables` selected.
        self.averaged.assign_to()
        self._log(f"set the model to the average of {n} captures.", new_line=False)
        if backend.batch_norm_layers(self.model):
            seen = update_bn(
                self.model,
                self.bn_data,
                steps=self.bn_steps,
                batch_size=self.bn_batch_size,
                verbose=0,
            )
            self._log(f"recomputed the BatchNorm statistics over {seen} samples.", new_line=False)
        if self.export_dir is not None:
            # A resumed job may have exported before it was killed: that model is its own.
            overwrite = self.overwrite_export or (
                self._resumed and os.path.isdir(os.fspath(self.export_dir))
            )
            path = export_saved_model(self.model, self.export_dir, overwrite=overwrite)
            if path is not None:  # None on non-chief workers, which write nothing
                self._log(f"wrote the SavedModel to {path}.", new_line=False)
        if self._backup is not None:
            self._backup.delete()

    # ------------------------------------------------------------------ epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._maybe_restore()
        self._known_iteration = None
        if self._start_epoch is not None and epoch == self._start_epoch:
            self._start_iteration = self._iterations()
        if (
            self._start_epoch is not None
            and epoch >= self._start_epoch
            and self.swa_lr is not None
            and self.swa_lr_min is None
        ):
            backend.set_learning_rate(self.model.optimizer, self.swa_lr)
            self._current_lr = self.swa_lr

    def on_epoch_end(self, epoch, logs=None):
        if (
            self.cycle_unit == "epoch"
            and self._start_epoch is not None
            and epoch >= self._start_epoch
            and (epoch - self._start_epoch + 1) % self.cycle_length == 0
        ):
            self._capture(epoch)
        self._report_step_captures()
        if self.backup_freq == "epoch":
            self._save_state()
        if (
            logs is not None
            and self.swa_validation_data is not None
            and int(self.averaged.n_averaged.numpy()) > 0
            and (epoch + 1) % self.swa_validation_freq == 0
        ):
            logs.update(self._evaluate_average())
        if logs is not None:
            logs["learning_rate"] = backend.get_learning_rate(self.model.optimizer)
            logs["swa_n"] = int(self.averaged.n_averaged.numpy())

    def _evaluate_average(self):
        """Evaluates the averaged weights (BN recomputed), then restores every variable."""
        data = self.swa_validation_data
        with model_variables.restored(self.model):
            self.averaged.assign_to()
            if backend.batch_norm_layers(self.model):
                update_bn(
                    self.model, self.bn_data, steps=self.bn_steps,
                    batch_size=self.bn_batch_size, verbose=0,
                )
            if isinstance(data, (tuple, list)):
                results = self.model.evaluate(*data, verbose=0, return_dict=True)
            else:
                results = self.model.evaluate(data, verbose=0, return_dict=True)
        return {f"val_swa_{name}": float(value) for name, value in results.items()}

    # ------------------------------------------------------------------ steps (bound per instance)

    def _set_learning_rate_for_step(self, batch, logs=None):
        if not self._in_swa_phase() or self.swa_lr is None:
            return
        if self._cyclic is None and self._current_lr is not None:
            return  # constant swa_lr, already in the optimizer
        iteration = self._known_iteration
        if iteration is None:
            iteration = self._iterations()
        swa_step = iteration - self._start_iteration + 1  # the step about to run
        if swa_step < 1:
            return
        lr = self.swa_lr if self._cyclic is None else float(self._cyclic(swa_step - 1))
        backend.set_learning_rate(self.model.optimizer, lr)
        self._current_lr = lr

    def _capture_on_step_cycle(self, batch, logs=None):
        # One read of the step counter per step; the next batch-begin hook reuses it.
        iteration = self._known_iteration = self._iterations()
        if not self._in_swa_phase():
            return
        swa_step = iteration - self._start_iteration
        if swa_step < 1:
            return
        previous, self._last_swa_step = self._last_swa_step, swa_step
        ends_crossed = swa_step // self.cycle_length - max(previous, 0) // self.cycle_length
        if ends_crossed == 0:
            return
        if ends_crossed > 1 or swa_step % self.cycle_length:
            raise RuntimeError(
                f"SWA missed a cycle end: the last capture check was at SWA step {previous} "
                f"and this one is at {swa_step} with cycle_length={self.cycle_length}."
            )
        self._capture(None, iteration)

    def _report_step_captures(self):
        """One line for the epoch's step captures, at its end: never inside its progress bar."""
        steps, self._pending_steps = self._pending_steps, []
        if not steps:
            return
        if len(steps) == 1:
            where = f"step {steps[0]}"
        elif len(steps) <= 3:
            where = "steps " + ", ".join(str(s) for s in steps)
        else:
            where = f"{len(steps)} steps ({steps[0]}, {steps[1]}, ..., {steps[-1]})"
        self._log(
            f"captured the weights at {where} (n_averaged="
            f"{int(self.averaged.n_averaged.numpy())}, learning_rate={self.captures[-1][2]:.6g})."
        )

    def _capture(self, epoch, step=None):
        if step is None:
            step = self._iterations()
        where = f"epoch {epoch + 1}" if epoch is not None else f"step {step}"
        try:
            captured = self.averaged.update()
        except FloatingPointError as e:
            raise FloatingPointError(f"SWA capture at {where} (optimizer step {step}): {e}") from e
        if not captured:
            return
        if self._current_lr is not None and self.swa_lr is not None:
            lr = self._current_lr  # set by this callback: no need to ask the optimizer
        else:
            lr = backend.get_learning_rate(self.model.optimizer)
        self.captures.append((epoch, step, lr))
        if epoch is None:
            self._pending_steps.append(step)  # reported at the epoch's end
        else:
            self._log(
                f"captured the weights (n_averaged={int(self.averaged.n_averaged.numpy())}, "
                f"learning_rate={lr:.6g})."
            )
