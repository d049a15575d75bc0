"""What survives a process: checkpoint files (checkpoint.py), the resume protocol (resume.py), and the run
folder held by one run at a time (rundir.py)."""
