"""Static-shape graphs for the HTP and the host loop that drives them.

Decoders get two graphs over one fixed-length KV cache of C = max_context slots:

* prefill: input_ids [1, S], past [1, kv_heads, C - S, head_dim] -> logits [1, S, vocab], new keys/values [.., S, ..]
* decode:  input_ids [1, 1], past [1, kv_heads, C - 1, head_dim] -> logits [1, 1, vocab], new keys/values [.., 1, ..]

Slot j of the cache holds position j; unused slots are masked (attention_mask 0 -> MASK_VALUE bias).
The host writes the new keys/values into their slots, so the graphs never see a dynamic length.
A prompt shorter than S is right-padded (padding comes after the real tokens, so causal attention
hides it, and its keys/values are not stored); a longer one is prefilled in chunks of S.
Each graph comes with a small CPU graph (`host_*.onnx`) that turns attention_mask/position_ids into the
attention bias and rotary cos/sin the NPU graph takes as float inputs.

Encoders get one graph: input_ids etc. [1, L] -> hidden states [1, L, hidden].
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepack.errors import BadInputError
from edgepack.targets.qnn_support import graph as G

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass
class GraphSpec:
    """One static NPU graph and its host preparation graph, as files."""

    name: str  # "prefill" | "decode" | "encoder"
    npu_path: Path  # fp32 static NPU graph
    host_path: Path | None
    host_inputs: list[str]
    bridge: list[str]
    seq_len: int
    past_len: int = 0
    nodes_fp32: int = 0
    facts: dict = field(default_factory=dict)


def prepare_graphs(onnx_path: Path, task_is_decoder: bool, *, prefill_len: int, max_context: int, work: Path) -> list[GraphSpec]:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from edgepack.core.onnx_io import save_model

    specs = []
    shapes = [("prefill", prefill_len), ("decode", 1)] if task_is_decoder else [("encoder", max_context)]
    staged = None
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        # A one-file export: its weights move to a data file once, so that every graph below is folded from the
        # weights on disk instead of from the whole model in memory (protobuf bytes, parsed copy, onnxruntime's).
        del graph
        model = onnx.load(str(onnx_path))
        staged = work / "export.onnx"
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{staged.name}.data", size_threshold=1024)
        del model
        onnx_path = staged
    for name, seq in shapes:
        model = onnx.load(str(onnx_path), load_external_data=False)  # the weights stay in the export's files until folded
        dims = {"batch_size": 1, "sequence_length": seq}
        past = 0
        if task_is_decoder:
            past = max_context - seq
            dims.update({"past_sequence_length": past, "past_sequence_length + sequence_length": max_context,
                         "past_sequence_length + 1": max_context, "total_sequence_length": max_context})
        else:
            dims.update({"encoder_sequence_length": seq})
        if task_is_decoder:
            G.rotary_positions_as_input(model)
        # Only dims that occur are fixed; unknown names are ignored by onnxruntime's helper.
        G.fix_dims(model, dims)
        model = G.constant_fold(model, work, name, onnx_path.parent)
        masks = G.finite_masks(model)
        guards = G.drop_nan_guards(model)
        norms = G.scale_free_rms_norms(model)
        squares = G.squares_as_mul(model)
        G.drop_empty_concat_inputs(model)
        kv = G.new_kv_outputs(model) if task_is_decoder else {}
        npu, host, host_inputs, bridge = G.split_host_prep(model)
        bad = G.unsupported_inputs(npu)
        if bad:
            raise BadInputError(f"NPU graph input(s) {', '.join(bad)} have a type the HTP graph cannot take")
        npu_path = work / f"{name}.fp32.onnx"
        save_model(npu, npu_path)  # beside <name>.folded.onnx.data, which its large tensors read
        host_path = None
        if host is not None:
            # The host graph ships: self-contained (its tables, e.g. rotary caches, read into it).
            load_external_data_for_model(host, str(work))
            host_path = work / f"host_{name}.onnx"
            onnx.save(host, str(host_path))
        specs.append(GraphSpec(name, npu_path, host_path, host_inputs, bridge, seq, past, len(npu.graph.node),
                               {"mask_constants_made_finite": masks, "nan_guards_removed": guards, "rms_norms_made_scale_free": norms, "squares_as_mul": squares,
                                "kv_outputs_new_only": len(kv), "host_nodes": len(host.graph.node) if host is not None else 0}))
    for spec in specs[1:]:
        share_external_data(specs[0].npu_path, spec.npu_path)
    if staged is not None:  # nothing reads it any more: the graphs read their folded data files
        staged.unlink()
        (work / f"{staged.name}.data").unlink()
    return specs


def _external(model) -> dict:
    """name -> (location, offset, length) of a model's external tensors."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    found = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = ExternalDataInfo(tensor)
            found[tensor.name] = (info.location, int(info.offset or 0), int(info.length or 0))
    return found


