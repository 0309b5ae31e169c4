"""Running an export folder: ONNX Runtime or OpenVINO behind tfmq's sampler loop.

:func:`load_onnx` gives the pipeline of an export folder (its scheduler, text encoder, VAE...)
whose ``onnx_denoiser`` (an :class:`OnnxDenoiser`) serves the denoiser calls of
:func:`tfmq.sampling.denoise` / :func:`tfmq.generate`: for each
call it looks the temporal features of the call's timesteps (and class labels) up in the
feature table and runs the graph. The pipeline's denoiser component is the architecture without weights
(its config tells the sampler the shapes and the conditioning).

Both runtimes are configured to compute what the graph says, in float32 outside the int8
operators: ONNX Runtime's int8 fusion of weight-only (float-input) matmuls is kept at float32
accuracy (``session.qdq_matmulnbits_accuracy_level`` 1), OpenVINO runs with
``INFERENCE_PRECISION_HINT=f32`` (it would pick bf16 on CPUs that have it) and without dynamic
activation quantization of weight-compressed matmuls (``DYNAMIC_QUANTIZATION_GROUP_SIZE=0``).
Both flush denormal floats to zero (values below 1.2e-38; random-weight models produce many, which
run tens of times slower otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..runtime.backends import BackendUnavailable
from .onnx import EXPORT_CONFIG, FORMAT, FORMAT_VERSION
from .table import load_table

RUNNERS = ("onnxruntime", "openvino")


def is_export_dir(path) -> bool:
    """Whether ``path`` is an export folder written by :func:`tfmq.export.export_onnx`."""
    return path is not None and (Path(path) / EXPORT_CONFIG).is_file()


def read_export_config(export_dir) -> dict:
    """The export folder's ``export.json``, format checked."""
    path = Path(export_dir) / EXPORT_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{export_dir} is not a tfmq ONNX export (no {EXPORT_CONFIG})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is corrupt: {exc}") from exc
    if cfg.get("format") != FORMAT or cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {cfg.get('format')!r} version {cfg.get('format_version')!r}; "
                         f"this tfmq reads {FORMAT} {FORMAT_VERSION}")
    return cfg


def _default_threads() -> int:
    return max(1, torch.get_num_threads())


