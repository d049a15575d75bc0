"""What a person sees: the main-process log (log.py), progress (progress.py), experiment tracking
(tracking.py) and pictures (plots.py)."""
