"""Command-line scripts of trl-diffpo (``trl-diffpo train`` lives in :mod:`trl_diffpo.scripts.train`)."""
