"""Export a quantized (or FP) denoiser as an ONNX QDQ graph plus its temporal feature table.

Layout of an export folder::

    model_index.json, scheduler/, vae/, text_encoder/, ...   the pipeline's other components
    <denoiser>/config.json                  the denoiser's config (shapes, conditioning): every
                                            family (see check_exportable / block_in_graph)
    denoiser.onnx                           the graph: QDQ activations, integer weight initializers
    temporal_features.safetensors           the temporal feature table the sampler feeds it (absent
                                            when the block is in the graph: block_in_graph)
    export.json                             format, inputs, sampler and timesteps, quantization,
                                            weight forms, file sizes

The graph (:mod:`tfmq.export.graph`) takes the temporal features as inputs, so the timestep
never enters it and it holds ONE set of activation parameters. What this means per checkpoint:

* ``--fsc tib`` (the tfmq default) and TIAR: the temporal block's per-step parameters only act
  inside the block, which leaves the graph; the table is computed with the quantized runtime
  block, step by step. ``--temporal cache``: the checkpoint's table is used as stored.
* ``--fsc all`` (every quantizer one set per step) is refused: a graph with static scales cannot
  hold per-step sets, and scales fed as graph inputs would stop every runtime from fusing the
  int8 kernels. Quantize with ``--fsc tib`` or ``--fsc none`` for a CPU deployment.
* a model that is not tied to its sampler (no per-step parameters) can be tabulated for any
  sampler (``sampler=``); a step-dependent one only for its calibrated sampler.

Weights (:mod:`tfmq.export.qdq`): integer initializers, one byte per code of up to 8 bits, with
per-channel float32 scales; with ``weight_storage="int4"`` weights of 4 bits or fewer are stored
as ONNX ``uint4`` / ``int4`` (opset 21, half a byte a code), at the price of int8 compute (the
runtimes then dequantize them to float). After writing, every weight initializer is read back
and compared with the checkpoint's codes: the export fails unless they are equal.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..sampling import SCHEDULERS, SamplerConfig
from ..folders import refuse_nonempty, written_whole
from ..models.adapter import ADAPTERS, adapter_for
from .graph import OUTPUT_NAME, GraphDenoiser, graph_denoiser
from .qdq import ExportError, ExportWeight, _ExportLayer
from .table import feature_table, save_table

FORMAT = "tfmq-onnx"
FORMAT_VERSION = 1
ONNX_FILE = "denoiser.onnx"
TABLE_FILE = "temporal_features.safetensors"
EXPORT_CONFIG = "export.json"
WEIGHT_STORAGE = ("int8", "int4")
DEFAULT_OPSET = 17
INT4_OPSET = 21
EXTERNAL_DATA_BYTES = 1_800_000_000          # protobuf's 2 GB limit: larger graphs keep tensors beside

#: the denoiser classes the export handles (families whose adapter says ``onnx_export``)
EXPORTABLE_CLASSES = tuple(t.__name__ for a in ADAPTERS if a.onnx_export for t in a.model_types)

FSC_ALL_MESSAGE = (
    "this checkpoint was calibrated with --fsc all: every activation quantizer holds one parameter "
    "set per sampling step ({n} sets), which one ONNX graph with static scales cannot hold (scales "
    "fed per step as graph inputs would keep ONNX Runtime and OpenVINO from fusing int8 kernels). "
    "Quantize with --fsc tib (the tfmq default: only the temporal block is per step, and it is "
    "exported as a feature table outside the graph) or --fsc none, then export that checkpoint")


def check_exportable(info: dict | None, denoiser_config: dict, denoiser_class: str) -> None:
    """Refuse, before any work, what cannot be exported (see the module docstring)."""
    if denoiser_class not in EXPORTABLE_CLASSES:
        raise ExportError(f"ONNX export supports {', '.join(EXPORTABLE_CLASSES)}; "
                          f"{denoiser_class} is not supported yet: sample it with the PyTorch backends")
    if info is not None:
        fsc = info.get("fsc") or {}
        if fsc.get("mode") == "all" and fsc.get("n_sets", 1) > 1:
            raise ExportError(FSC_ALL_MESSAGE.format(n=fsc["n_sets"]))
    if denoiser_config.get("time_embedding_type") == "fourier":
        raise ExportError("this UNet (Fourier time embedding) also divides its output by the noise "
                          "level: the timestep would have to enter the graph; not supported")
    if denoiser_config.get("addition_embed_type") not in (None, "text_time") or \
            denoiser_config.get("time_cond_proj_dim") is not None:
        raise ExportError("this UNet's time embedding also reads image inputs or a guidance embedding: "
                          "not supported by the ONNX export")


def block_in_graph(denoiser, info: dict | None) -> bool:
    """Whether the temporal information block stays in the graph: when it reads more than
    (timestep, class) (SDXL's pooled text and size ids, PixArt-alpha 1024's size conditions) its
    features are no finite table, so the graph takes the timestep and those inputs. One graph holds
    one set of activation parameters, so such a checkpoint must have no per-step (FSC) sets."""
    from ..models.temporal import find_temporal_block
    if not find_temporal_block(denoiser).needs_conditioning:
        return False
    fsc = (info or {}).get("fsc") or {}
    if fsc.get("n_sets", 1) > 1:
        raise ExportError(
            f"this {type(denoiser).__name__}'s time embedding also reads other inputs (text embeddings or "
            "size conditions), so its temporal block is exported inside the graph, which holds one set of "
            f"activation parameters; this checkpoint's block holds one per sampling step ({fsc['n_sets']} "
            f"sets, FSC {fsc.get('mode')!r}). Quantize with --fsc none to export it")
    return True


# ---- the source: checkpoint folder, pipeline folder or pipeline object -----------------------------
class _Source:
    """What is exported: a runtime (or FP) denoiser that may be modified, its quantization info,
    the scheduler config, and a way to write the pipeline's other files."""

    def __init__(self, denoiser, info, scheduler_config, write_components):
        self.denoiser, self.info = denoiser, info
        self.scheduler_config = scheduler_config
        self.write_components = write_components


