# The two commands a newcomer runs. Both create and reuse .venv.
.PHONY: demo test env
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
env:
	bash scripts/env.sh
