"""What the ONNX-based backends share: the export settings (:mod:`.config`), the cached and
validated export (:mod:`.export`, :mod:`.validation`, :mod:`.tf2onnx` for Keras models), ONNX
Runtime sessions and the candidate they run (:mod:`.runtime`), and the backends' base
(:mod:`.backend`). Importing this package imports none of them.
"""
