"""Serving trained students: everything that runs a trained or exported model.

Torch-free (numpy, pillow, pydicom, nibabel, onnxruntime): :mod:`.preprocess` (the one
definition of a model's input), :mod:`.resample`, :mod:`.predictor` (what every served model
has: predictions, batches), :mod:`.exported` (an ONNX export on onnxruntime) and
:mod:`.predict` (``kd predict``: sources, skipping, Grad-CAM files). With torch:
:mod:`.kdmodel` (``KdModel``, ``FoldEnsemble``: checkpoints), :mod:`.runtimes` and
:mod:`.parity` (exports checked against their checkpoint). Exporting itself is
``kdtoolkit.engine.export``.
"""
