"""The driver process (jobs/spin.py): checks before Ray, the console, the dry-run plan."""
