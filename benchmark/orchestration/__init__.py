"""Sweeps: config and fingerprint (sweep), the runner and its launchers, one job, its record and
the environment it ran in."""
