"""Model analysis (sizes, FLOPs, BOPs) and visualisation."""
