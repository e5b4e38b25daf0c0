"""Reports: plots and pages rendered from a run directory's JSON artefacts."""
