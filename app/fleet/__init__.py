"""The fleet of training workers as the database sees it: who is up, on what, running which job."""