def _copy_pipeline_files(src: Path, component: str):
    def write(out: Path) -> None:
        index = json.loads((src / "model_index.json").read_text())
        shutil.copy2(src / "model_index.json", out / "model_index.json")
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list) or value[0] is None:
                continue
            if name == component:
                (out / name).mkdir()
                shutil.copy2(src / name / "config.json", out / name / "config.json")
            elif (src / name).is_dir():
                shutil.copytree(src / name, out / name)
    return write


def _save_pipeline_files(pipe, denoiser, component: str):
    def write(out: Path) -> None:
        pipe.save_config(str(out))
        for name, comp in pipe.components.items():
            if comp is None:
                continue
            if name == component:
                denoiser.save_config(str(out / name))
            elif hasattr(comp, "save_pretrained"):
                comp.save_pretrained(str(out / name))
    return write


def _runtime_copy(denoiser):
    """A runtime-module copy of a quantized denoiser (fake-quant or runtime), through the
    checkpoint tensors: the same representation a saved checkpoint loads into."""
    from accelerate import init_empty_weights

    from ..checkpoint import checkpoint_tensors
    from ..runtime.convert import build_runtime
    tensors, meta = checkpoint_tensors(denoiser)
    info = copy.deepcopy(denoiser.tfmq_info)
    cls = type(denoiser)
    with init_empty_weights(include_buffers=False):
        fresh = cls.from_config(copy.deepcopy(dict(denoiser.config)))
    fresh.eval()
    build_runtime(fresh, {k: v.cpu() for k, v in tensors.items()}, meta, info["wrap_spec"], info, "reference")
    fresh.tfmq_info = info
    return fresh


def _resolve(source) -> _Source:
    from ..checkpoint import CONFIG_FILE, config_info, load_denoiser, read_config
    from ..models.adapter import denoiser_component, get_denoiser, load_pipeline
    if isinstance(source, (str, Path)):
        path = Path(source)
        if (path / CONFIG_FILE).exists():
            cfg = read_config(path)
            component = cfg["denoiser_component"]
            denoiser_cfg = json.loads((path / component / "config.json").read_text())
            check_exportable(config_info(cfg), denoiser_cfg, cfg.get("denoiser_class", ""))
            denoiser = load_denoiser(path, cfg=cfg)
            sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            return _Source(denoiser, denoiser.tfmq_info, sched_cfg, _copy_pipeline_files(path, component))
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path} is neither a tfmq checkpoint nor a diffusers pipeline folder")
        source = load_pipeline(path)
    pipe = source
    denoiser = get_denoiser(pipe)
    component = denoiser_component(pipe)
    info = getattr(denoiser, "tfmq_info", None)
    check_exportable(info, dict(denoiser.config), type(denoiser).__name__)
    copy_ = _runtime_copy(denoiser) if info is not None else copy.deepcopy(denoiser).float().cpu().eval()
    return _Source(copy_, info, dict(pipe.scheduler.config), _save_pipeline_files(pipe, copy_, component))


