"""Deployable targets. One file per target, registered in the table below.

A target module (imported only when its target is used) provides:
  * `SUMMARY`: one line for `edgepack target --help`;
  * a config dataclass (name ending in `Config`) whose fields are declared with `edgepack.options.option`:
    its command-line options, recipe keys (`[targets.NAME]`) and option reference come from it;
  * `command`: a click command named after the target, its options generated from the config (`click_options`);
  * an entry function `build(directory, out, config, on_status=None) -> TargetArtifact`, made of named steps
    that return typed results; its pass/fail decisions are `GateResult` values (`<target>_gates`) from which
    target.json's `checks` and the exit-1 line are written;
  * optionally `CACHE_PACKAGES` (the packages whose versions key its cached builds), `USES_QUANTIZED_SOURCE =
    False` (it compresses the fp32 export itself: `edgepack build` runs it once) and `NOT_REPRODUCIBLE` (file
    pattern -> why a rebuild does not reproduce it byte for byte; or a function `not_reproducible(folder)` returning
    that for a built folder, when it depends on the options the folder was built with).
Third-party targets register the same way through the `edgepack.targets` entry-point group
(name -> "package.module").
"""

from __future__ import annotations

# name -> module path. Adding a target = one new file + one line here.
TARGETS: dict[str, str] = {
    "ort": "edgepack.targets.ort",
    "ort-mobile": "edgepack.targets.ort_mobile",
    "coreml": "edgepack.targets.coreml",
    "qnn": "edgepack.targets.qnn",
    "executorch": "edgepack.targets.executorch",
}


def registered_targets() -> dict[str, str]:
    """Built-in targets plus those that installed packages register as `edgepack.targets` entry points."""
    from importlib.metadata import entry_points

    targets = dict(TARGETS)
    for entry in entry_points(group="edgepack.targets"):
        targets.setdefault(entry.name, entry.value)
    return targets
