"""Command-line entry points; no training logic lives here."""
