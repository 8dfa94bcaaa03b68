# llmwatts: `make demo` sets up and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= $(if $(wildcard ../shared/data),../shared/data,)

.PHONY: setup demo test protos check-protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (from local disk here); a range elsewhere would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmwatts demo $(if $(DATA_DIR),--data-dir $(DATA_DIR),) --out out/demo

test: $(STAMP)
	$(if $(DATA_DIR),LLMWATTS_DATA_DIR=$(abspath $(DATA_DIR)),) $(PY) -m pytest -q

# Regenerate the committed gRPC stubs from protos/ (a test fails when they drift).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos \
		protos/llmwatts/v1/llmwatts.proto

clean:
	rm -rf $(VENV) out .pytest_cache
