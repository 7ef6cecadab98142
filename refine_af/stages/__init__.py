"""One module per stage of the method; each exposes ``run(config, inputs…, outputs…)``."""
