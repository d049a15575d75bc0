"""The run itself, in order: setup.py builds it, loop.py trains it (step.py one step, epoch.py the end of an
epoch), evaluation.py measures it, results.py writes what it leaves; run.py and clock.py hold its state."""
