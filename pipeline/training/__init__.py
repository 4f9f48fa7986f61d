"""Stage `train`: tf.data inputs, the model zoo, strategy/hardware, the fit loop and its MLflow record."""
