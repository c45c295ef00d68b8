"""A run directory: the stage registry, the pipeline over it, the manifest, report and export."""
