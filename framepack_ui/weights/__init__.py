"""Model files on disk: the folder layout, downloads, and tiny random stand-ins for tests."""