def _timesteps(src: _Source, sampler: SamplerConfig | None) -> tuple[SamplerConfig, list[int]]:
    """The sampler the table is made for, and its timesteps."""
    from ..runtime.steps import is_step_dependent
    info = src.info
    cal = SamplerConfig(**info["sampler"]) if info is not None else None
    if sampler is None:
        if cal is None:
            raise ValueError("an FP model has no calibrated sampler: give the sampler to tabulate "
                             "the temporal features for")
        return cal, [int(t) for t in info["timesteps"]]
    sampler.validate()
    sched = SCHEDULERS[sampler.name].from_config(src.scheduler_config)
    sched.set_timesteps(sampler.steps)
    ts = [int(t) for t in sched.timesteps]
    if cal is not None and is_step_dependent(src.denoiser) and (
            sampler.name != cal.name or sampler.steps != cal.steps or ts != [int(t) for t in info["timesteps"]]):
        raise ExportError(f"this checkpoint holds per-step parameters for {cal.name} with {cal.steps} steps; "
                          f"it can only be exported for that sampler (requested {sampler.name} with "
                          f"{sampler.steps} steps)")
    return sampler, ts


# ---- ONNX writing and checks -------------------------------------------------------------------
def _trace(graph: GraphDenoiser, path: Path, opset: int, sample_size) -> None:
    import warnings
    inputs = graph.example_inputs(batch=2, sample_size=sample_size)
    graph.sample_shape = tuple(inputs[0].shape[1:])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")             # tracer warnings about diffusers' shape checks
        torch.onnx.export(graph, inputs, str(path), dynamo=False, opset_version=opset,
                          input_names=graph.input_names, output_names=[OUTPUT_NAME],
                          dynamic_axes=graph.dynamic_axes, do_constant_folding=True)


def _export_weights(graph: torch.nn.Module) -> dict[str, ExportWeight]:
    """Initializer name of each weight's codes -> its export module."""
    out = {}
    for name, m in graph.named_modules():
        if isinstance(m, ExportWeight) and m.form != "fp":
            out[f"{name}.codes"] = m
    return out


def _initializers(model) -> dict:
    """Initializer of every name, following the Identity nodes by which the exporter shares
    identical constants (the name of a deduplicated tensor is an Identity's output)."""
    inits = {i.name: i for i in model.graph.initializer}
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in inits:
                inits[node.output[0]] = inits[node.input[0]]
                changed = True
    return inits


def check_codes(model, graph: torch.nn.Module) -> int:
    """Compare every weight initializer of ``model`` with the runtime's packed weights: the
    integer codes exactly (inverting the weight's form), scales, zero-points and offset terms
    bit for bit. Raises :class:`ExportError` on any difference; returns the number of weights."""
    from onnx import numpy_helper
    inits = _initializers(model)
    dq_inputs = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    n = 0
    for init_name, w in _export_weights(graph).items():
        if init_name not in inits:
            raise ExportError(f"weight initializer {init_name} is missing from the ONNX graph")
        if init_name not in dq_inputs and inits[init_name].name not in dq_inputs:
            raise ExportError(f"weight initializer {init_name} does not feed a DequantizeLinear")
        stored = torch.from_numpy(np.asarray(numpy_helper.to_array(inits[init_name])).astype(np.int16))
        if not torch.equal(w.recover_codes(stored), w.reference_codes):
            raise ExportError(f"weight initializer {init_name} differs from the checkpoint's codes")
        prefix = init_name[: -len(".codes")]
        for key, want in w.reference_tensors().items():
            name = f"{prefix}.{key}"
            if name not in inits:
                raise ExportError(f"initializer {name} is missing from the ONNX graph")
            have = np.asarray(numpy_helper.to_array(inits[name]))
            if have.shape != tuple(want.shape) or not np.array_equal(have.astype(np.float64),
                                                                     want.double().numpy()):
                raise ExportError(f"initializer {name} differs from the checkpoint's {key}")
        n += 1
    return n


