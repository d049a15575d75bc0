"""The run itself, in order: job.py holds the run folder and decides what a resume means, setup.py builds
the run, loop.py trains it (step.py one step, epoch.py the end of an epoch), evaluation.py measures it and
results.py writes what it leaves; run.py and clock.py hold its plan, cadence and running sums."""
