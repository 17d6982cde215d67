"""Measure a bundle on a device through a runner: `profile --on`, `devices calibrate --on`, `devices prepare`.

The host builds what needs the model's tokenizer and graph (exact prompts, evaluation windows, the bytes
per token), the device times the bundle with edgepack's own loop (`edgepack.runners.probe`) and computes
the logits of the evaluation windows, and the host turns those into parity figures against the fp32
reference: the answer the device computed, not the one this host computed.
"""

from __future__ import annotations

import io
from pathlib import Path

from edgepack.profiles.measure import ProfileConfig

PARITY_WINDOWS = 2
PARITY_WINDOW_TOKENS = 64


def cache_dir() -> Path:
    from edgepack.sources import cache_root

    return cache_root() / "probe"


def parity_windows(model_dir) -> list[list[int]]:
    """Windows of the bundled evaluation text, cut with the model's tokenizer (ids alone where it has none)."""
    from edgepack.core.texts import eval_text
    from edgepack.core.windows import token_ids
    from edgepack.profiles.measure import _prompt_tokenizer, exact_prompt

    tokenizer = _prompt_tokenizer(model_dir)
    vocab = model_dir.config.get("vocab_size")
    text, _label = eval_text()
    ids = token_ids(tokenizer, text, special_tokens=False, vocab_size=vocab) if tokenizer is not None else []
    if len(ids) < PARITY_WINDOWS * PARITY_WINDOW_TOKENS:
        ids = exact_prompt(tokenizer, PARITY_WINDOWS * PARITY_WINDOW_TOKENS, vocab)
    return [ids[i * PARITY_WINDOW_TOKENS:(i + 1) * PARITY_WINDOW_TOKENS] for i in range(PARITY_WINDOWS)]


def parity(reference: dict, candidate: dict) -> dict:
    """top-1 agreement and mean KL(reference || candidate) over every position of the windows."""
    import numpy as np

    from edgepack.core.metrics import kl_per_position, log_softmax, top1_agreement

    ref = np.concatenate([reference[k] for k in sorted(reference)])
    cand = np.concatenate([candidate[k] for k in sorted(reference)])
    return {"top1_agreement": float(np.mean(top1_agreement(ref, cand))),
            "kl_mean": float(np.mean(kl_per_position(log_softmax(ref), log_softmax(cand)))), "positions": int(ref.shape[0])}


def reference_folder(model_dir) -> Path | None:
    """The fp32 export a quantized folder came from (quantize.json `source_dir`), when it is still there."""
    import json

    report = model_dir.folder / "quantize.json"
    try:
        source = json.loads(report.read_text()).get("source_dir")
    except (OSError, ValueError, AttributeError):
        return None
    folder = Path(source) if isinstance(source, str) else None
    return folder if folder is not None and (folder / "model.onnx").is_file() else None


