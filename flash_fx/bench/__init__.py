"""flash_fx benchmarks (``python -m flash_fx.bench --help``): every figure is a median measured in one run on
one device, beside its baselines, and written with the device, versions and commit that produced it."""