def _same_bytes(a: Path, a_offset: int, b: Path, b_offset: int, length: int, chunk: int = 1 << 24) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        fa.seek(a_offset)
        fb.seek(b_offset)
        for start in range(0, length, chunk):
            size = min(chunk, length - start)
            if fa.read(size) != fb.read(size):
                return False
    return True


def share_external_data(first: Path, other: Path) -> int:
    """Point `other`'s external tensors at `first`'s data file where the bytes are the same (compared in chunks,
    never a whole tensor in memory), and drop `other`'s data file once nothing reads it.

    Both graphs are cut from one export and folded alike, so their weights are identical: on disk and in
    the CPU sessions (`cpu_sessions`) they then exist once. Returns how many tensors now read `first`'s file."""
    import onnx

    model_a, model_b = onnx.load(str(first), load_external_data=False), onnx.load(str(other), load_external_data=False)
    ext_a, ext_b = _external(model_a), _external(model_b)
    moved = 0
    for tensor in model_b.graph.initializer:
        if tensor.name not in ext_a or tensor.name not in ext_b:
            continue
        (loc_a, off_a, len_a), (loc_b, off_b, len_b) = ext_a[tensor.name], ext_b[tensor.name]
        if len_a != len_b or not _same_bytes(first.parent / loc_a, off_a, other.parent / loc_b, off_b, len_a):
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = loc_a
            elif entry.key == "offset":
                entry.value = str(off_a)
        moved += 1
    still_read = {loc for loc, _, _ in _external(model_b).values()}
    onnx.save_model(model_b, str(other))
    for location in {loc for loc, _, _ in ext_b.values()} - still_read - {loc for loc, _, _ in ext_a.values()}:
        (other.parent / location).unlink(missing_ok=True)
    return moved


def cpu_sessions(specs: list[GraphSpec]) -> dict:
    """fp32 CPU sessions of the static graphs, their weights in memory once (see mapped_sessions)."""
    return mapped_sessions({spec.name: spec.npu_path for spec in specs})


def mapped_sessions(paths: dict[str, Path]) -> dict:
    """CPU sessions of models whose external weights are mapped from disk once and handed to every session
    (`SessionOptions.add_initializer`, no copy; weight prepacking off, it would copy them per session): the
    weights are in memory once however many sessions read them."""
    import onnx
    import onnxruntime as ort
    from onnx.helper import tensor_dtype_to_np_dtype

    maps: dict[Path, np.memmap] = {}
    values: dict[tuple, object] = {}
    sessions = {}
    for key_name, model_path in paths.items():
        model = onnx.load(str(model_path), load_external_data=False)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.disable_prepacking", "1")
        dtypes = {t.name: (tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims)) for t in model.graph.initializer}
        keep = []
        for name, (location, offset, length) in _external(model).items():
            dtype, dims = dtypes[name]
            path = model_path.parent / location
            key = (path, offset, length)
            if key not in values:
                if path not in maps:
                    maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
                if offset % np.dtype(dtype).itemsize:
                    array = np.frombuffer(maps[path][offset: offset + length].tobytes(), dtype=dtype).reshape(dims)
                else:
                    array = np.ndarray(shape=dims, dtype=dtype, buffer=maps[path], offset=offset)
                values[key] = (array, ort.OrtValue.ortvalue_from_numpy(array))
            options.add_initializer(name, values[key][1])
            keep.append(values[key])
        del model
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        session.edgepack_shared_weights = keep  # the mapped arrays must outlive the session
        sessions[key_name] = session
    return sessions


