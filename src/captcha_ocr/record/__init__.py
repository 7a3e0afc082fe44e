"""The run record: the training log, the run folder and the tools that read past runs."""
