"""Versions of the tools that shape edgepack's outputs, read from package metadata (nothing is imported).

`tool_versions()` is what every report records; `package_version` / `package_versions` look up single
distributions, for the stage cache keys (each stage keys on the packages it uses).
"""

from __future__ import annotations

NOT_INSTALLED = "not installed"
# Recorded in every stage report: the packages that shape an export and its quantized variants.
# What edgepack's shared modules (model folders, tokenizers, GGUF sources, sessions) import: every stage that
# loads a model through them has these in its cache key.
MODEL_PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy", "tokenizers", "gguf", "jinja2")
REPORTED_PACKAGES = ("edgepack", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy", "tokenizers")


def python_version() -> str:
    import platform

    return platform.python_version()


def package_version(dist: str) -> str:
    """The installed version of distribution `dist` (pip name), or "not installed"."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def package_versions(dists) -> dict[str, str]:
    """{dist: version} for each distribution in `dists`, "not installed" for those missing."""
    return {dist: package_version(dist) for dist in dists}


def tool_versions() -> dict[str, str]:
    """Versions of everything that shapes an export: Python and the packages of `REPORTED_PACKAGES`."""
    return {"python": python_version(), **package_versions(REPORTED_PACKAGES)}


def qnn_sdk_version() -> str:
    """The QNN SDK onnxruntime-qnn bundles, read from its package info file without importing it."""
    import ast
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("onnxruntime_qnn")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        info = Path(folder) / "build_and_package_info.py"
        try:
            tree = ast.parse(info.read_text())
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and any(isinstance(t, ast.Name) and t.id == "qnn_version" for t in node.targets)):
                return str(node.value.value)
    return NOT_INSTALLED


def venv_package_version(python, dist: str) -> str:
    """Version of `dist` installed in the environment of the interpreter `python` (a path), read from its
    site-packages metadata without running it."""
    from importlib import metadata
    from pathlib import Path

    env = Path(python).parent.parent
    for site in sorted(env.glob("lib*/python*/site-packages")):
        for found in metadata.distributions(name=dist, path=[str(site)]):
            return found.version
    return NOT_INSTALLED
