"""Benchmarks (scripts that print figures with the machine, not tests): `python -m attencraft_lab.bench.quality`,
`python -m attencraft_lab.bench.training_speed`."""