class OrtRunner:
    """An ONNX Runtime CPU session of the graph."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("the onnxruntime backend needs the onnxruntime package: "
                                     "pip install 'tfmq[deploy]'") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or _default_threads()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
        self.threads = so.intra_op_num_threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]


class OpenVinoRunner:
    """An OpenVINO CPU compiled model of the graph, compiled once per input shape set.

    Each shape set gets a copy of the ONNX graph whose inputs have those static shapes (the
    weights stay in the export's file or are linked to it), read and compiled as is: compiling the
    dynamic graph runs 15-25% slower here, and ``Model.reshape`` of it keeps OpenVINO (2026.4)
    from running the QDQ convolutions / matmuls in int8 (all f32)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("the openvino backend needs the openvino package: "
                                     "pip install 'tfmq[deploy]'") from None
        self.core = ov.Core()
        self.path = Path(path)
        self.threads = threads or _default_threads()
        self.config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
                       "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                       "CPU_DENORMALS_OPTIMIZATION": True}
        self.compiled: dict = {}

    def _static_copy(self, shapes: dict[str, tuple[int, ...]], folder: Path) -> Path:
        """The graph with static input shapes, written in ``folder``; external weights (graphs over
        2 GB) are hard-linked beside it (OpenVINO refuses data files outside the graph's folder,
        symbolic links included), or, across file systems, the copy goes beside the export's
        graph under a temporary name."""
        import os

        import onnx
        model = onnx.load(str(self.path), load_external_data=False)
        for value in list(model.graph.input) + list(model.graph.output):
            dims = value.type.tensor_type.shape.dim
            want = shapes.get(value.name)
            for k, d in enumerate(dims):
                if d.dim_param:
                    size = want[k] if want is not None else shapes["sample"][0]      # outputs: the batch
                    d.ClearField("dim_param")
                    d.dim_value = int(size)
        out = folder / self.path.name
        for data in self.path.parent.glob(self.path.name + ".data"):     # external weights
            try:
                os.link(data.resolve(), folder / data.name)
            except OSError:                                               # another file system
                out = self.path.parent / f".{self.path.stem}.static-{os.getpid()}-{id(shapes)}.onnx"
        onnx.save(model, str(out))
        return out

    def compile(self, shapes: dict[str, tuple[int, ...]]):
        import tempfile
        key = tuple(sorted(shapes.items()))
        if key not in self.compiled:
            with tempfile.TemporaryDirectory(prefix="tfmq-ov-") as tmp:
                static = self._static_copy(shapes, Path(tmp))
                try:
                    self.compiled[key] = self.core.compile_model(self.core.read_model(str(static)), "CPU",
                                                                 self.config)
                finally:
                    if static.parent != Path(tmp):
                        static.unlink(missing_ok=True)
        return self.compiled[key]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        compiled = self.compile({k: tuple(v.shape) for k, v in feeds.items()})
        return compiled(feeds)[0]


def make_runner(name: str, path: Path, threads: int | None = None):
    """The runner called ``name`` (``onnxruntime`` / ``openvino``) of the graph at ``path``."""
    if name == "onnxruntime":
        return OrtRunner(path, threads)
    if name == "openvino":
        return OpenVinoRunner(path, threads)
    raise ValueError(f"unknown ONNX runtime {name!r}; choose from {', '.join(RUNNERS)}")


class _Output:
    def __init__(self, sample: torch.Tensor):
        self.sample = sample


class OnnxDenoiser(nn.Module):
    """A denoiser call served by an exported graph: ``forward(sample, timestep, class_labels=None,
    **conditioning)`` (the graph's text inputs by name, e.g. ``encoder_hidden_states``) returns an
    object with ``.sample`` (float32, CPU).

    ``tfmq_info`` names the table's sampler and timesteps, so the sampler loop refuses another
    sampler or step count before the first step (the table holds no other timesteps). A graph that
    keeps the temporal block (no table) is fed the timestep and runs with any sampler."""

    def __init__(self, runner, table, config, export_cfg: dict):
        super().__init__()
        self.runner = runner
        self.table = table
        self.config = config
        self.export_config = export_cfg
        self.inputs = list(export_cfg["inputs"])
        # the conditioning inputs after the sample and the temporal features / timestep (text, a
        # text mask; with the temporal block in the graph its added conditions)
        self.conditioning = [n for n in self.inputs if n not in ("sample", "timestep") and not n.startswith("temb_")]
        # what the sampler reads the device and dtype from: float32 on the CPU
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.tfmq_info = {"sampler": export_cfg["sampler"], "timesteps": export_cfg["temporal"]["timesteps"],
                          "temporal": {"mode": "cache" if table is not None else "graph"},
                          "export": {"runner": runner.name, "quantization": export_cfg["quantization"]}}

    @torch.no_grad()
    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, added_cond_kwargs: dict | None = None, **conditioning):
        cond = {k: v for k, v in {**conditioning, **(added_cond_kwargs or {})}.items() if v is not None}
        given = set(cond)
        if given != set(self.conditioning):
            missing, extra = set(self.conditioning) - given, given - set(self.conditioning)
            raise ValueError("this graph's conditioning inputs are "
                             f"{', '.join(self.conditioning) or 'none'}"
                             + (f"; missing {', '.join(sorted(missing))}" if missing else "")
                             + (f"; it takes no {', '.join(sorted(extra))}" if extra else ""))
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        batch = sample.shape[0]
        feeds = {"sample": sample.detach().float().cpu().contiguous().numpy()}
        if self.table is None:                      # the temporal block is in the graph
            feeds["timestep"] = t.reshape(-1).long().cpu().expand(batch).contiguous().numpy()
        else:
            for i, f in enumerate(self.table.features_for(t, class_labels)):
                f = f.float()
                feeds[f"temb_{i}"] = (f.expand(batch, -1) if f.shape[0] == 1 else f).contiguous().numpy()
        for name in self.conditioning:
            feeds[name] = cond[name].detach().float().cpu().contiguous().numpy()
        out = torch.from_numpy(np.asarray(self.runner(feeds)))
        return _Output(out) if return_dict else (out,)


def _weightless_call(module, args):
    raise RuntimeError("this pipeline's denoiser is an exported graph: its denoiser component has no weights; sample with "
                       "tfmq.generate(pipe, ...) (or pass denoiser=pipe.onnx_denoiser)")


def load_onnx(export_dir, backend: str = "onnxruntime", threads: int | None = None):
    """The pipeline of an export folder, its denoiser calls served by ``backend``
    (``onnxruntime`` or ``openvino``) with ``threads`` intra-op threads (default: torch's).

    Returns the diffusers pipeline with ``pipe.onnx_denoiser``, which :func:`tfmq.generate` /
    :func:`tfmq.sampling.denoise` use for the denoiser calls; the pipeline's denoiser component has no weights."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    from ..models.adapter import absent_components
    export_dir = Path(export_dir)
    cfg = read_export_config(export_dir)
    if backend not in RUNNERS:
        raise ValueError(f"unknown ONNX runtime {backend!r}; choose from {', '.join(RUNNERS)}")
    runner = make_runner(backend, export_dir / cfg["onnx_file"], threads)
    table = None if cfg["temporal"].get("mode") == "graph" else load_table(export_dir / cfg["table_file"],
                                                                          cfg["temporal"])
    cls = getattr(diffusers, cfg["denoiser_class"])
    component = cfg["denoiser_component"]
    with init_empty_weights():
        arch = cls.from_config(cls.load_config(str(export_dir / component))).eval()
    denoiser = OnnxDenoiser(runner, table, arch.config, cfg)
    arch.tfmq_info = denoiser.tfmq_info
    arch.register_forward_pre_hook(_weightless_call)
    pipe = DiffusionPipeline.from_pretrained(str(export_dir), **absent_components(export_dir), **{component: arch})
    pipe.set_progress_bar_config(disable=True)
    pipe.onnx_denoiser = denoiser
    return pipe
