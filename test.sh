#!/usr/bin/env bash
# Run the WQS test suite: installs what the tests need, then pytest.
#
#   ./test.sh                 # everything
#   ./test.sh -k engine       # extra arguments go to pytest
#
# Needs root for apt packages (fio, redis-server, etcd-server, fdisk, iproute2) and for
# the loop-device and network-namespace tests; without root those tests skip and say so.
set -euo pipefail
cd "$(dirname "$0")"

# g++, ninja-build, libssl-dev: SGLang builds its HiCache page hash (a C++ extension using
# OpenSSL) on first use, in the SGLang tests' venv.
APT_PACKAGES=(fio redis-server etcd-server fdisk util-linux iproute2 e2fsprogs python3-venv
              python3-pyverbs g++ ninja-build libssl-dev)
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    need=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[test]"
# The RDMA transport's verbs layer imports pyverbs (Debian's, linked into the venv); its
# traffic tests need an RDMA device and say so when there is none.
if dpkg -s python3-pyverbs >/dev/null 2>&1; then
    scripts/link-pyverbs.sh .venv >/dev/null || echo "test.sh: WARNING: pyverbs is" \
        "installed but not importable from .venv: the RDMA verbs tests will skip" >&2
fi

# The LMCache and vLLM integration tests need those packages, whose pins conflict with
# the main environment's, so they get their own (wqs/integrations/README.md). Set
# WQS_SKIP_INTEGRATION=1 to leave them out; an environment that cannot be installed
# fails the run rather than skipping them unseen.
integration=()
integration_broken=0
if [ $# -eq 0 ] && [ -z "${WQS_SKIP_INTEGRATION:-}" ]; then
    if ! .venv-integ/bin/python -c "import lmcache, vllm, torch" >/dev/null 2>&1; then
        echo "test.sh: building .venv-integ (torch CPU, lmcache, vllm)..."
        if ! { python3 -m venv .venv-integ \
               && .venv-integ/bin/pip install --quiet --upgrade pip \
               && .venv-integ/bin/pip install --quiet -r wqs/integrations/ci-requirements.txt \
               && .venv-integ/bin/pip install --quiet --no-deps lmcache==0.5.6 vllm==0.33.0 \
                      xgrammar==0.2.8; }; then
            echo "test.sh: ERROR: the integration environment could not be installed" \
                 "(set WQS_SKIP_INTEGRATION=1 to run without the LMCache and vLLM tests)" >&2
        fi
    fi
    if .venv-integ/bin/python -c "import lmcache, vllm, torch" >/dev/null 2>&1; then
        # and the SDK's torch paths (skipped in the main environment, which has no torch)
        integration=(tests/test_integration_lmcache.py tests/test_integration_vllm.py
                     "tests/test_shm.py::test_torch_tensors_in_shared_memory_are_read_into_with_no_copy"
                     "tests/test_daemon.py::test_torch_cpu_tensors")
    else
        integration_broken=1
    fi
fi

# The SGLang HiCache tests need sglang 0.5.23, which pins torch 2.14.1 and imports
# torchvision: PyPI's CUDA builds (about 5.5 GB, run on the CPU) in a venv of their own.
# WQS_SKIP_SGLANG=1 (or WQS_SKIP_INTEGRATION=1) leaves them out.
sglang=()
sglang_broken=0
sglang_ready() {
    .venv-sglang/bin/python -c "import importlib.metadata as m, torch, torchvision
assert m.version('sglang') == '0.5.23'" >/dev/null 2>&1
}
if [ $# -eq 0 ] && [ -z "${WQS_SKIP_INTEGRATION:-}" ] && [ -z "${WQS_SKIP_SGLANG:-}" ]; then
    if ! sglang_ready; then
        echo "test.sh: building .venv-sglang (torch 2.14.1, sglang 0.5.23)..."
        if ! { python3 -m venv .venv-sglang \
               && .venv-sglang/bin/pip install --quiet --upgrade pip \
               && .venv-sglang/bin/pip install --quiet -r wqs/integrations/sglang-requirements.txt \
               && .venv-sglang/bin/pip install --quiet --no-deps sglang==0.5.23; }; then
            echo "test.sh: ERROR: the SGLang environment could not be installed" \
                 "(set WQS_SKIP_SGLANG=1 to run without the SGLang tests)" >&2
        fi
    fi
    if sglang_ready; then
        sglang=(tests/test_integration_sglang.py)
    else
        sglang_broken=1
    fi
fi

status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ ${#integration[@]} -gt 0 ]; then
    echo "test.sh: LMCache and vLLM integration tests (.venv-integ)"
    .venv-integ/bin/python -m pytest -q -p no:cacheprovider "${integration[@]}" || status=$?
fi
if [ $integration_broken -eq 1 ]; then
    echo "test.sh: FAILED: the LMCache and vLLM integration tests could not run" >&2
    status=1
fi
if [ ${#sglang[@]} -gt 0 ]; then
    echo "test.sh: SGLang HiCache integration tests (.venv-sglang)"
    .venv-sglang/bin/python -m pytest -q -p no:cacheprovider "${sglang[@]}" || status=$?
fi
if [ $sglang_broken -eq 1 ]; then
    echo "test.sh: FAILED: the SGLang integration tests could not run" >&2
    status=1
fi
exit $status
