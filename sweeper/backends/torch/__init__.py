"""What the PyTorch backends share: the eager candidate and state-dict artifacts (:mod:`.eager`),
devices and reduced precision (:mod:`.device`), TorchScript (:mod:`.jit`) and FX graph mode int8
quantization (:mod:`.fx_int8`). Importing this package imports none of them.
"""
