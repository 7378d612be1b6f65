"""Example syncengine plugins: ``color-stats`` (sync loss) and ``even`` (tiler)."""
