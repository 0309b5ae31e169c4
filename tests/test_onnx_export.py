"""ONNX export (tfmq.export) against the PyTorch runtime's reference backend.

Layer tests build runtime layers from known codes and check the exported QDQ operators compute
what the runtime computes (tight tolerance: the same inputs are quantized, only float summation
order differs). Whole-model tests use tiny RANDOM-weight UNets: their numbers mean nothing, and
with 8-bit activations a float-rounding difference that moves one value across a rounding
boundary cascades through the later quantizers (measured 0.3-2% relative RMS between ONNX
Runtime and PyTorch on these models, up to 5% for one call); a wrong scale, zero-point, layout or
offset gives O(100%).
The bundled trained model's sample PSNR is measured in benchmarks/onnx_psnr.py.
"""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_ddpm_pipeline, tiny_dit_pipeline, tiny_pixart_pipeline, tiny_sdxl_pipeline

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import tfmq  # noqa: E402
from tfmq.api import bundled_model_path  # noqa: E402
from tfmq.export import ExportError, export_onnx, load_onnx  # noqa: E402
from tfmq.export.onnx import check_codes  # noqa: E402
from tfmq.export.qdq import export_layer  # noqa: E402
from tfmq.export.runners import OrtRunner  # noqa: E402
from tfmq.export.table import load_table  # noqa: E402
from tfmq.quant.packing import pack  # noqa: E402
from tfmq.runtime import ActQuant, PackedWeight, QuantizedConv2d, QuantizedLinear  # noqa: E402
from tfmq.runtime.layers import GroupActQuant  # noqa: E402
from tfmq.models.adapter import call_denoiser, get_denoiser  # noqa: E402
from tfmq.sampling import SamplerConfig  # noqa: E402

STEPS = SamplerConfig(steps=4)
A8_TOL = (0.02, 0.1)     # relative RMS, whole random-weight models with quantized activations:
                         # median over the calibrated timesteps, and the worst one
FP_TOL = 1e-5            # relative RMS, graphs whose activations are not quantized


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


# ---- single layers: every weight form -------------------------------------------------------------
def packed_weight(shape, bits, symmetric=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.1
    flat = w.reshape(shape[0], -1)
    if symmetric:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        scale = flat.abs().amax(1) / qmax
        zero = torch.zeros(shape[0])
    else:
        qmin, qmax = 0, (1 << bits) - 1
        lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale)
    bshape = (-1,) + (1,) * (len(shape) - 1)
    codes = torch.clamp(torch.round(w / scale.reshape(bshape)) + zero.reshape(bshape), qmin, qmax)
    return PackedWeight(pack(codes.long() - qmin, bits), scale, zero, tuple(shape), bits, qmin)


def act_quant(bits=8, symmetric=False, scale=0.02, zero=None):
    zero = (0.0 if symmetric else float(1 << (bits - 1))) if zero is None else zero
    return ActQuant(torch.tensor([scale]), torch.tensor([zero]), bits, symmetric)


