"""KFP v2 components: one folder per stage, each a thin typed wrapper over refine_af.stages."""
