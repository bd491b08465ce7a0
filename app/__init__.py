"""CNN training-and-inference service for CIFAR-10 classifiers."""
