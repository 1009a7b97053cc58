"""Face features: one way to run any network (ours, imported, or ONNX) on aligned crops.

Crops travel as uint8 (N, 3, H, W) in BGR order, as OpenCV decodes them
and `align` writes them; `prepare` turns them into what the network's
input spec asks for (channel order, scaling) on the network's device.
`embed` adds the mirror image's feature as the protocol asks, and `unit`
centres and normalises features for cosine scoring. evaluate, verify,
identify, embed, afs and export's check all go through here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from spherecli.core.errors import UserError, excerpt
from spherecli.core.data import FaceList, worker_errors
from spherecli.core.devices import resolve_device
from spherecli.core.formats import InputSpec, onnx_sidecar, parse_input_spec, read_input_spec
from spherecli.models import autocast_dtype, load_model


def prepare(batch: torch.Tensor, spec: InputSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 BGR (N, 3, H, W) -> float network input, on the device."""
    if tuple(batch.shape[-2:]) != spec.size:
        h, w = spec.size
        raise UserError(f"the images are {batch.shape[-2]}x{batch.shape[-1]}, not the {h}x{w} aligned face "
                        f"crops the model takes: make them with `sphereface detect` and `sphereface align "
                        f"--reference {spec.reference} --size {h}x{w}`")
    x = batch.to(device, non_blocking=True)
    if spec.channels == "rgb":
        x = x.flip(1)
    return (x.float() - spec.mean) / spec.std


class TorchNetwork:
    """A PyTorch feature network on a device, optionally under autocast."""

    def __init__(self, module: torch.nn.Module, spec: InputSpec, name: str, *, device: str = "cpu",
                 amp: str = "none"):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval().to(memory_format=torch.channels_last)
        self.dtype = autocast_dtype(amp, self.device)
        self.spec, self.name, self.feature_dim = spec, name, module.feature_dim

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
            return self.module(x).float()


def to_onnx(module: torch.nn.Module, spec: InputSpec, opset: int = 17) -> bytes:
    """The network as an ONNX graph: float (N, 3, H, W) "image" in, (N, D) "feature" out."""
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its own deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, *spec.size),), buffer, input_names=["image"],
                          output_names=["feature"], opset_version=opset, dynamo=False,
                          dynamic_axes={"image": {0: "batch"}, "feature": {0: "batch"}})
    return buffer.getvalue()


class OnnxNetwork:
    """An ONNX face network run by onnxruntime, from a file or the bytes of one."""

    def __init__(self, model: str | Path | bytes, spec: InputSpec, *, device: str = "cpu", threads: int = 0,
                 name: str | None = None):
        path = name or str(model)
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"{path}: ONNX models need onnxruntime (pip install 'spherecli[onnx]')") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        providers = (["CUDAExecutionProvider"] if str(device).startswith("cuda") else []) + \
            ["CPUExecutionProvider"]
        try:
            source = model if isinstance(model, bytes) else str(model)
            self.session = onnxruntime.InferenceSession(source, options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"{path}: not a readable ONNX model ({excerpt(e, 200)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise UserError(f"{path}: expected one (N, 3, H, W) image input, found "
                            f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        graph_hw = [d if isinstance(d, int) else None for d in inputs[0].shape[2:]]
        if None not in graph_hw and tuple(graph_hw) != spec.size:
            raise UserError(f"{path}: the graph takes {graph_hw[0]}x{graph_hw[1]} images, the input "
                            f"spec says {spec.size[0]}x{spec.size[1]}")
        width = outputs[0].shape[-1]
        self.feature_dim = width if isinstance(width, int) else None
        self.spec, self.name, self.device = spec, path, torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.output_name], {self.input_name: x.cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(out.reshape(len(out), -1)).float()


def load_network(path: str | Path, *, device: str = "cpu", amp: str = "none", arch: str | None = None,
                 input_spec: str | None = None, runtime: str = "torch", threads: int = 0):
    """A model file, checkpoint or ONNX model, ready to embed crops.

    An ONNX model's input spec comes from input_spec (a preset, a JSON file or
    key=value pairs) or its sidecar MODEL.onnx.json; a model file states its own.
    runtime "onnxruntime" runs a model file through onnxruntime; "auto" does so on
    the CPU in fp32 for the networks measured faster there (`cpu_runtime`), whose
    features it leaves as they are (docs/benchmarks.md). threads: onnxruntime's threads
    (0: its default, every core).
    """
    path = Path(path)
    device = resolve_device(device)
    if path.suffix.lower() == ".onnx":
        if input_spec is not None:
            spec = parse_input_spec(input_spec)
        elif onnx_sidecar(path).is_file():
            spec = read_input_spec(onnx_sidecar(path))
        else:
            raise UserError(f"{path}: an ONNX model needs its input spec: `input_spec` insightface "
                            f"(112x112 RGB, ArcFace points, (x - 127.5) / 127.5), `input_spec` "
                            f"sphereface, key=value pairs, or a sidecar {onnx_sidecar(path).name}")
        return OnnxNetwork(path, spec, device=device, threads=threads)
    if input_spec is not None:
        raise UserError("`input_spec` is for ONNX models; a spherecli model file states its own")
    module, file = load_model(path, arch)
    if runtime == "auto":
        faster = getattr(module, "cpu_runtime", "torch") == "onnxruntime"
        fp32_cpu = device == "cpu" and amp == "none"
        runtime = "onnxruntime" if faster and fp32_cpu and _has_onnxruntime() else "torch"
    if runtime == "onnxruntime":
        return OnnxNetwork(to_onnx(module, file.input), file.input, device=device, threads=threads,
                           name=str(path))
    return TorchNetwork(module, file.input, str(path), device=device, amp=amp)


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def embed(net, batch: torch.Tensor, flip: str = "concat") -> np.ndarray:
    """Features of a uint8 BGR batch: f(x) ++ f(mirror x), f(x) + f(mirror x), or f(x)."""
    x = prepare(batch, net.spec, net.device)
    f = net(x)
    if flip != "none":
        g = net(x.flip(-1))
        f = torch.cat([f, g], 1) if flip == "concat" else f + g
    return f.cpu().numpy()


def feature_width(net, flip: str) -> int:
    return net.feature_dim * (2 if flip == "concat" else 1)


def extract(net, paths: list[str], *, flip: str = "concat", batch_size: int = 128, workers: int = 2,
            progress: bool = True, desc: str = "features") -> np.ndarray:
    """Features of aligned face images, read by DataLoader workers."""
    loader = DataLoader(FaceList([(p, 0) for p in paths], net.spec.size), batch_size=batch_size,
                        sampler=[(i, False) for i in range(len(paths))], num_workers=workers)
    out = [embed(net, x, flip) for x, _ in tqdm(worker_errors(loader), total=len(loader), desc=desc,
                                                  unit="batch", disable=not progress, dynamic_ncols=True)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, feature_width(net, flip)))


def unit(features: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Features ready for cosine scoring: the mean subtracted (when given), then unit length."""
    f = np.asarray(features, dtype=np.float64)
    if mean is not None:
        f = f - mean
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
