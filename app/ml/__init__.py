"""Framework code with no HTTP in it: nets, their calculations, data, training, inference.

Heavy imports (TensorFlow, JAX, Keras, matplotlib) happen at the top of the modules that are
only imported lazily (augment, optim, callbacks, loops_tf, loops_jax, plots) or at the top
of the one function that needs them, so that importing this package stays cheap for the
API process and the CLI's help.
"""
