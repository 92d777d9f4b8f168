"""What differs per Keras backend: one module each, beside the shared code in `keras_swa/`.

The averaging math (`keras_swa.averaging`), the public classes' arguments and rules, the
callback, the schedules and the data handling are written once. What cannot be shared lives
here, one module per backend and concept, with the same interface on each backend:

- `keras_swa.backends.tensorflow`: the averaging state as `tf.Variable`s and its update as ONE
  `tf.function(jit_compile=True)` per device under `tf.distribute`, small averages packed into
  one flat variable (`keras_swa.packing`); also for tf_keras.
- `keras_swa.backends.tensorflow_swag`: `SWAG`'s statistics updated by ONE XLA `tf.function`
  per device, and its draws from `tf.random.stateless_normal`.
- `keras_swa.backends.tensorflow_finite_check`: the NaN/Inf test of a capture, as TensorFlow
  reductions run before the XLA update (what a refused capture then does is shared:
  `keras_swa.finite_check`).
- `keras_swa.backends.tensorflow_batch_norm`: the BatchNorm pass of `update_bn` as a
  `tf.function` per replica under `tf.distribute` (optionally XLA-compiled).
- `keras_swa.backends.tensorflow_backup`: SWA's crash-safe state for `BackupAndRestore` as
  `tf.train.Checkpoint`s keyed by the optimizer step (elsewhere: `keras_swa.backup_files`).
- `keras_swa.backends.jax`: the averaging state as `keras.Variable`s and its update as ONE
  `jax.jit`-compiled call with the averages' buffers donated (updated in place), small averages
  packed into one flat variable as on TensorFlow (`keras_swa.packing`).
- `keras_swa.backends.jax_swag`: `SWAG`'s statistics (mean, Welford sums, deviation ring
  buffer) updated by ONE donated `jax.jit` call, and its draws from `jax.random`.
- `keras_swa.backends.jax_finite_check`: the NaN/Inf test of a capture, traced into a compiled
  update.
- `keras_swa.backends.jax_batch_norm`: the compiled BatchNorm pass of `update_bn` (the forward
  pass in training mode inside `keras.StatelessScope`, under `jax.jit`).
- `keras_swa.backends.jax_export`: what `export_saved_model` checks and syncs before Keras'
  `ExportArchive` converts the model through jax2tf.

On TensorFlow the public classes are `tf.Module`s that hold their state's variables under fixed
attribute names, so checkpoints keep their keys (tests/test_checkpoint_keys.py). Which entry
point runs on which backend is `keras_swa.backend.SUPPORTED_BACKENDS`.
"""

__all__ = []
