"""`edgepack devices calibrate`: measure this host and write a device profile (TOML) the projection can use.

What is measured, all with onnxruntime on the CPU at the requested thread count (the runtime edgepack
decodes with), except the triad:
  * memory bandwidth: a STREAM-like triad a = b + s*c over arrays far larger than the caches,
    cache-blocked so DRAM traffic is exactly 3 arrays (STREAM's counting), split over the threads;
  * effective GEMV bandwidth per weight format (fp32 MatMul, int8 MatMulNBits as `int8-weight` emits it,
    int4 MatMulNBits with float zero points at accuracy_level 4 as `int4` emits it) at several working-set
    sizes: weight bytes read / time for one vector through many 1024x1024 layers. This is
    the decode efficiency curve (a model that fits the last-level cache reads faster than DRAM);
  * GEMM throughput (fp32 MatMul, int8-compute MatMulNBits) with 256 rows: the prefill peak;
  * per-node dispatch: a chain of tiny Add nodes, time / nodes.
Power: measured from RAPL while the GEMM runs when a meter is readable, estimated otherwise.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import UsageError

GEMV_DIM = 1024  # square layers, the size class of small LLMs' projections
FORMAT_NAMES = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class CalibrateConfig:
    threads: int | None = None  # onnxruntime intra-op threads; None: all cores
    sizes_mb: tuple[float, ...] = (32, 128, 512)  # GEMV working sets; span the last-level cache
    triad_mb: float = 256  # per array
    repeats: int = 7
    gemm_rows: int = 256
    dispatch_nodes: int = 2000
    overhead_mb: float = 32.0  # working set of the per-weight overhead measurement
    device_id: str = "host"
    force: bool = False


@dataclass
class CalibrationResult:
    out: Path
    device: dict
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


def _median_and_best(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), min(samples)


def measure_triad(size_mb: float, threads: int, repeats: int) -> dict:
    """STREAM triad bandwidth in GB/s, 3 arrays x 4 bytes per element per pass."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = int(size_mb * 1e6 / 4)
    b = np.full(n, 1.0, dtype=np.float32)
    c = np.full(n, 2.0, dtype=np.float32)
    a = np.empty_like(b)
    block = 1 << 16  # 256 KB blocks: the temporary stays in L2, DRAM sees b, c read and a written
    parts = np.array_split(np.arange(0, n, block), threads)

    def work(starts):
        tmp = np.empty(block, dtype=np.float32)
        for start in starts:
            stop = min(start + block, n)
            t = tmp[: stop - start]
            np.multiply(c[start:stop], 3.0, out=t)
            np.add(b[start:stop], t, out=a[start:stop])

    times = []
    with ThreadPoolExecutor(max_workers=threads) as pool:  # numpy ufuncs release the GIL
        list(pool.map(work, parts))  # warm: page faults
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(work, parts))
            times.append(time.perf_counter() - start)
    median, best = _median_and_best(times)
    nbytes = 3 * 4 * n
    return {"gb_s": nbytes / median / 1e9, "best_gb_s": nbytes / best / 1e9, "array_mb": size_mb, "threads": threads}


