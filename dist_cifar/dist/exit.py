"""How a trainer process leaves: after a process group has existed, without interpreter shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch


def leave(code: int) -> None:
    """End a trainer process with `code`. After a process group has existed, skip interpreter shutdown.

    Why: a gloo worker thread drops its reference to a finished collective's work a moment after the
    caller has moved on. If that work holds tensors also seen from Python, freeing them takes the GIL;
    once the interpreter is finalising, taking the GIL ends the thread through a forced unwind across a
    noexcept destructor, and libstdc++ aborts the whole process ("terminate called without an active
    exception", exit -6), after the run itself succeeded. Seen on loaded machines; the core dump shows
    ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> TensorImpl::decref_pyobject -> take_gil ->
    pthread_exit -> std::terminate. Everything the run writes is closed by now, so leaving with
    os._exit, after flushing, loses nothing and never starts the finalisation that races the thread.
    """
    if not _had_process_group:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


_had_process_group = False


def note_process_group() -> None:
    global _had_process_group
    _had_process_group = _had_process_group or (torch.distributed.is_available() and torch.distributed.is_initialized())


