"""Writing results: NIfTI masks, label tables, run reports."""
