"""What clproxy changes outside itself: Claude Code's settings.json."""
