"""The `fedtune` command line."""
