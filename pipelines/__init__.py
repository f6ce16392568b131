"""The Dagster code location: thin assets over the dmm library."""
