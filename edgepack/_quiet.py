"""Silence the chatter of heavy libraries (tracer warnings, progress bars) so edgepack's own output stays readable."""

from __future__ import annotations

import os
import warnings


def quiet_libraries() -> None:
    # Never reach for a model hub: edgepack works on local files only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own bar
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    # onnxruntime's quantizers log every node at INFO through the root handler.
    for name in ("onnxruntime", "onnxruntime.quantization", "optimum", "transformers", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import torch.jit

        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    except Exception:  # torch missing is reported where torch is needed
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:
        pass
    try:
        from optimum.utils import logging as optimum_logging

        optimum_logging.set_verbosity_error()
    except Exception:
        pass
