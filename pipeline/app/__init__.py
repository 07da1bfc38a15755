"""What users run: the CLI, deploy, compare and their reports."""
