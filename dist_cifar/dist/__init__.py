"""Where processes meet and leave: the Accelerator for the launch (accelerator.py), failed collectives
(failures.py), stop signals and requeues (preempt.py), and the clean exit (exit.py)."""
