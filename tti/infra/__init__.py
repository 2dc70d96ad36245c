"""Plumbing every layer may use: CLI errors, processes, locks, atomic files, threads, checkpoint files."""
