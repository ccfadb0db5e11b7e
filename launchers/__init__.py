"""Launchers: how the pipeline reaches a cluster (SLURM via submitit)."""
