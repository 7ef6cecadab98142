"""The ``refine-af`` subcommands, one module per group; ``refine_af.cli`` assembles them."""
