"""The jobs: `python jobs/<job>.py ...` from a checkout, or `python -m jobs.<job> ...` after `pip install .`."""
