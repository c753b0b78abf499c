# The two commands of the README. Both set up .venv from nothing (scripts/bootstrap.sh) before they run.
.PHONY: demo test setup

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/unhans demo

test: setup
	.venv/bin/python -m pytest
