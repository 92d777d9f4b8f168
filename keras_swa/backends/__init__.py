"""What differs per Keras backend: one module each, beside the shared code in `keras_swa/`.

The averaging math (`keras_swa.averaging`), the callback, the schedules and the data handling
are written once. What cannot be shared lives here:

- `keras_swa.backends.jax`: the averaging state as `keras.Variable`s and its update as ONE
  `jax.jit`-compiled call with the averages' buffers donated (updated in place).
- `keras_swa.backends.jax_swag`: `SWAG`'s statistics (mean, Welford sums, deviation ring
  buffer) updated by ONE donated `jax.jit` call, and its draws from `jax.random`.
- `keras_swa.backends.jax_finite_check`: the NaN/Inf test of a capture, traced into a compiled
  update.
- `keras_swa.backends.jax_batch_norm`: the compiled BatchNorm pass of `update_bn` (the forward
  pass in training mode inside `keras.StatelessScope`, under `jax.jit`).
- `keras_swa.backends.jax_export`: what `export_saved_model` checks and syncs before Keras'
  `ExportArchive` converts the model through jax2tf.

The TensorFlow path (`tf.function(jit_compile=True)` per device under `tf.distribute`, the
packed small averages, the checkpointed `tf.Variable`s) is in `keras_swa.averaged_weights`,
`keras_swa.batch_norm`, `keras_swa.packing` and `keras_swa.finite_check`, and serves tf_keras
as well. Which entry point runs on which backend is `keras_swa.backend.SUPPORTED_BACKENDS`.
"""

__all__ = []
