"""The pipeline DAG, its compiler entry point and the local runner."""