class HostPrep:
    """Runs a host preparation graph on CPU and returns the NPU graph's extra float inputs."""

    def __init__(self, spec: GraphSpec):
        from edgepack.runtime.session import create_session

        self.spec = spec
        self.session = create_session(spec.host_path) if spec.host_path is not None else None

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            return {}
        names = {i.name for i in self.session.get_inputs()}
        outputs = self.session.run(self.spec.bridge, {k: v for k, v in feeds.items() if k in names})
        return dict(zip(self.spec.bridge, outputs))


class StaticDecoder:
    """Prefill/decode over a fixed cache; `sessions` maps graph name -> an onnxruntime session (CPU or HTP)."""

    def __init__(self, specs: list[GraphSpec], sessions: dict, max_context: int):
        self.specs = {s.name: s for s in specs}
        self.sessions = sessions
        self.hosts = {s.name: HostPrep(s) for s in specs}
        self.max_context = max_context
        self.prefill_len = self.specs["prefill"].seq_len
        decode = sessions["decode"]
        self.past_names = sorted((i.name for i in decode.get_inputs() if _PAST.match(i.name)),
                                 key=lambda n: (int(_PAST.match(n).group(1)), n))
        shapes = {i.name: i.shape for i in decode.get_inputs()}
        self.cache_shape = {name: tuple(shapes[name]) for name in self.past_names}  # [1, h, C - 1, d]
        self.input_names = {name: {i.name for i in s.get_inputs()} for name, s in sessions.items()}
        self.output_names = {name: [o.name for o in s.get_outputs()] for name, s in sessions.items()}
        self.prefix_kv: dict[str, np.ndarray] = {}  # name -> [1, h, P, d]: the attention-sink prefix, see `make_prefix`
        self.prefix_ids: list[int] = []

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(shape, dtype=np.float32) for name, shape in self.cache_shape.items()}

    def make_prefix(self, token_ids: list[int]) -> dict[str, np.ndarray]:
        """Run `token_ids` through this pipeline (the fp32 graphs on CPU) and keep their keys/values.

        Why: LLMs put "massive activations" on the first position (SmolLM2's residual stream reaches ~25,000
        there, against a few hundred elsewhere), and one 16-bit scale per tensor cannot cover both: the
        ordinary positions lose 40x in resolution, and the residual stream's error grows once the massive
        position is in the window. With the first position's keys/values computed
        once in fp32 and shipped (a few KB), the NPU graphs only see ordinary positions and are calibrated on
        them (PrefixQuant, arXiv:2410.05265). The prefix is the tokenizer's BOS token, which prompts start with.
        """
        cache = self.empty_cache()
        for position, token in enumerate(token_ids):
            _, cache = self.run("decode", [token], cache, position)
        self.prefix_ids = list(token_ids)
        self.prefix_kv = {name: np.ascontiguousarray(cache[name][:, :, : len(token_ids), :]) for name in self.past_names}
        return self.prefix_kv

    def use_prefix(self, token_ids: list[int], prefix_kv: dict[str, np.ndarray]) -> None:
        self.prefix_ids, self.prefix_kv = list(token_ids), dict(prefix_kv)

    def start(self) -> tuple[dict[str, np.ndarray], int]:
        """A cache holding the prefix (if any) and the position after it."""
        cache = self.empty_cache()
        for name, kv in self.prefix_kv.items():
            cache[name][:, :, : kv.shape[2], :] = kv
        return cache, len(self.prefix_ids)

    def feeds(self, graph: str, tokens: list[int], cache: dict, position: int) -> dict[str, np.ndarray]:
        """NPU feeds for `tokens` (right-padded to the graph's length) after `position` cached tokens."""
        spec = self.specs[graph]
        n, seq, past = len(tokens), spec.seq_len, spec.past_len
        if n > seq or position > past:
            raise ValueError(f"{graph}: {n} tokens after {position} do not fit (graph: {seq} tokens after up to {past})")
        ids = np.zeros((1, seq), dtype=np.int64)
        ids[0, :n] = tokens
        mask = np.zeros((1, past + seq), dtype=np.int64)
        mask[0, :position] = 1
        mask[0, past : past + n] = 1
        positions = np.arange(position, position + seq, dtype=np.int64)[None]
        feeds = {"input_ids": ids}
        feeds.update(self.hosts[graph]({"attention_mask": mask, "position_ids": positions}))
        for name in self.past_names:
            feeds[name] = np.ascontiguousarray(cache[name][:, :, :past, :])
        return {k: v for k, v in feeds.items() if k in self.input_names[graph]}

    def run(self, graph: str, tokens: list[int], cache: dict, position: int):
        """Returns (logits [n, vocab] for the real tokens, cache updated in place with their keys/values)."""
        feeds = self.feeds(graph, tokens, cache, position)
        outputs = dict(zip(self.output_names[graph], self.sessions[graph].run(None, feeds)))
        n = len(tokens)
        for name in self.past_names:
            new = outputs[name.replace("past_key_values", "present")]
            cache[name][:, :, position : position + n, :] = new[:, :, :n, :]
        return outputs["logits"][0, :n], cache

    def teacher_forced(self, tokens: list[int], decode_steps: int):
        """After the prefix, prefill tokens[:S], then feed the next `decode_steps` tokens one at a time; logits
        for every position of `tokens`."""
        cache, start = self.start()
        logits, cache = self.run("prefill", tokens[: self.prefill_len], cache, start)
        rows = [logits]
        position = start + min(len(tokens), self.prefill_len)
        for token in tokens[self.prefill_len : self.prefill_len + decode_steps]:
            step, cache = self.run("decode", [token], cache, position)
            rows.append(step)
            position += 1
        return np.concatenate(rows, axis=0)

    def calibration_feeds(self, windows: list[list[int]], decode_steps: int) -> dict[str, list[dict]]:
        """Feeds of both graphs over real text, the cache filled by this (fp32) pipeline itself."""
        feeds = {"prefill": [], "decode": []}
        for window in windows:
            cache, start = self.start()
            feeds["prefill"].append(self.feeds("prefill", window[: self.prefill_len], cache, start))
            _, cache = self.run("prefill", window[: self.prefill_len], cache, start)
            position = start + self.prefill_len
            for token in window[self.prefill_len : self.prefill_len + decode_steps]:
                feeds["decode"].append(self.feeds("decode", [token], cache, position))
                _, cache = self.run("decode", [token], cache, position)
                position += 1
        return feeds


class StaticEncoder:
    def __init__(self, spec: GraphSpec, session):
        self.spec = spec
        self.session = session
        self.host = HostPrep(spec)
        self.input_names = {i.name for i in session.get_inputs()}

    def feeds(self, tokens: list[int]) -> dict[str, np.ndarray]:
        seq, n = self.spec.seq_len, len(tokens)
        ids = np.zeros((1, seq), dtype=np.int64)
        ids[0, :n] = tokens[:seq]
        mask = np.zeros((1, seq), dtype=np.int64)
        mask[0, :n] = 1
        host = {"attention_mask": mask, "token_type_ids": np.zeros((1, seq), dtype=np.int64),
                "position_ids": np.arange(seq, dtype=np.int64)[None]}
        feeds = {"input_ids": ids, **self.host(host)}
        feeds.update({k: v for k, v in host.items() if k in self.input_names})
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def run(self, tokens: list[int]) -> np.ndarray:
        return self.session.run(None, self.feeds(tokens))[0][0, : len(tokens)]
