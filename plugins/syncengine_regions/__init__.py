"""Region-mask layouts (MultiDiffusion's layout-to-image, with SyncDiffusion across the background windows)."""
