"""The QNN execution provider with its HTP backend (a simulator on x86-64 Linux, the NPU on a device).

Registration goes through onnxruntime's plugin-EP API: `register_execution_provider_library`, the QNN
device from `get_ep_devices()`, `SessionOptions.add_provider_for_devices`. The older
`providers=["QNNExecutionProvider"]` runs silently on CPU with onnxruntime-qnn 2.x, so it is never used.
CPU fallback is disabled (`session.disable_cpu_ep_fallback`): a node the HTP cannot take is an error,
named from `get_provider_graph_assignment_info()` of another session, one that allows fallback.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import BadInputError, NotOnThisHostError, UsageError

EP_NAME = "QNNExecutionProvider"
_REGISTERED: list = []


def qnn_versions() -> dict:
    """onnxruntime, onnxruntime-qnn and the QNN SDK it bundles (the SDK a context binary is built with)."""
    import onnxruntime

    try:
        from onnxruntime_qnn import build_and_package_info as info
    except ImportError as exc:
        raise NotOnThisHostError(
            "onnxruntime-qnn is not installed: `pip install onnxruntime-qnn==2.7.0` (Linux x86-64 simulator, "
            "Windows on Snapdragon) or build on a host that has it") from exc
    return {"onnxruntime": onnxruntime.__version__, "onnxruntime_qnn": info.__version__,
            "qnn_sdk": getattr(info, "qnn_version", None)}


def qnn_devices():
    """Register the QNN EP library once; return its OrtEpDevice list."""
    import onnxruntime as ort

    qnn_versions()
    import onnxruntime_qnn

    if not _REGISTERED:
        library = onnxruntime_qnn.get_library_path()
        if not Path(library).is_file():
            raise NotOnThisHostError(f"onnxruntime-qnn has no provider library for this platform ({library} is missing)")
        try:
            ort.register_execution_provider_library(EP_NAME, library)
        except Exception as exc:  # already registered by someone else in this process is fine
            if "already" not in str(exc).lower():
                raise NotOnThisHostError(f"cannot load the QNN execution provider here: {' '.join(str(exc).split())[:300]}") from exc
        _REGISTERED.append(library)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise NotOnThisHostError("the QNN execution provider registered no device on this host")
    return devices


@dataclass
class HtpOptions:
    soc_model: int | None = None
    htp_arch: int | None = None
    fp16: bool = False

    def provider_options(self) -> dict[str, str]:
        # offload_graph_io_quantization=0: the HTP quantizes the graph inputs itself (else those Q nodes go to CPU).
        options = {"backend_type": "htp", "htp_performance_mode": "burst", "offload_graph_io_quantization": "0"}
        if self.soc_model is not None:
            options["soc_model"] = str(self.soc_model)
        if self.htp_arch is not None:
            options["htp_arch"] = str(self.htp_arch)
        if self.fp16:
            options["enable_htp_fp16_precision"] = "1"
        return options


# Session options of graphs that share one context binary (and its weights): set on every session that
# compiles into it or loads from it (onnxruntime's "EPContext with weight sharing").
SHARE_CONTEXTS = {"ep.share_ep_contexts": "1"}


def _session_options(options: HtpOptions, *, fallback: bool, context_path: Path | None, share: bool = False,
                     last: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_path is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_path.absolute()))  # `_session` may change directory
        so.add_session_config_entry("ep.context_embed_mode", "0")
    if share:
        for key, value in SHARE_CONTEXTS.items():
            so.add_session_config_entry(key, value)
        if last:  # the last graph of the group: the EP writes the one context binary holding every graph
            so.add_session_config_entry("ep.stop_share_ep_contexts", "1")
    so.add_provider_for_devices(qnn_devices(), options.provider_options())
    return so


@dataclass
class Placement:
    nodes_on_htp: int
    nodes_total: int
    not_on_htp: dict[str, int] = field(default_factory=dict)  # op type -> count
    not_on_htp_nodes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"nodes_on_htp": self.nodes_on_htp, "nodes_total": self.nodes_total,
                "not_on_htp_by_op": self.not_on_htp, "not_on_htp_nodes": self.not_on_htp_nodes[:20]}


def placement(session, model_path: Path) -> Placement:
    """Nodes per EP from the session's assignment info, op types of the ones not on QNN."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    op_of = {n.name: n.op_type for n in graph.node}
    on_htp, others = 0, []
    for subgraph in session.get_provider_graph_assignment_info():
        nodes = subgraph.get_nodes()
        if subgraph.ep_name == EP_NAME:
            on_htp += len(nodes)
        else:
            others.extend(nodes)
    by_op: dict[str, int] = {}
    names = []
    for node in others:
        name = getattr(node, "name", None) or str(node)
        op = getattr(node, "op_type", None) or op_of.get(name, "?")
        by_op[op] = by_op.get(op, 0) + 1
        names.append(f"{name} ({op})")
    return Placement(on_htp, on_htp + len(others), by_op, names)


