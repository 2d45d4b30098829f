"""Memory: where models live (RAM, VRAM, read-only maps) and when they are loaded and freed."""