def measure_on_devices(model_dir, facts, config: ProfileConfig, *, on_status=None) -> dict[str, dict]:
    """profile.json's `measured_on`: for each (name, address) of `config.on`, the host section's figures as that
    device measured them, its identity, and parity of its logits against the fp32 reference. The prompts, the
    evaluation windows and the logits here and of the reference are computed once for every device."""
    import numpy as np

    from edgepack.profiles.measure import build_prompts
    from edgepack.runners import open_runner
    from edgepack.runners.probe import window_logits
    from edgepack.runtime.model_dir import load_model_dir

    status = on_status or (lambda message: None)
    prompts = build_prompts(model_dir, config)
    windows = parity_windows(model_dir)
    reference = config.reference or reference_folder(model_dir)
    logits: dict[str, dict] = {}  # "here", "reference": computed on first need (an Android device needs neither)

    def logits_of(which: str) -> dict:
        if which == "reference" and reference is None:
            return logits_of("here")  # no fp32 export known: agreement with this host's run
        if which not in logits:
            status(f"logits of the evaluation windows ({which})")
            folder = model_dir if which == "here" else load_model_dir(reference)
            logits[which] = window_logits(folder, windows, config.threads)
        return logits[which]

    measured = {}
    for name, url in config.on:
        runner = open_runner(url, config.device_timeout_s)
        if url.startswith("adb:"):
            from edgepack.runners.adb import measure_android

            status(f"{name}: measuring on {url} with onnxruntime_perf_test")
            section = measure_android(runner, model_dir, facts, prompts, config)
            section["device"] = {"name": name, "url": url, **runner.identity()}
            measured[name] = section
            continue
        status(f"{name}: copying the bundle to {url} (once per content)")
        remote, copied = runner.ensure_tree(model_dir.folder, "bundles")
        status(f"{name}: measuring on {url}")
        request = {"bundle": remote, "prompts": {str(k): v for k, v in prompts.items()}, "gen_len": config.gen_len, "runs": config.runs,
                   "warmup": config.warmup, "threads": config.threads, "cooldown_s": config.cooldown_s, "windows": windows,
                   "facts": {"weight_bytes_per_token": facts.weight_bytes_per_token, "kv_bytes_per_position": facts.kv_bytes_per_position,
                             "file_bytes": facts.file_bytes}}
        result, run_folder = runner.call_probe(cache_dir(), "measure", request, timeout=config.device_timeout_s)
        section = result["measured"]
        device_logits = dict(np.load(io.BytesIO(runner.fetch(section.pop("logits_file")))))
        runner.remove(run_folder)
        here, ref_logits = logits_of("here"), logits_of("reference")
        section.update({
            "kind": "measured",
            "device": {"name": name, "url": url, **result["identity"]},
            "bundle_copied": copied,
            "parity": {
                "reference": str(reference) if reference is not None else f"{model_dir.folder} run on this host",
                "windows": len(windows), "window_tokens": PARITY_WINDOW_TOKENS,
                "device": parity(ref_logits, device_logits),
                "here": parity(ref_logits, here),
                "device_vs_here_max_abs_logit_diff": float(max(np.max(np.abs(device_logits[k] - here[k])) for k in here)),
            },
        })
        measured[name] = section
    return measured


def calibrate_on_device(url: str, out: Path, config, *, timeout: float = 1800.0, on_status=None) -> dict:
    """`edgepack devices calibrate` run on the device; the device file written here (measured there)."""
    from dataclasses import asdict

    from edgepack.outputs import check_output_file, write_output_file
    from edgepack.runners import open_runner

    status = on_status or (lambda message: None)
    if not config.force:
        check_output_file(out)
    runner = open_runner(url, timeout)
    status(f"calibrating {url}")
    request = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k != "force"} | {"force": True}}
    result, run_folder = runner.call_probe(cache_dir(), "calibrate", request, timeout=timeout)
    runner.remove(run_folder)
    text = result["toml"].replace("edgepack devices calibrate", f"edgepack devices calibrate --on {url}", 1)
    write_output_file(out, text)
    return {"out": out, "identity": result["identity"], "seconds": result["seconds"]}


def prepare_device(url: str, *, timeout: float = 1800.0, on_status=None) -> dict:
    """A private venv on the device with the measuring program's packages at this host's versions."""
    from edgepack.runners import open_runner
    from edgepack.runners.base import package_pins, pins_key

    status = on_status or (lambda message: None)
    runner = open_runner(url, timeout)
    pins = package_pins()
    if url.startswith("adb:"):
        from edgepack.errors import UsageError

        raise UsageError("an Android device needs no preparation: its measuring binary is pushed with each run (docs/devices.md)")
    venv = f"{runner.root()}/venv-{pins_key(pins)}"
    if runner.exists(f"{venv}/.complete"):
        return {"venv": venv, "pins": pins, "installed": False}
    status(f"creating {venv} on {url} and installing {', '.join(f'{k}=={v}' for k, v in pins.items())}")
    import shlex

    specs = " ".join(shlex.quote(f"{k}=={v}") for k, v in pins.items())
    where = shlex.quote(venv)
    script = (f"rm -rf {where} && python3 -m venv {where} && {where}/bin/python -m pip install --quiet --disable-pip-version-check "
              f"{specs} && touch {where}/.complete")
    runner.run(["sh", "-c", script], timeout=timeout)
    return {"venv": venv, "pins": pins, "installed": True}