def _model_source(model_path: Path, tag: str | None = None) -> bytes | None:
    """The model as bytes, or None for a model with external data (compiled from its file, see `_session`).

    onnxruntime names the EP context graph (the *_ctx.onnx node and the graph inside the context
    binary) after a hash of the model's path when the model has one. From bytes the name comes from a
    hash of the graph's input names and node output names, the same for a prefill and a decode graph cut
    from one export; graphs compiled into one context binary need distinct names (the QNN EP ignores
    `ep.context_node_name_prefix`), so `tag` is appended to one internal tensor's name.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return None
    if tag is None:
        return model_path.read_bytes()
    outputs = {o.name for o in model.graph.output}
    node = next(n for n in model.graph.node if n.output and n.output[0] and n.output[0] not in outputs)
    old, new = node.output[0], f"{node.output[0]}/{tag}"
    node.output[0] = new
    for other in model.graph.node:
        for index, name in enumerate(other.input):
            if name == old:
                other.input[index] = new
    for info in model.graph.value_info:
        if info.name == old:
            info.name = new
    return model.SerializeToString()


_CWD = threading.Lock()


def _session(model_path: Path, source: bytes | None, so):
    """An InferenceSession of `source` (bytes), or of the model file when it has external data.

    From its file onnxruntime maps the external data instead of copying it (a Python copy of the weights and
    one parsed out of a protobuf would sit beside the compiler's). The file is opened by its
    bare name from inside its folder, because the context graph is named after the path as given: the name
    must not depend on the (temporary) build folder, and the graphs of one shared binary have distinct file
    names. The working directory is the process's, so the change is brief and serialized."""
    import onnxruntime as ort

    if source is not None:
        return ort.InferenceSession(source, so)
    with _CWD:
        previous = os.getcwd()
        os.chdir(model_path.parent)
        try:
            return ort.InferenceSession(model_path.name, so)
        finally:
            os.chdir(previous)


def compile_on_htp(model_path: Path, options: HtpOptions, context_path: Path, *, share: bool = False, last: bool = True):
    """Compile `model_path` for the HTP with CPU fallback disabled and write its EP context binary.

    `share`: the graph joins a group compiled one after another in this process into one context binary,
    where the QNN HTP backend stores a weight every graph holds identically (same name, same quantized
    data) once; `last` closes the group, and only then is the binary written (named after the first graph).
    Returns (session, placement, compile seconds). A node the HTP cannot take raises BadInputError naming it.
    """
    import onnxruntime as ort

    start = time.perf_counter()
    try:
        so = _session_options(options, fallback=False, context_path=context_path, share=share, last=last)
        session = _session(model_path, _model_source(model_path, context_path.stem if share else None), so)
    except Exception as exc:
        message = " ".join(str(exc).split())
        if "fallback to CPU EP has been explicitly disabled" in message or "assigned to the default CPU EP" in message:
            probe = ort.InferenceSession(str(model_path), _session_options(options, fallback=True, context_path=None))
            where = placement(probe, model_path)
            raise BadInputError(
                f"{model_path.name}: {where.nodes_total - where.nodes_on_htp} node(s) the HTP cannot take "
                f"({', '.join(f'{op} x{n}' for op, n in where.not_on_htp.items())}), e.g. {', '.join(where.not_on_htp_nodes[:3])}; "
                "CPU fallback is disabled on purpose") from exc
        if "context cache file" in message:  # "Failed to open/write context cache file": the output's disk, not the model
            raise UsageError(f"cannot write {context_path} (and the .bin beside it): the QNN EP failed writing the context "
                             f"binary ({message[:200]}); check the free space and permissions of that folder") from exc
        if "soc_model" in message or "htp_arch" in message:
            raise BadInputError(f"the QNN HTP backend refused soc_model/htp_arch {options.soc_model}/{options.htp_arch}: {message[:300]}") from exc
        raise BadInputError(f"QNN could not compile {model_path.name} for the HTP: {message[:400]}") from exc
    seconds = time.perf_counter() - start
    return session, placement(session, model_path), seconds


def load_context(context_path: Path, options: HtpOptions, *, share: bool = False):
    """Reload a context model (`*_ctx.onnx` + its .bin); returns (session, seconds).

    `share`: the binary holds several graphs (weights shared between them): the session created first loads it and
    keeps the other graphs for the sessions that follow, which then take theirs without reading it again."""
    import platform

    import onnxruntime as ort

    if share and platform.machine().lower() in ("x86_64", "amd64"):
        # The simulator fails on (or crashes loading) a weight-shared binary: say so instead.
        raise NotOnThisHostError(f"{context_path.name} reads a weight-shared QNN context binary, which runs on a Snapdragon "
                                 "device only (the x86-64 HTP simulator cannot load it); build with --no-share-weights to "
                                 "run the graphs in the simulator")
    start = time.perf_counter()
    session = ort.InferenceSession(str(context_path), _session_options(options, fallback=False, context_path=None, share=share))
    return session, time.perf_counter() - start


def context_binaries(context_path: Path) -> list[str]:
    """The context binary files a `*_ctx.onnx` model's EPContext nodes read (paths relative to its folder)."""
    import onnx

    model = onnx.load(str(context_path), load_external_data=False)
    found = []
    for node in model.graph.node:
        if node.op_type != "EPContext":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("embed_mode", 1) == 0 and attrs.get("ep_cache_context"):
            value = attrs["ep_cache_context"]
            found.append(value.decode() if isinstance(value, bytes) else str(value))
    return sorted(set(found))


def _compile_group(conn, parent: int, jobs: list[tuple[str, str]], options: HtpOptions) -> None:
    """Child process: compile `jobs` ((QDQ model, context model) paths) into one weight-shared context binary;
    send ("ok", seconds, its RSS in MB {"peak", "held_after"}) or ("error", exception) back."""
    import resource

    from edgepack.core.allocator import return_freed_memory
    from edgepack.processes import exit_with_parent

    exit_with_parent(parent)
    try:
        start = time.perf_counter()
        for index, (model, context) in enumerate(jobs):
            session, _, _ = compile_on_htp(Path(model), options, Path(context), share=True, last=index == len(jobs) - 1)
            del session
            return_freed_memory()  # the graph's onnxruntime copy; the EP keeps what the shared binary needs
        seconds = time.perf_counter() - start
        held = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("VmRSS:")), 0) if Path("/proc/self/status").is_file() else 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        conn.send(("ok", seconds, {"peak": round(max(peak, held) / 1024, 1), "held_after": round(held / 1024, 1)}))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        try:
            conn.send(("error", exc))
        except Exception:  # an exception that does not pickle: its text
            conn.send(("error", BadInputError(f"QNN could not compile the shared context binary: {type(exc).__name__}: {exc}")))
    finally:
        conn.close()


