"""keras_swa: Stochastic Weight Averaging for Keras and TensorFlow."""
