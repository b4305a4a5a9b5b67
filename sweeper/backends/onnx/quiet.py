"""Silencing the exporters and ONNX Runtime's quantization tools while they run."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator

# Loggers whose warnings and progress lines the exporters and ORT's quantization tools emit.
_CHATTY_LOGGERS = (
    "torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "root",
)  # fmt: skip


@contextlib.contextmanager
def quiet(*, native: bool = False) -> Iterator[io.StringIO]:
    """Capture prints, Python warnings and library log lines; yield the captured text.

    Args:
        native: also capture what native code writes to the process's stdout and stderr file
            descriptors (the TorchScript exporter dumps its whole IR graph there on failure).
    """
    import warnings

    buffer = io.StringIO()
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    root = logging.getLogger()
    # ORT's quantizer logs with logging.warning(), which installs a stderr handler on a root
    # logger without handlers: that handler would keep writing into this block's buffer.
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.ExitStack() as stack:
            if native:
                stack.enter_context(_native_output_captured())
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            stack.enter_context(contextlib.redirect_stdout(buffer))
            stack.enter_context(contextlib.redirect_stderr(buffer))
            yield buffer
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if guard is not None:
            root.removeHandler(guard)


@contextlib.contextmanager
def _native_output_captured() -> Iterator[None]:
    """Point file descriptors 1 and 2 at a scratch file for the duration, then restore them."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