class SharedCompile:
    """Graphs compiled into one weight-shared context binary in a separate process (see `compile_on_htp`).

    A process of its own, so that the compile runs while this one checks and evaluates the per-graph binaries
    (the HTP compiler is single-threaded and the machine may have a second core), and so that the compiler's
    memory is returned when it ends. The child ends with this process (`edgepack.processes.exit_with_parent`)."""

    def __init__(self, jobs: list[tuple[Path, Path]], options: HtpOptions):
        import multiprocessing
        import os

        context = multiprocessing.get_context("spawn")
        self._receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_compile_group, args=(send, os.getpid(), [(str(m), str(c)) for m, c in jobs], options),
                                       name="edgepack-qnn-shared-compile")
        self.process.start()
        send.close()

    def result(self) -> tuple[float, dict]:
        """Wait for the compile; returns (seconds, the child's RSS in MB: peak and at the end); raises what the child raised."""
        try:
            message = self._receive.recv()
        except EOFError:
            message = None
        finally:
            self._receive.close()
        self.process.join()
        if message is None:
            raise BadInputError(f"the process compiling the shared QNN context binary ended without a result (exit code "
                                f"{self.process.exitcode}; the QNN compiler crashed or was killed)")
        if message[0] == "error":
            raise message[1]
        return message[1], message[2]

    def cancel(self) -> None:
        """End the child if it still runs (a no-op once `result` has returned)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self._receive.close()