def _gemv_model(fmt: str, layers: int, rows: int = 1, dim: int = GEMV_DIM):
    """`layers` KxK layers in `fmt`, layer i applied to its own input x{i} [rows, K], summed; returns
    (ModelProto, weight bytes). Own inputs (fed the same array): a chain would drift into denormals/inf with
    random weights, and one shared input would let the quantized layout share per-input work (block sums)
    across every layer, which a real model shares only between the two or three weights reading one tensor."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    k = dim
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    weight_bytes = 0
    outputs = []
    for i in range(layers):
        out = f"h{i}"
        outputs.append(out)
        w = (rng.standard_normal((k, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        # Quantized formats are quantized below by edgepack's own weight-only path, so calibration times the
        # exact kernels and layout `edgepack quantize` emits (4-bit planes, block minimums, accuracy level).
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [out], name=f"layer{i}"))
        weight_bytes += w.nbytes
    nodes.append(helper.make_node("Sum", outputs, ["y"]))
    graph = helper.make_graph(
        nodes, f"gemv_{fmt}", [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [rows, k]) for i in range(layers)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, k])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    if fmt != "fp32":
        from edgepack.profiles.model_facts import tensor_bytes
        from edgepack.quantize.schemes import Int4, Int8Weight
        from edgepack.quantize.weight_only import quantize_weight_only

        # int4 with round-to-nearest: the layout `edgepack quantize` writes by default (hqq) without hqq's optimizer,
        # which needs torch: timing does not depend on the values, and a device being calibrated has no torch
        model, _facts = quantize_weight_only(model, Int8Weight() if fmt == "int8" else Int4(algorithm="rtn"))
        weight_bytes = int(sum(tensor_bytes(t) for t in model.graph.initializer))
    return model, weight_bytes


def _gemv_feeds(layers: int, rows: int, dim: int = GEMV_DIM) -> dict:
    import numpy as np

    x = np.random.default_rng(1).standard_normal((rows, dim)).astype(np.float32)
    return {f"x{i}": x for i in range(layers)}


def _session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def _time_runs(session, feeds: dict, repeats: int, warmup: int = 1, budget_s: float = 5.0) -> list[float]:
    """Timed runs; slow kernels stop after `budget_s` (at least 3 runs) so calibration stays about a minute."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and sum(times) > budget_s:
            break
    return times


def _time_gemv(fmt: str, size_mb: float, threads: int, repeats: int, dim: int = GEMV_DIM) -> tuple[int, int, list[float]]:
    """(weight bytes, layers, run times) of one vector through ~size_mb of dim-square layers in `fmt`."""
    _, one_layer = _gemv_model(fmt, 1, dim=dim)
    layers = max(2, int(round(size_mb * 1e6 / one_layer)))
    model, weight_bytes = _gemv_model(fmt, layers, dim=dim)
    return weight_bytes, layers, _time_runs(_session(model, threads), _gemv_feeds(layers, 1, dim), repeats)


def measure_gemv(fmt: str, size_mb: float, threads: int, repeats: int) -> dict:
    weight_bytes, layers, times = _time_gemv(fmt, size_mb, threads, repeats)
    median, best = _median_and_best(times)
    return {"format": fmt, "working_set_mb": weight_bytes / 1e6, "layers": layers, "gb_s": weight_bytes / median / 1e9,
            "best_gb_s": weight_bytes / best / 1e9}


def measure_weight_overhead(fmt: str, threads: int, repeats: int, size_mb: float = 32.0, small_dim: int = 256) -> dict:
    """Fixed cost per weight matrix per call, beside its bytes: t = bytes / BW + weights x overhead, solved from
    the same working set as GEMV_DIM-square layers and as 16x as many small_dim-square ones. It is what makes a
    model of many small matrices (SmolLM2's 576-wide projections; the block-minimum MatMul and Add of the
    int4 layout) slower than its bytes say; the GEMV curves are corrected by it."""
    points = []
    for dim in (GEMV_DIM, small_dim):
        weight_bytes, layers, times = _time_gemv(fmt, size_mb, threads, repeats, dim)
        points.append((weight_bytes, layers, statistics.median(times), min(times)))
    (b1, n1, t1, best1), (b2, n2, t2, best2) = points

    def solve(ta: float, tb: float) -> float:
        # ta = b1*r + n1*o, tb = b2*r + n2*o  (r = 1 / bandwidth)
        det = b1 * n2 - b2 * n1
        return max(0.0, (b1 * tb - b2 * ta) / det) if det else 0.0

    return {"format": fmt, "weight_us": solve(t1, t2) * 1e6, "best_weight_us": solve(best1, best2) * 1e6,
            "layers": [n1, n2], "dims": [GEMV_DIM, small_dim], "working_set_mb": [b1 / 1e6, b2 / 1e6]}


