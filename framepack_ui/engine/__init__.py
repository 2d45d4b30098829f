"""Turns a start image, a prompt and settings into an MP4, section by section. No UI imports here."""
