"""Framework code with no HTTP in it: nets, their calculations, data, training, inference.

Heavy imports (TensorFlow/Keras) happen inside functions so that importing this
package stays cheap for the API process and the CLI's help.
"""