class Wrap(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def export_single(layer, x, path):
    import warnings
    module = Wrap(export_layer(layer, "layer")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)      # the TorchScript exporter's notice
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"])
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return module, model


LAYERS = {
    # name: (builder, expected weight form(s))
    "conv-w8a8-asym": (lambda: QuantizedConv2d(packed_weight((16, 8, 3, 3), 8), torch.randn(16), act_quant(),
                                               (1, 1), (1, 1), (1, 1), 1), ["int8+offset"]),
    "conv-w4a8": (lambda: QuantizedConv2d(packed_weight((16, 8, 3, 3), 4), torch.randn(16), act_quant(),
                                          (2, 2), (1, 1), (1, 1), 1), ["int8"]),
    "conv-w8a8-sym": (lambda: QuantizedConv2d(packed_weight((16, 8, 1, 1), 8, symmetric=True), None,
                                              act_quant(symmetric=True), (1, 1), (0, 0), (1, 1), 1), ["int8"]),
    "conv-w3a6-narrow": (lambda: QuantizedConv2d(packed_weight((16, 8, 3, 3), 3), torch.randn(16),
                                                 act_quant(bits=6, scale=0.05), (1, 1), (1, 1), (1, 1), 1), ["int8"]),
    "conv-w4-weight-only": (lambda: QuantizedConv2d(packed_weight((16, 8, 3, 3), 4), torch.randn(16), None,
                                                    (1, 1), (1, 1), (1, 1), 1), ["native"]),
    "conv-split-w8a8": (lambda: QuantizedConv2d(
        packed_weight((16, 8, 3, 3), 8), torch.randn(16),
        GroupActQuant([act_quant(scale=0.01), act_quant(scale=0.03, zero=100.0)], 3),
        (1, 1), (1, 1), (1, 1), 1), ["int8+offset", "int8+offset"]),
    "linear-w8a8-asym": (lambda: QuantizedLinear(packed_weight((24, 8), 8), torch.randn(24), act_quant()),
                         ["int8+offset"]),
    "linear-w4a8": (lambda: QuantizedLinear(packed_weight((24, 8), 4), None, act_quant()), ["int8"]),
    "linear-w8-weight-only": (lambda: QuantizedLinear(packed_weight((24, 8), 8), torch.randn(24), None),
                              ["native"]),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_export_computes_the_runtime_layer(name, tmp_path, one_thread):
    build, forms = LAYERS[name]
    torch.manual_seed(0)
    layer = build().eval()
    x = torch.randn(2, 8, 6, 6) if isinstance(layer, QuantizedConv2d) else torch.randn(2, 5, 8)
    module, model = export_single(layer, x, tmp_path / "layer.onnx")
    assert [w.form for w in module.layer.weights] == forms
    with torch.no_grad():
        want = layer(x).numpy()
        eager = module(x).numpy()
    got = OrtRunner(tmp_path / "layer.onnx", threads=1)({"x": x.numpy()})
    scale = np.abs(want).max()
    assert np.abs(eager - want).max() <= 1e-5 * scale
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max() / scale
    # the weights are integer initializers feeding DequantizeLinear, equal to the runtime's codes
    ops = [n.op_type for n in model.graph.node]
    assert "DequantizeLinear" in ops
    if layer.act is not None:
        assert "QuantizeLinear" in ops
    assert check_codes(model, module) == len(forms)
    inits = {i.name: i for i in model.graph.initializer}
    codes = inits["layer.weights.0.codes"]
    assert codes.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
    # no float copy of a quantized weight in the file
    numel = int(np.prod(layer.qweight.shape))
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
              and int(np.prod(i.dims)) >= numel // len(forms)]
    assert not floats, [f.name for f in floats]


def test_tampered_codes_are_caught(tmp_path):
    layer = QuantizedConv2d(packed_weight((16, 8, 3, 3), 4), None, act_quant(), (1, 1), (1, 1), (1, 1), 1)
    module, model = export_single(layer, torch.randn(1, 8, 6, 6), tmp_path / "l.onnx")
    init = next(i for i in model.graph.initializer if i.name == "layer.weights.0.codes")
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[3] += 1
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    with pytest.raises(ExportError, match="differs from the checkpoint's codes"):
        check_codes(model, module)
    arr.flat[3] -= 1
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    assert check_codes(model, module) == 1                                   # restored
    scale = next(i for i in model.graph.initializer if i.name == "layer.weights.0.scale")
    s_arr = onnx.numpy_helper.to_array(scale).copy()
    s_arr[0] = np.nextafter(s_arr[0], np.float32(1))
    scale.CopyFrom(onnx.numpy_helper.from_array(s_arr, scale.name))
    with pytest.raises(ExportError, match="differs from the checkpoint's scale"):
        check_codes(model, module)


def test_per_step_activation_sets_are_refused():
    from tfmq.runtime.steps import StepIndex
    steps = StepIndex([10, 5], {"name": "ddim", "steps": 2})
    aq = ActQuant(torch.tensor([0.1, 0.2]), torch.tensor([3.0, 4.0]), 8, False, steps)
    layer = QuantizedLinear(packed_weight((4, 4), 8), None, aq)
    with pytest.raises(ExportError, match="2 per-step parameter sets"):
        export_layer(layer, "x")


# ---- whole denoisers ------------------------------------------------------------------------
def naive(**kw):
    values = dict(wbits=8, abits=8, calib_size=2, sampler=STEPS, layer_policy="all")
    values.update(kw)
    return tfmq.QuantConfig.for_method("naive", **values)


def ort_vs_runtime(pipe, out, class_labels=None, text=None, batch=3, conditioning=None):
    """Relative RMS of ORT vs the runtime reference on the same inputs, per calibrated timestep.
    ``text``: a UNet's encoder_hidden_states; ``conditioning``: other named graph inputs. A graph
    that keeps the temporal block is fed the timestep instead of the table's features."""
    cfg = json.loads((out / "export.json").read_text())
    in_graph = cfg["temporal"].get("mode") == "graph"
    table = None if in_graph else load_table(out / cfg["table_file"], cfg["temporal"])
    run = OrtRunner(out / cfg["onnx_file"], threads=1)
    denoiser = get_denoiser(pipe)
    c = denoiser.config
    size = (c.sample_size, c.sample_size) if isinstance(c.sample_size, int) else tuple(c.sample_size)
    x = torch.randn((batch, c.in_channels, *size), generator=torch.Generator().manual_seed(1))
    errs = []
    for t in cfg["temporal"]["timesteps"]:
        row = {"sample": x, "timestep": torch.full((batch,), t)}
        if class_labels is not None:
            row["class_labels"] = class_labels
        cond = dict(conditioning or {})
        if text is not None:
            cond["encoder_hidden_states"] = text
        row.update(cond)
        with torch.no_grad():
            want = call_denoiser(denoiser, row).sample.numpy()
        feeds = {"sample": x.numpy()}
        if in_graph:
            feeds["timestep"] = np.full((batch,), t, dtype=np.int64)
        else:
            feats = table.features_for(torch.full((batch,), t), class_labels)
            feeds.update({f"temb_{i}": f.numpy() for i, f in enumerate(feats)})
        feeds.update({k: v.float().numpy() for k, v in cond.items()})
        errs.append(rel_rms(run(feeds), want))
    return errs, cfg


@pytest.mark.parametrize("kind", ["uncond", "class"])
def test_tiny_unet_export_round_trip(kind, tmp_path, one_thread):
    cls = 5 if kind == "class" else None
    pipe = tiny_ddpm_pipeline(cls)
    tfmq.quantize(pipe, naive(), progress=False)
    out = export_onnx(pipe, tmp_path / "onnx")
    onnx.checker.check_model(str(out / "denoiser.onnx"), full_check=True)
    tfmq.convert(pipe)                                       # the runtime reference backend
    labels = torch.tensor([0, 3, 4]) if cls else None        # 4: the null class of guidance
    errs, cfg = ort_vs_runtime(pipe, out, labels)
    assert np.median(errs) < A8_TOL[0] and max(errs) < A8_TOL[1], errs
    forms = cfg["weights"]["forms"]
    assert cfg["weights_checked"] == sum(forms.values()) > 0 and set(forms) <= {"int8", "int8+offset"}
    assert cfg["temporal"]["classes"] == (list(range(5)) if cls else None)
    assert cfg["inputs"][0] == "sample" and cfg["inputs"][1] == "temb_0"
    assert "timestep" not in cfg["inputs"] and "class_labels" not in cfg["inputs"]
    model = onnx.load(str(out / "denoiser.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= ops
    # the temporal block left the graph: no sinusoidal embedding, no timestep input
    assert "Sin" not in ops and "Cos" not in ops


@pytest.mark.parametrize("name", ["fmnist-ddpm", "fmnist-dit"])
def test_bundled_model_export_round_trip(name, tmp_path, one_thread):
    """The bundled trained models: the export checks out and ONNX Runtime computes what the
    runtime reference computes on the same inputs at every calibrated timestep (trained weights:
    a 1% relative RMS at most; sampling PSNR is in benchmarks/onnx_psnr.py)."""
    pipe = tfmq.load_pipeline(bundled_model_path(name))
    labels = torch.tensor([0, 7, 9]) if name == "fmnist-dit" else None
    tfmq.quantize(pipe, naive(layer_policy="tfmq-official", class_labels=None if labels is None else [0, 7, 9]),
                  progress=False)
    out = export_onnx(pipe, tmp_path / "onnx")
    onnx.checker.check_model(str(out / "denoiser.onnx"), full_check=True)
    tfmq.convert(pipe)
    errs, cfg = ort_vs_runtime(pipe, out, labels)
    assert max(errs) < 0.01, errs
    assert cfg["weights_checked"] > 0 and cfg["quantization"]["method"] == "naive"


@pytest.mark.parametrize("learned_sigma", [False, True])
def test_tiny_dit_export_round_trip(learned_sigma, tmp_path, one_thread):
    """A DiT (random weights): the adaLN-Zero embedders leave the graph, every block's modulation
    and the final shift / scale are graph inputs; ORT computes the runtime's output (both halves
    of a learned-variance output), and sampling through the export follows the reference."""
    pipe = tiny_dit_pipeline(learned_sigma=learned_sigma)
    tfmq.quantize(pipe, naive(class_labels=[0, 3]), progress=False)
    out = export_onnx(pipe, tmp_path / "onnx")
    onnx.checker.check_model(str(out / "denoiser.onnx"), full_check=True)
    tfmq.convert(pipe)
    labels = torch.tensor([0, 3, 5])                         # 5: the null class of guidance
    errs, cfg = ort_vs_runtime(pipe, out, labels)
    assert np.median(errs) < A8_TOL[0] and max(errs) < A8_TOL[1], errs
    assert cfg["denoiser_class"] == "DiTTransformer2DModel" and cfg["denoiser_component"] == "transformer"
    assert cfg["inputs"] == ["sample"] + [f"temb_{i}" for i in range(3)]    # 2 blocks + proj_out_1
    assert cfg["temporal"]["classes"] == list(range(6))
    ops = {n.op_type for n in onnx.load(str(out / "denoiser.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops and "Sin" not in ops and "Cos" not in ops
    exported = load_onnx(out)
    images = tfmq.generate(exported, STEPS, 3, 3, seed=2, class_labels=[0, 3, 4], progress=False,
                           denoiser=exported.onnx_denoiser)
    want = tfmq.generate(pipe, STEPS, 3, 3, seed=2, class_labels=[0, 3, 4], progress=False)
    assert images.shape == want.shape == (3, 8, 8, 1)                   # uint8 NHWC
    diff = np.abs(images.astype(np.int32) - want.astype(np.int32))
    print(f"DiT sampled through ONNX Runtime vs reference: mean |diff| {diff.mean():.2f} / 255, "
          f"images mean {want.mean():.1f} std {want.std():.1f}, {len(np.unique(want))} distinct values")
    assert diff.mean() < 4


def test_tiny_pixart_export_round_trip(tmp_path, one_thread):
    """PixArt (random weights): adaln_single leaves the graph (its modulation and embedded timestep
    are graph inputs), T5 embeddings and their padding mask are graph inputs; the learned-variance
    output is returned whole; sampling from prompts through the export follows the reference."""
    pipe = tiny_pixart_pipeline(tmp_path)
    tfmq.quantize(pipe, naive(prompts=["a b", "c"]), progress=False)
    out = export_onnx(pipe, tmp_path / "onnx")
    onnx.checker.check_model(str(out / "denoiser.onnx"), full_check=True)
    # diffusers' squeeze(1) of the token axis (an If in the traced graph) is folded: the axis is static
    assert "If" not in {n.op_type for n in onnx.load(str(out / "denoiser.onnx")).graph.node}
    tfmq.convert(pipe)
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    cond = {"encoder_hidden_states": torch.randn(3, 5, 16, generator=g), "encoder_attention_mask": mask}
    errs, cfg = ort_vs_runtime(pipe, out, conditioning=cond)
    assert np.median(errs) < A8_TOL[0] and max(errs) < A8_TOL[1], errs
    assert cfg["inputs"] == ["sample", "temb_0", "temb_1", "encoder_hidden_states", "encoder_attention_mask"]
    assert cfg["denoiser_class"] == "PixArtTransformer2DModel"
    exported = load_onnx(out)
    images = tfmq.generate(exported, STEPS, 2, 2, seed=1, prompts=["a b", "c"], progress=False,
                           denoiser=exported.onnx_denoiser)
    want = tfmq.generate(pipe, STEPS, 2, 2, seed=1, prompts=["a b", "c"], progress=False)
    assert images.shape == want.shape
    diff = np.abs(images.astype(np.int32) - want.astype(np.int32))
    assert diff.mean() < 4 and want.std() > 10, (diff.mean(), want.std())
    with pytest.raises(ValueError, match="missing encoder_attention_mask"):
        exported.onnx_denoiser(torch.zeros(1, 4, 8, 8), torch.tensor([1]),
                               encoder_hidden_states=torch.zeros(1, 5, 16))


@pytest.mark.parametrize("family", ["sdxl", "pixart-sizes"])
def test_temporal_block_in_the_graph(family, tmp_path, one_thread):
    """SDXL and PixArt-alpha 1024 (random weights): the time embedding also reads the pooled text
    and size ids / size conditions, so there is no finite feature table: the block stays in the
    graph with the timestep and those conditions as inputs (one set of activation parameters,
    FSC none); the sampler runs the export with any step count. A checkpoint whose block holds
    per-step (FSC tib) parameters is refused with the reason and what to use."""
    g = torch.Generator().manual_seed(3)
    if family == "sdxl":
        pipe = tiny_sdxl_pipeline(tmp_path)
        cond = {"encoder_hidden_states": torch.randn(2, 6, 32, generator=g), "text_embeds": torch.randn(2, 8, generator=g),
                "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16], [16, 16, 0, 0, 16, 16]])}
        added = ["text_embeds", "time_ids"]
    else:
        pipe = tiny_pixart_pipeline(tmp_path, additional_conditions=True)
        cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
                "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
                "resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
        added = ["resolution", "aspect_ratio"]
    tfmq.quantize(pipe, naive(prompts=["a b", "c"]), progress=False)
    out = export_onnx(pipe, tmp_path / "onnx")
    onnx.checker.check_model(str(out / "denoiser.onnx"), full_check=True)
    tfmq.convert(pipe)
    errs, cfg = ort_vs_runtime(pipe, out, conditioning=cond, batch=2)
    assert np.median(errs) < A8_TOL[0] and max(errs) < A8_TOL[1], errs
    assert cfg["temporal"]["mode"] == "graph" and not (out / cfg["table_file"]).exists()
    assert cfg["inputs"][:2] == ["sample", "timestep"] and cfg["inputs"][-2:] == added
    exported = load_onnx(out)
    images = tfmq.generate(exported, STEPS, 2, 2, seed=1, prompts=["a b", "c"], progress=False,
                           denoiser=exported.onnx_denoiser)
    want = tfmq.generate(pipe, STEPS, 2, 2, seed=1, prompts=["a b", "c"], progress=False)
    diff = np.abs(images.astype(np.int32) - want.astype(np.int32))
    assert diff.mean() < 4 and want.std() > 10, (diff.mean(), want.std())
    other = SamplerConfig(steps=3)              # no per-step parameters: any step count runs
    assert tfmq.generate(exported, other, 1, 1, seed=0, prompts=["c"], progress=False,
                         denoiser=exported.onnx_denoiser).shape[0] == 1
    per_step = tiny_sdxl_pipeline(tmp_path) if family == "sdxl" else \
        tiny_pixart_pipeline(tmp_path, additional_conditions=True)
    tfmq.quantize(per_step, tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, prompts=["a b"],
                                                        temporal="tiar", **FAST_TFMQ), progress=False)
    with pytest.raises(ExportError, match=r"inside the graph.*one per sampling step.*--fsc none"):
        export_onnx(per_step, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_weight_only_and_fp32_graphs_are_exact(tmp_path, one_thread):
    pipe = tiny_ddpm_pipeline()
    fp_out = export_onnx(pipe, tmp_path / "fp", sampler=STEPS)
    errs, cfg = ort_vs_runtime(pipe, fp_out)
    assert max(errs) < FP_TOL and cfg["precision"] == "fp32" and cfg["weights_checked"] == 0
    tfmq.quantize(pipe, naive(wbits=4, abits=32), progress=False)
    out = export_onnx(pipe, tmp_path / "w4")
    tfmq.convert(pipe)
    errs, cfg = ort_vs_runtime(pipe, out)
    assert max(errs) < FP_TOL and set(cfg["weights"]["forms"]) == {"native"}
    # int8 storage: one byte a code, no float copy of a quantized weight. (The whole file is 42% of
    # the FP32 one here: per-channel scales, biases and graph nodes weigh a lot next to 16-channel
    # convs; the bundled model's and SD's ratios are in benchmarks/bench_cpu.py's results.)
    model = onnx.load(str(out / "denoiser.onnx"))
    code_bytes = sum(len(i.raw_data) for i in model.graph.initializer if i.name.endswith(".codes"))
    layers = tfmq.runtime.runtime_layers(pipe.unet)
    assert code_bytes == sum(int(np.prod(layers[name].qweight.shape)) for name in cfg["weights"]["layers"])
    fp_bytes = json.loads((fp_out / "export.json").read_text())["files"]["onnx_bytes"]
    assert cfg["files"]["onnx_bytes"] < 0.5 * fp_bytes


def test_int4_storage(tmp_path, one_thread):
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, naive(wbits=4, abits=8), progress=False)
    out8 = export_onnx(pipe, tmp_path / "i8")
    out4 = export_onnx(pipe, tmp_path / "i4", weight_storage="int4")
    tfmq.convert(pipe)
    cfg4 = json.loads((out4 / "export.json").read_text())
    assert cfg4["opset"] == 21 and cfg4["int4_weights"] == cfg4["weights_checked"] > 0
    model = onnx.load(str(out4 / "denoiser.onnx"))
    kinds = {i.data_type for i in model.graph.initializer if i.name.endswith(".codes")}
    assert kinds == {onnx.TensorProto.UINT4}
    model8 = onnx.load(str(out8 / "denoiser.onnx"))
    codes8 = {i.name: len(i.raw_data) for i in model8.graph.initializer if i.name.endswith(".codes")}
    codes4 = {i.name: len(i.raw_data) for i in model.graph.initializer if i.name.endswith(".codes")}
    assert codes4.keys() == codes8.keys()
    assert all(codes4[k] == (codes8[k] + 1) // 2 for k in codes8)       # half a byte a code
    b8 = json.loads((out8 / "export.json").read_text())["files"]["onnx_bytes"]
    assert cfg4["files"]["onnx_bytes"] < b8 - sum(codes8.values()) // 3
    errs, _ = ort_vs_runtime(pipe, out4)
    assert np.median(errs) < A8_TOL[0] and max(errs) < A8_TOL[1], errs


def test_tiny_sd_export_round_trip(tiny_sd, tmp_path, one_thread):
    tfmq.quantize(tiny_sd, naive(prompts=["a b", "c"]), progress=False)
    out = export_onnx(tiny_sd, tmp_path / "sd")
    tfmq.convert(tiny_sd)
    text = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    errs, cfg = ort_vs_runtime(tiny_sd, out, text=text)
    assert np.median(errs) < A8_TOL[0] and max(errs) < A8_TOL[1], errs
    assert cfg["inputs"][-1] == "encoder_hidden_states"
    # the export folder is a pipeline: text encoder, tokenizer, VAE, scheduler copied
    for comp in ("text_encoder", "tokenizer", "vae", "scheduler"):
        assert (out / comp).is_dir()
    pipe = load_onnx(out)
    images = tfmq.generate(pipe, STEPS, 2, 2, seed=1, prompts=["a b"], progress=False, denoiser=pipe.onnx_denoiser)
    want = tfmq.generate(tiny_sd, STEPS, 2, 2, seed=1, prompts=["a b"], progress=False)
    assert images.shape == want.shape


# ---- per-step parameters ----------------------------------------------------------------------
FAST_TFMQ = dict(recon_iters=0, act_learn_iters=0, tiar_iters=0, calib_size=2, sampler=STEPS, layer_policy="all")


def test_fsc_all_is_refused_before_any_work(tmp_path, one_thread):
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, fsc="all", **FAST_TFMQ), progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    for source in (pipe, ckpt):
        with pytest.raises(ExportError, match=r"--fsc all.*one parameter set per sampling step \(4 sets\).*--fsc tib"):
            export_onnx(source, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.tfmq-partial").exists()


@pytest.mark.parametrize("temporal", ["tiar", "cache"])
def test_per_step_temporal_block_is_a_table(temporal, tmp_path, one_thread):
    """fsc tib (per-step temporal block) and the temporal cache: the table holds per-step features
    and the sampler feeds them; sampling with ORT follows the runtime."""
    pipe = tiny_ddpm_pipeline(5)
    config = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, fsc="tib", temporal=temporal, **FAST_TFMQ)
    tfmq.quantize(pipe, config, progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    out = export_onnx(ckpt, tmp_path / "onnx")
    cfg = json.loads((out / "export.json").read_text())
    assert cfg["quantization"]["fsc"] == "tib" and cfg["quantization"]["temporal"] == temporal
    rt = tfmq.load(ckpt)
    table = load_table(out / cfg["table_file"], cfg["temporal"])
    if temporal == "cache":       # the checkpoint's table, as stored
        cache = rt.unet.tfmq_temporal_cache
        for i in range(len(cache.dims)):
            assert torch.equal(table.feature_table(i), cache.feature_table(i).float())
    else:                         # computed by the runtime's per-step quantized temporal block
        from tfmq.models.temporal import temporal_features
        steps = rt.unet.tfmq_steps
        for i, t in enumerate(cfg["temporal"]["timesteps"]):
            steps.set(i)
            feats = temporal_features(rt.unet, torch.tensor([t, t]), torch.tensor([1, 4]))
            for j, f in enumerate(feats):
                assert torch.allclose(table.features_for(torch.tensor([t, t]), torch.tensor([1, 4]))[j], f,
                                      rtol=1e-5, atol=1e-6)
    labels = [1, 2]
    want = tfmq.generate(rt, config.sampler, 2, 2, seed=4, class_labels=labels, progress=False)
    opipe = load_onnx(out)
    got = tfmq.generate(opipe, config.sampler, 2, 2, seed=4, class_labels=labels, progress=False,
                        denoiser=opipe.onnx_denoiser)
    mse = ((got.astype(float) - want.astype(float)) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 25
    # the exported pipeline's own denoiser calls go to the graph; its unet has no weights
    assert (tfmq.generate(opipe, config.sampler, 2, 2, seed=4, class_labels=labels, progress=False) == got).all()
    with pytest.raises(RuntimeError, match="denoiser=pipe.onnx_denoiser"):
        opipe.unet(torch.zeros(1, 3, 16, 16), 0)
    # the table holds the calibrated timesteps only: another step count is refused up front
    from tfmq.runtime import CalibrationMismatchError
    with pytest.raises(CalibrationMismatchError, match="calibrated for ddim with 4 steps"):
        tfmq.generate(opipe, SamplerConfig(steps=5), 1, 1, class_labels=labels, progress=False,
                      denoiser=opipe.onnx_denoiser)
    with pytest.raises(ExportError, match="only be exported for that sampler"):
        export_onnx(ckpt, tmp_path / "other", sampler=SamplerConfig(steps=8))


def test_openvino_runs_the_export(tmp_path, one_thread):
    pytest.importorskip("openvino")
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, naive(wbits=4, abits=8), progress=False)
    out = export_onnx(pipe, tmp_path / "onnx")
    tfmq.convert(pipe)
    want = tfmq.generate(pipe, STEPS, 3, 3, seed=2, progress=False)
    results = {}
    for backend in ("onnxruntime", "openvino"):
        opipe = load_onnx(out, backend, threads=1)
        results[backend] = tfmq.generate(opipe, STEPS, 3, 3, seed=2, progress=False, denoiser=opipe.onnx_denoiser)
    for backend, got in results.items():
        mse = ((got.astype(float) - want.astype(float)) ** 2).mean()
        assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 25, backend


def test_export_refuses_bad_input(tmp_path, one_thread):
    pipe = tiny_ddpm_pipeline()
    with pytest.raises(ValueError, match="give the sampler"):
        export_onnx(pipe, tmp_path / "a")                    # FP model: which timesteps?
    with pytest.raises(ValueError, match="weight_storage"):
        export_onnx(pipe, tmp_path / "a", weight_storage="int2")
    with pytest.raises(FileNotFoundError, match="neither a tfmq checkpoint"):
        export_onnx(tmp_path, tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        export_onnx(pipe, tmp_path / "full", sampler=STEPS)
    assert (tmp_path / "full" / "x").read_text() == "keep"


# ---- command line ---------------------------------------------------------------------------
def test_cli_quantize_export_sample(tiny_pipe_dir, tmp_path, capsys, one_thread):
    from tfmq.cli import main
    q, e = tmp_path / "q", tmp_path / "e"
    assert main(["quantize", str(tiny_pipe_dir), "--method", "naive", "--wbits", "8", "--abits", "8", "--steps", "3",
                 "--calib-size", "2", "--layer-policy", "all", "--out", str(q)]) == 0
    capsys.readouterr()
    assert main(["export", str(q), "--format", "onnx", "--out", str(e)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights_checked"] > 0 and report["sampler"]["steps"] == 3 and report["opset"] == 17
    assert (e / "denoiser.onnx").exists() and (e / "temporal_features.safetensors").exists()

    def sample(model, name, *flags):
        assert main(["sample", str(model), "--num-images", "2", "--seed", "3", "--out", str(tmp_path / name),
                     *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        return out, np.load(tmp_path / name / "samples.npz")["arr_0"]

    info, from_export = sample(e, "s_export")                        # an export folder: onnxruntime
    assert info["backend"] == "onnxruntime" and info["sampler"]["steps"] == 3
    _, direct = sample(q, "s_direct", "--backend", "onnxruntime", "--threads", "1")   # temporary export
    assert np.array_equal(from_export, direct)
    _, ref = sample(q, "s_ref", "--backend", "reference")
    mse = ((from_export.astype(float) - ref.astype(float)) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 25
    if __import__("importlib").util.find_spec("openvino") is not None:
        info, ov = sample(e, "s_ov", "--backend", "openvino")
        assert info["backend"] == "openvino" and ov.shape == ref.shape

    # flags that do not apply are refused before any work: usage errors exit with 2
    for argv, message in (
            (["sample", str(e), "--backend", "reference", "--out", str(tmp_path / "x1")],
             "ONNX export: sample it with --backend onnxruntime"),
            (["sample", str(tiny_pipe_dir), "--backend", "onnxruntime", "--out", str(tmp_path / "x2")],
             "not to a full-precision pipeline"),
            (["sample", str(q), "--threads", "2", "--out", str(tmp_path / "x3")], "--threads applies"),
            (["export", str(q), "--out", str(e)], "not empty")):
        capsys.readouterr()
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x2").exists()


def test_cli_export_refuses_fsc_all(tmp_path, capsys, one_thread):
    from tfmq.cli import main
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, fsc="all", **FAST_TFMQ), progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "--fsc all" in err and "--fsc tib" in err and not (tmp_path / "e").exists()