def _pack_nibbles(arr: np.ndarray) -> bytes:
    """ONNX 4-bit raw data: two values a byte, the first in the low nibble (two's complement
    nibbles for int4)."""
    flat = (arr.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _to_int4(model, graph: GraphDenoiser) -> int:
    """Store native-form weights of 4 bits or fewer (codes and zero-points) as ONNX 4-bit types
    (opset 21). Returns how many weights were converted."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter
    targets = {}
    for init_name, w in _export_weights(graph).items():
        if w.form == "native" and w.bits <= 4:
            signed = w.codes.dtype == torch.int8
            targets[init_name] = signed
            targets[init_name[: -len(".codes")] + ".zero_point"] = signed
    if not targets:
        return 0
    converted = version_converter.convert_version(model, INT4_OPSET)
    model.CopyFrom(converted)
    del model.graph.value_info[:]            # shapes the converter inferred: not part of the graph
    for init in model.graph.initializer:
        if init.name in targets:
            arr = numpy_helper.to_array(init)
            dtype = TensorProto.INT4 if targets[init.name] else TensorProto.UINT4
            init.CopyFrom(helper.make_tensor(init.name, dtype, arr.shape, _pack_nibbles(arr), raw=True))
    onnx.checker.check_model(model)
    return len(targets) // 2


def _fold_squeeze_ifs(model) -> int:
    """Replace the exporter's ``If(shape[k] == 1, Squeeze(x, k), Identity(x))`` (a PyTorch
    ``squeeze(k)``, which is a no-op when that axis is not 1) by its branch where the axis is static
    (diffusers' PixArt squeezes its token axis): ONNX Runtime refuses the graph otherwise (the
    never-taken Squeeze fails its shape inference). Returns how many were folded."""
    import onnx
    from onnx import helper, numpy_helper
    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    if not ifs:
        return 0
    prod = {o: n for n in graph.node for o in n.output}
    shapes = {v.name: v.type.tensor_type.shape for v in
              onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.value_info}

    def const(name):
        n = prod.get(name)
        return numpy_helper.to_array(n.attribute[0].t) if n is not None and n.op_type == "Constant" else None

    folded = 0
    for node in ifs:
        branches = {a.name: a.g for a in node.attribute}
        then, other = branches.get("then_branch"), branches.get("else_branch")
        if then is None or other is None or [n.op_type for n in other.node] != ["Identity"] or \
                [n.op_type for n in then.node][-1:] != ["Squeeze"]:
            continue
        x = other.node[0].input[0]
        eq = prod.get(node.input[0])
        if eq is None or eq.op_type != "Equal":
            continue
        gather = prod.get(eq.input[0])
        if gather is None or gather.op_type != "Gather" or const(eq.input[1]) is None:
            continue
        shape_node = prod.get(gather.input[0])
        axis = const(gather.input[1])
        if shape_node is None or shape_node.op_type != "Shape" or shape_node.input[0] != x or axis is None:
            continue
        dims = shapes.get(x)
        k = int(axis.reshape(-1)[0])
        if dims is None or k >= len(dims.dim) or not dims.dim[k].HasField("dim_value"):
            continue
        size = dims.dim[k].dim_value
        if size == int(const(eq.input[1]).reshape(-1)[0]):
            continue            # the axis is 1: keep the graph as traced (not seen in our models)
        node.CopyFrom(helper.make_node("Identity", [x], [node.output[0]], name=node.name + "_folded"))
        folded += 1
    return folded


def _save_model(model, path: Path) -> None:
    import onnx
    try:
        large = model.ByteSize() > EXTERNAL_DATA_BYTES
    except Exception:           # protobuf cannot even size a message over 2 GB (EncodeError)
        large = True
    if large:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
        onnx.checker.check_model(str(path))
    else:
        onnx.save(model, str(path))
        onnx.checker.check_model(model)


def _weight_summary(graph: GraphDenoiser) -> dict:
    forms: dict[str, int] = {}
    layers = {}
    for name, m in graph.named_modules():
        if isinstance(m, _ExportLayer):
            kinds = [w.form for w in m.weights]
            layers[name[len("denoiser."):]] = kinds[0] if len(kinds) == 1 else kinds
            for k in kinds:
                forms[k] = forms.get(k, 0) + 1
    return {"forms": forms, "layers": layers}


def _files_size(out: Path) -> dict:
    onnx_bytes = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(ONNX_FILE))
    table = out / TABLE_FILE
    return {"onnx_bytes": onnx_bytes, "table_bytes": table.stat().st_size if table.exists() else 0}


# ---- the entry point -------------------------------------------------------------------------
def export_onnx(source, out_dir, sampler: SamplerConfig | None = None, weight_storage: str = "int8",
                opset: int = DEFAULT_OPSET, overwrite: bool = False,
                sample_size: int | tuple[int, int] | None = None) -> Path:
    """Write ``source``'s denoiser as an ONNX QDQ graph + temporal feature table in ``out_dir``.

    ``source``: a tfmq checkpoint folder, a quantized pipeline (fake-quant after
    :func:`tfmq.quantize` or runtime after :func:`tfmq.load`), or an FP pipeline / pipeline
    folder (an FP32 graph: the baseline the INT8 file and speed are compared with; give
    ``sampler``). ``sampler``: the sampler whose timesteps the table covers (default: the
    checkpoint's calibrated one; another one only for models without per-step parameters).
    ``weight_storage``: ``int8`` (one byte a code, int8 compute) or ``int4`` (weights of <= 4 bits
    as ONNX 4-bit types, opset 21). ``sample_size``: the graph's spatial size (default: the
    denoiser config's). The batch is a dynamic axis.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; the folder is written
    beside it and moved into place at the end. Returns ``out_dir``.
    """
    import onnx
    if weight_storage not in WEIGHT_STORAGE:
        raise ValueError(f"weight_storage must be one of {', '.join(WEIGHT_STORAGE)}, got {weight_storage!r}")
    if not isinstance(opset, int) or not 17 <= opset <= 20:
        raise ValueError(f"opset must be 17..20 (the TorchScript exporter's range), got {opset!r}")
    if isinstance(sample_size, int):
        sample_size = (sample_size, sample_size)
    out_dir = Path(out_dir)
    refuse_nonempty(out_dir, overwrite)
    src = _resolve(source)
    in_graph = block_in_graph(src.denoiser, src.info)
    sampler, timesteps = _timesteps(src, sampler)
    table = None if in_graph else feature_table(src.denoiser, timesteps, sampler.to_dict())
    graph = graph_denoiser(src.denoiser, table, int4_weights=weight_storage == "int4")
    with written_whole(out_dir) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp) as trace_dir:
            traced = Path(trace_dir) / ONNX_FILE
            _trace(graph, traced, opset, sample_size)
            model = onnx.load(str(traced))
        _fold_squeeze_ifs(model)
        n_int4 = _to_int4(model, graph) if weight_storage == "int4" else 0
        n_checked = check_codes(model, graph)
        _save_model(model, tmp / ONNX_FILE)
        if table is not None:
            save_table(table, tmp / TABLE_FILE)
        src.write_components(tmp)
        cfg = _export_config(src, graph, table, timesteps, sampler, weight_storage, model, n_checked, n_int4)
        cfg["files"] = _files_size(tmp)
        (tmp / EXPORT_CONFIG).write_text(json.dumps(cfg, indent=2))
    return out_dir


def _temporal_entry(table, timesteps: list[int], sampler: SamplerConfig, info: dict | None) -> dict:
    """export.json's ``temporal``: the feature table's description, or (``table`` None) that the
    block is in the graph, which then takes the timestep."""
    if table is None:
        return {"mode": "graph", "timesteps": [int(t) for t in timesteps], "classes": None,
                "sampler": asdict(sampler), "source": "the temporal block is in the graph (timestep input)"}
    return {"mode": "table", "timesteps": table.timesteps.tolist(),
            "classes": None if table.classes is None else table.classes.tolist(),
            "dims": list(table.dims), "features": list(table.features), "sampler": asdict(sampler),
            "source": "checkpoint cache" if (info or {}).get("temporal", {}).get("mode") == "cache"
            else "computed by the exported model's temporal block"}


def _export_config(src: _Source, graph: GraphDenoiser, table, timesteps: list[int], sampler: SamplerConfig,
                   weight_storage: str, model, n_checked: int, n_int4: int) -> dict:
    info = src.info
    quant = None
    if info is not None:
        quant = {k: info.get(k) for k in ("method", "wbits", "abits", "softmax_bits", "layer_policy")}
        quant["fsc"] = (info.get("fsc") or {}).get("mode", "none")
        quant["temporal"] = (info.get("temporal") or {}).get("mode")
        quant["weight_symmetric"] = info.get("wrap_spec", {}).get("weight_symmetric")
        quant["act_symmetric"] = info.get("wrap_spec", {}).get("act_symmetric")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tfmq_version": __version__,
        "onnx_file": ONNX_FILE, "table_file": TABLE_FILE, "opset": opset,
        "precision": "int" if info is not None else "fp32",
        "weight_storage": weight_storage, "weights_checked": n_checked, "int4_weights": n_int4,
        "denoiser_class": type(graph.denoiser).__name__, "denoiser_component": adapter_for(graph.denoiser).component,
        "inputs": graph.input_names, "outputs": [OUTPUT_NAME],
        "sample_shape": list(graph.sample_shape),
        "sampler": asdict(sampler),
        "temporal": _temporal_entry(table, timesteps, sampler, info),
        "quantization": quant,
        "weights": _weight_summary(graph),
    }
