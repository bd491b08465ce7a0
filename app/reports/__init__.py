"""Comparing finished jobs and writing the course's report from them (issue 11)."""