def measure_gemm(fmt: str, rows: int, threads: int, repeats: int) -> dict:
    layers = 8
    model, _ = _gemv_model(fmt, layers, rows=rows)
    session = _session(model, threads)
    median, best = _median_and_best(_time_runs(session, _gemv_feeds(layers, rows), max(3, repeats // 2)))
    flops = 2 * rows * GEMV_DIM * GEMV_DIM * layers
    return {"format": fmt, "rows": rows, "gflops": flops / median / 1e9, "best_gflops": flops / best / 1e9}


def measure_dispatch(nodes: int, threads: int, repeats: int) -> dict:
    """Per-node cost of onnxruntime's executor on tiny tensors: what thousands of shape/elementwise nodes add."""
    import numpy as np
    from onnx import TensorProto, helper

    graph_nodes = []
    prev = "x"
    for i in range(nodes):
        out = f"t{i}" if i < nodes - 1 else "y"
        graph_nodes.append(helper.make_node("Add" if i % 2 == 0 else "Mul", [prev, "one"], [out]))
        prev = out
    graph = helper.make_graph(
        graph_nodes, "dispatch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
                                  helper.make_tensor_value_info("one", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    session = _session(model, threads)
    feeds = {"x": np.zeros((1, 64), np.float32), "one": np.ones((1, 64), np.float32)}
    median, best = _median_and_best(_time_runs(session, feeds, repeats))
    return {"nodes": nodes, "us_per_node": median / nodes * 1e6, "best_us_per_node": best / nodes * 1e6}


def host_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_mb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_mb = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"cpu": cpu, "machine": platform.machine(), "system": platform.system(), "cores": os.cpu_count(),
            "ram_mb": ram_mb, "python": platform.python_version()}


def calibrate_host(out: Path | str, config: CalibrateConfig = CalibrateConfig(), on_status=None) -> CalibrationResult:
    """Measure this host and write `out` (a device TOML loadable with --devices-dir)."""
    import onnxruntime as ort

    from edgepack.outputs import check_output_file, write_output_file
    from edgepack.profiles.energy import RaplMeter

    out = check_output_file(out)
    if out.exists() and not config.force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    status = on_status or (lambda message: None)
    threads = config.threads or os.cpu_count() or 1
    start = time.perf_counter()
    host = host_description()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = f"edgepack devices calibrate on {host['cpu']}, {threads} threads, onnxruntime {ort.__version__} CPU, {stamp}"
    load_before = _loadavg()

    status("memory bandwidth (triad)")
    triad = measure_triad(config.triad_mb, threads, config.repeats)
    curves, overheads = {}, {}
    for fmt in FORMAT_NAMES:
        status(f"GEMV {fmt}: fixed cost per weight matrix")
        overheads[fmt] = measure_weight_overhead(fmt, threads, config.repeats, size_mb=config.overhead_mb)
        curves[fmt] = []
        for size in config.sizes_mb:
            status(f"GEMV {fmt} at {size:g} MB")
            point = measure_gemv(fmt, size, threads, config.repeats)
            # the curve holds bandwidth alone: the per-weight overhead is projected per weight matrix
            for key, over in (("gb_s", overheads[fmt]["weight_us"]), ("best_gb_s", overheads[fmt]["best_weight_us"])):
                seconds = point["working_set_mb"] * 1e6 / (point[key] * 1e9) - point["layers"] * over * 1e-6
                if seconds > 0:
                    point[key] = point["working_set_mb"] * 1e6 / seconds / 1e9
            curves[fmt].append(point)
    status("GEMM throughput")
    gemm = {fmt: measure_gemm(fmt, config.gemm_rows, threads, config.repeats) for fmt in ("fp32", "int4")}
    status("per-node dispatch")
    dispatch = measure_dispatch(config.dispatch_nodes, threads, config.repeats)

    power = None
    meter = RaplMeter()
    if meter.available()[0]:
        status("power (RAPL)")
        power = _measure_power(meter, config, threads)

    figures = {"triad": triad, "gemv": curves, "weight_overhead": overheads, "gemm": gemm, "dispatch": dispatch, "power": power,
               "loadavg_before": load_before, "loadavg_after": _loadavg()}
    text = render_host_toml(config.device_id, host, conditions, figures, threads)
    write_output_file(out, text)
    from edgepack.profiles.devices import load_device_file

    device = load_device_file(out)  # what we wrote must load: same validation as any device file
    return CalibrationResult(out=out, device=device.to_json(), figures=figures, seconds=time.perf_counter() - start)


def _measure_power(meter, config: CalibrateConfig, threads: int) -> dict:
    import numpy as np

    meter.start()
    time.sleep(1.0)
    idle_w = meter.read_j() / 1.0
    meter.stop()
    model, _ = _gemv_model("fp32", 8, rows=config.gemm_rows)
    session = _session(model, threads)
    x = np.ones((config.gemm_rows, GEMV_DIM), np.float32)
    meter.start()
    begin = time.perf_counter()
    while time.perf_counter() - begin < 2.0:
        session.run(None, {"x": x})
    joules = meter.stop()
    return {"idle_w": idle_w, "load_w": joules / (time.perf_counter() - begin), "scope": meter.scope}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _fig(value, source: str, verified: bool, basis: str = "") -> str:
    if isinstance(value, list):
        rendered = "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
    else:
        rendered = f"{value:.6g}"
    parts = [f"value = {rendered}", f"source = {_q(source)}", f"verified = {'true' if verified else 'false'}"]
    if basis:
        parts.append(f"basis = {_q(basis)}")
    return "{ " + ", ".join(parts) + " }"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_host_toml(device_id: str, host: dict, conditions: str, figures: dict, threads: int) -> str:
    """A device file in the database's schema; measured figures are verified = true with the run as source."""
    triad = figures["triad"]
    bw = triad["gb_s"]
    measured = f"measured: {conditions}"
    cpu, cores, machine = host["cpu"], host["cores"], host["machine"]
    load = f"{figures.get('loadavg_before')} / {figures.get('loadavg_after')}"
    lines = [
        "# Written by `edgepack devices calibrate`. Measured figures carry the run as their source.",
        "schema_version = 1",
        f"id = {_q(device_id)}",
        f"name = {_q('This host: ' + str(cpu))}",
        'class = "host"',
        f"soc = {_q(f'{cpu} ({cores} logical cores, {machine})')}",
        f"notes = {_q(f'Calibrated with {threads} threads; load average before/after {load} (a busy host lowers every figure).')}",
        "",
        "[memory]",
    ]
    if host.get("ram_mb"):
        lines.append(f"ram_mb = {_fig(round(host['ram_mb']), 'measured: /proc/meminfo MemTotal', True)}")
        lines.append(f"app_memory_limit_mb = {_fig(round(host['ram_mb'] * 0.8), 'no per-app limit on a Linux host', False, '80% of MemTotal, leaving room for the OS')}")
    triad_source = f"{measured}; STREAM-like triad, {triad['array_mb']:g} MB arrays, median of runs (best {triad['best_gb_s']:.3g} GB/s)"
    lines.append(f"bandwidth_gb_s = {_fig(bw, triad_source, True)}")
    dram_basis = "about 2.5 pJ/bit for server DDR4/DDR5 access energy, an order-of-magnitude figure"
    lines.append(f"dram_pj_per_byte = {_fig(20, 'edgepack estimate (docs/devices.md, Energy)', False, dram_basis)}")
    lines += ["", "[compute]"]
    gemm = figures["gemm"]
    rows = gemm["fp32"]["rows"]
    lines.append(f"cpu_fp32_gflops = {_fig(gemm['fp32']['gflops'], f'{measured}; fp32 MatMul {rows}x1024x1024, median', True)}")
    lines.append(f"cpu_int8_gops = {_fig(gemm['int4']['gflops'], f'{measured}; int4 MatMulNBits accuracy_level 4 (int8 compute), {rows}x1024x1024, median', True)}")
    power = figures.get("power")
    lines += ["", "[power]"]
    if power:
        scope = power["scope"]
        lines.append(f"sustained_w = {_fig(power['load_w'], f'{measured}; {scope} during a 2 s GEMM', True)}")
        lines.append(f"idle_w = {_fig(power['idle_w'], f'{measured}; over 1 s idle', True)}")
    else:
        from edgepack.profiles.energy import HOST_WATTS_PER_ACTIVE_CORE as per_core

        basis = f"{per_core:g} W per active thread x {threads} threads (x86 server/desktop core at all-core load)"
        lines.append(f"sustained_w = {_fig(per_core * threads, 'no energy meter readable on this host', False, basis)}")
        lines.append(f"idle_w = {_fig(1.0 * threads, 'no energy meter readable on this host', False, 'about 1 W per core idle, order of magnitude')}")
    lines += ["", "[efficiency]"]
    for fmt in FORMAT_NAMES:
        last = figures["gemv"][fmt][-1]
        source = f"{measured}; {fmt} GEMV at {last['working_set_mb']:.0f} MB / triad"
        lines.append(f"decode_bandwidth_{fmt} = {_fig(last['gb_s'] / bw, source, True)}")
    prefill_basis = "no derating beyond the measured GEMM rate; attention and elementwise work are not in it"
    lines.append(f"prefill_compute = {_fig(1.0, 'the compute peaks above are measured GEMM throughput', False, prefill_basis)}")
    lines += ["", "[runtime]"]
    d = figures["dispatch"]
    dispatch_source = f"{measured}; chain of {d['nodes']} tiny Add/Mul nodes, median"
    lines.append(f"dispatch_us_per_node = {_fig(d['us_per_node'], dispatch_source, True)}")
    lines.append(f"dispatch_best_us_per_node = {_fig(d['best_us_per_node'], dispatch_source.replace('median', 'best of runs'), True)}")
    lines.append(f"overhead_mb = {_fig(150, 'edgepack estimate (docs/devices.md, Memory fit)', False, 'onnxruntime CPU session, arena and activations for a small decoder')}")
    lines += ["", "[calibration]", "# Effective GEMV bandwidth (weight bytes / time, one vector through 1024x1024 layers) by working set,",
              "# with the fixed cost per weight matrix (gemv_<format>_weight_us) taken out; projection adds it per weight."]
    for fmt in FORMAT_NAMES:
        o = figures["weight_overhead"][fmt]
        source = (f"{measured}; {o['layers'][0]} {o['dims'][0]}-square vs {o['layers'][1]} {o['dims'][1]}-square {fmt} layers "
                  f"over the same ~{o['working_set_mb'][0]:.0f} MB, t = bytes/BW + weights x overhead")
        lines.append(f"gemv_{fmt}_weight_us = {_fig(o['weight_us'], source + ', medians', True)}")
        lines.append(f"gemv_{fmt}_best_weight_us = {_fig(o['best_weight_us'], source + ', best runs', True)}")
        points = figures["gemv"][fmt]
        lines.append(f"gemv_{fmt}_working_set_mb = {_fig([p['working_set_mb'] for p in points], measured, True)}")
        lines.append(f"gemv_{fmt}_gb_s = {_fig([p['gb_s'] for p in points], measured + '; median of runs', True)}")
        lines.append(f"gemv_{fmt}_best_gb_s = {_fig([p['best_gb_s'] for p in points], measured + '; best of runs (least disturbed)', True)}")
    return "\n".join(lines) + "\n"
