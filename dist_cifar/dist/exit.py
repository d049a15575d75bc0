"""How a command that may form a process group ends: one line for a failed collective, the group closed
when it still can be, and the process left without interpreter shutdown. Imports no torch of its own, so
an entry point can use it before deciding to load torch."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback


def run_and_leave(main) -> None:
    """The console entry of such a command: main()'s exit code; argparse's --help and usage errors, Ctrl-C
    (130) and a bug (its traceback, 1) leave the same way, through leave()."""
    try:
        code = main()
    except SystemExit as err:  # argparse: --help, usage errors
        code = err.code if isinstance(err.code, int) else 2
    except KeyboardInterrupt:
        print("dist_cifar: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # a bug: show it, then leave the same way as every other exit
        traceback.print_exc()
        code = 1
    leave(code)


def run_in_group(work) -> int:
    """(all ranks) work()'s exit code. A failed collective (a rank gone or stuck) becomes one line and exit
    1; any other exception propagates. The process group is closed afterwards, which is local to this
    rank, except after a failed collective, where closing could wait on the dead peer's work."""
    import torch

    from dist_cifar.dist.failures import collective_failure

    group_usable = True
    try:
        return work()
    except Exception as err:
        failure = collective_failure(err)
        if failure is None:
            raise
        group_usable = False
        print(f"dist_cifar: error: {failure}", file=sys.stderr)
        return 1
    finally:
        if group_usable and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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
    import torch

    global _had_process_group
    _had_process_group = _had_process_group or (torch.distributed.is_available() and torch.distributed.is_initialized())


