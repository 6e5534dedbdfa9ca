"""Contracts shared by more than one service: each is defined once here and imported everywhere else."""
