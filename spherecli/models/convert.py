"""`sphereface import`: published face models turned into spherecli model files.

- the original release's Caffe SphereFace (`.caffemodel`, with its deploy
  `.prototxt` for the input size), read with the protobuf package and the
  few messages of caffe.proto it needs: no Caffe install;
- clcarwin/sphereface_pytorch's `sphere20a` state dict (`.pth`);
- Xiaoccer/MobileFaceNet_Pytorch's checkpoint (`.ckpt`, `net_state_dict`).

PyTorch files are read with `weights_only=True`: nothing in a model file is
ever executed. Every converter states the input its network was trained
with, and checks every tensor's shape against the network it builds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spherecli.core.errors import UserError
from spherecli.core.formats import InputSpec, ModelFile, parse_input_spec, torch_load
from spherecli.models import build_from
from spherecli.models.sphereface import UNITS
from spherecli.core.outputs import Outputs
from spherecli.core.registry import IMPORT_FORMATS

HEAD_LAYER = "fc6"  # the original's A-Softmax layer, which the feature network leaves out


# --------------------------------------------------------------------------- SphereFace layer names

def sphereface_layer_names(units) -> dict[str, str]:
    """The original's layer names (conv2_3, relu2_3, fc5, ...), which clcarwin's port
    kept, mapped to our SphereNet's module names.

    Stage s opens with conv{s}_1; its residual unit u holds conv{s}_{2u+2} and
    conv{s}_{2u+3}, each followed by the PReLU relu{s}_{same number}.
    """
    names, index = {}, 0
    for s, n in enumerate(units, 1):
        names[f"conv{s}_1"], names[f"relu{s}_1"] = f"features.{index}", f"features.{index + 1}"
        for u in range(n):
            unit = f"features.{index + 2 + u}"
            for j, k in ((1, 2 * u + 2), (2, 2 * u + 3)):
                names[f"conv{s}_{k}"], names[f"relu{s}_{k}"] = f"{unit}.conv{j}", f"{unit}.prelu{j}"
        index += 2 + n
    names["fc5"] = "fc5"
    return names


def _sphereface_units(layer_names, source: Path) -> tuple[int, ...]:
    counts = tuple(sum(1 for n in layer_names if n.startswith(f"conv{s}_")) for s in range(1, 5))
    units = tuple((c - 1) // 2 for c in counts)
    if any(c % 2 == 0 for c in counts) or "fc5" not in layer_names:
        raise UserError(f"{source}: not a SphereFace network: found convolutions per stage {counts} "
                        "(expected 1 + 2 per residual unit) and " + ("fc5" if "fc5" in layer_names
                                                                     else "no fc5 layer"))
    return units


def _sphereface_file(units, blobs: dict[str, list[np.ndarray]], input_size, spec: InputSpec,
                     source: Path, fmt: str) -> ModelFile:
    """A SphereNet model file from {layer name: [weight, bias?]} in the original's naming."""
    depth = next((d for d, u in UNITS.items() if u == units), None)
    if depth is None:
        raise UserError(f"{source}: residual units per stage {units} match no SphereFace network "
                        f"({', '.join(f'{d}: {u}' for d, u in UNITS.items())})")
    names = sphereface_layer_names(units)
    unknown = sorted(set(blobs) - set(names))
    if unknown:
        raise UserError(f"{source}: layers that SphereFace-{depth} does not have: {', '.join(unknown[:8])}")
    residual_biases = [b[1] for n, b in blobs.items()
                       if n.startswith("conv") and not n.endswith("_1") and len(b) > 1]
    # The original fixes residual biases at zero (lr_mult 0); a port that trained them keeps them.
    residual_bias = any(np.any(b != 0) for b in residual_biases)
    weights = {}
    for name, arrays in blobs.items():
        prefix = names[name]
        weights[f"{prefix}.weight"] = arrays[0]
        if len(arrays) > 1 and (residual_bias or not (name.startswith("conv") and not name.endswith("_1"))):
            weights[f"{prefix}.bias"] = arrays[1]
    args = {"input_size": list(input_size), "feature_dim": int(blobs["fc5"][0].shape[0])}
    if residual_bias:
        args["residual_bias"] = True
    file = ModelFile(f"sphere{depth}", args, {}, spec, {"imported_from": str(source), "format": fmt})
    return _fill(file, weights, source)


def _fill(file: ModelFile, arrays: dict, source: Path) -> ModelFile:
    """Put the arrays into the network's state dict, checking every name and shape."""
    from spherecli.models import create_model

    state = create_model(file.arch, **file.model_args).state_dict()
    for key, value in arrays.items():
        if key not in state:
            raise UserError(f"{source}: {key} has no place in {file.arch}")
        value = torch.as_tensor(np.asarray(value, dtype=np.float32) if isinstance(value, np.ndarray)
                                else value)
        if value.numel() != state[key].numel() or (value.ndim > 1 and value.shape != state[key].shape):
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, {file.arch} "
                            f"({file.model_args}) needs {tuple(state[key].shape)}")
        state[key] = value.reshape(state[key].shape).to(state[key].dtype).clone()
    missing = [k for k in state if k not in arrays and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(f"{source}: no weights for {', '.join(missing[:6])}"
                        + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    file.weights = state
    return file


# --------------------------------------------------------------------------- Caffe

def caffe_messages():
    """caffe.NetParameter, from the fields of caffe.proto that hold names, shapes and
    weights. Fields not declared here (solver and layer settings) are skipped when
    parsing, as protobuf skips any unknown field."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError:
        raise UserError("reading Caffe models needs the protobuf package "
                        "(pip install 'spherecli[caffe]')") from None
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="spherecli/caffe_subset.proto", package="caffe",
                                               syntax="proto2")

    def message(name, *fields):
        m = proto.message_type.add(name=name)
        for fname, number, kind, repeated, type_name in fields:
            f = m.field.add(name=fname, number=number, type=kind,
                            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                f.type_name = f".caffe.{type_name}"
            if repeated and kind not in (F.TYPE_MESSAGE, F.TYPE_STRING):
                f.options.packed = True

    message("BlobShape", ("dim", 1, F.TYPE_INT64, True, None))
    message("BlobProto", ("num", 1, F.TYPE_INT32, False, None), ("channels", 2, F.TYPE_INT32, False, None),
            ("height", 3, F.TYPE_INT32, False, None), ("width", 4, F.TYPE_INT32, False, None),
            ("data", 5, F.TYPE_FLOAT, True, None), ("shape", 7, F.TYPE_MESSAGE, False, "BlobShape"),
            ("double_data", 8, F.TYPE_DOUBLE, True, None))
    message("InputParameter", ("shape", 1, F.TYPE_MESSAGE, True, "BlobShape"))
    message("LayerParameter", ("name", 1, F.TYPE_STRING, False, None),
            ("type", 2, F.TYPE_STRING, False, None),
            ("bottom", 3, F.TYPE_STRING, True, None), ("top", 4, F.TYPE_STRING, True, None),
            ("blobs", 7, F.TYPE_MESSAGE, True, "BlobProto"),
            ("input_param", 143, F.TYPE_MESSAGE, False, "InputParameter"))
    message("NetParameter", ("name", 1, F.TYPE_STRING, False, None),
            ("layers", 2, F.TYPE_BYTES, True, None),  # V1 layers: only noticed, to refuse them
            ("input", 3, F.TYPE_STRING, True, None), ("input_dim", 4, F.TYPE_INT32, True, None),
            ("input_shape", 8, F.TYPE_MESSAGE, True, "BlobShape"),
            ("layer", 100, F.TYPE_MESSAGE, True, "LayerParameter"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


def _blob_array(blob, where: str) -> np.ndarray:
    data = np.array(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float32)
    shape = (tuple(blob.shape.dim) if blob.HasField("shape")
             else tuple(v for v in (blob.num, blob.channels, blob.height, blob.width)))
    if int(np.prod(shape)) != data.size:
        raise UserError(f"{where}: a blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)


def _prototxt_input_size(path: Path, net_class) -> tuple[int, int]:
    from google.protobuf import text_format

    net = net_class()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), net, allow_unknown_field=True)
    except (OSError, text_format.ParseError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable Caffe prototxt ({e})") from None
    # Three ways Caffe has had of stating the input: input_dim, input_shape, an Input layer.
    shapes = [list(net.input_dim)] + [list(s.dim) for s in net.input_shape] + \
        [list(layer.input_param.shape[0].dim) for layer in net.layer
         if layer.type == "Input" and len(layer.input_param.shape)]
    dims = next((d for d in shapes if d), [])
    if len(dims) != 4:
        raise UserError(f"{path}: no 4-d input shape (input_dim, input_shape or an Input layer)")
    return int(dims[2]), int(dims[3])


def from_caffe(path: Path, prototxt: Path | None) -> ModelFile:
    net_class = caffe_messages()
    net = net_class()
    try:
        net.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UserError(f"{path}: not a Caffe model (protobuf could not parse it: {e})") from None
    if len(net.layers) and not len(net.layer):
        raise UserError(f"{path}: an old Caffe model (V1 layers); upgrade it with Caffe's "
                        "upgrade_net_proto_binary first")
    # fc6, the A-Softmax layer of a training net, is not part of the feature network.
    blobs = {layer.name: [_blob_array(b, f"{path}: layer {layer.name}") for b in layer.blobs]
             for layer in net.layer if len(layer.blobs) and layer.name != HEAD_LAYER}
    if not blobs:
        raise UserError(f"{path}: no layer with weights: not a trained Caffe model")
    input_size = _prototxt_input_size(prototxt, net_class) if prototxt else (112, 96)
    units = _sphereface_units(blobs, path)
    # The original's Matlab code feeds BGR (Caffe's order), scaled (x - 127.5) / 128.
    spec = InputSpec(size=input_size)
    return _sphereface_file(units, blobs, input_size, spec, path, "caffe")


# --------------------------------------------------------------------------- PyTorch ports

def _state_dict(obj, path: Path) -> dict:
    """The tensors of a saved PyTorch file: a state dict, or one under a usual key."""
    if isinstance(obj, dict):
        for key in ("net_state_dict", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)} \
        if isinstance(obj, dict) else {}
    if not tensors:
        raise UserError(f"{path}: holds no tensors, so no network to import")
    return tensors


def from_sphere20a(path: Path, tensors: dict) -> ModelFile:
    """clcarwin/sphereface_pytorch: the original's layer names as attributes; fc6 is the
    A-Softmax head, left out. Its lfw_eval.py feeds BGR crops scaled (x - 127.5) / 128."""
    blobs: dict[str, list] = {}
    for key, value in tensors.items():
        layer, _, kind = key.rpartition(".")
        if layer == HEAD_LAYER:
            continue
        if kind not in ("weight", "bias"):
            raise UserError(f"{path}: unexpected tensor {key} for a sphere20a state dict")
        blobs.setdefault(layer, [None, None])[0 if kind == "weight" else 1] = value.float().numpy()
    blobs = {k: [a for a in v if a is not None] for k, v in blobs.items()}
    units = _sphereface_units(blobs, path)
    return _sphereface_file(units, blobs, (112, 96), InputSpec(), path, "sphere20a")


def from_mobilefacenet(path: Path, tensors: dict) -> ModelFile:
    """Xiaoccer/MobileFaceNet_Pytorch: our module names are its names. Its evaluation
    feeds RGB crops (scipy's imread) of SphereFace's 112x96 alignment, (x - 127.5) / 128."""
    feature_dim = int(tensors["linear1.conv.weight"].shape[0]) if "linear1.conv.weight" in tensors else 128
    gdc = tensors.get("linear7.conv.weight")
    h, w = ((int(gdc.shape[2]) * 16, int(gdc.shape[3]) * 16) if gdc is not None else (112, 96))
    spec = InputSpec(size=(h, w), channels="rgb")
    file = ModelFile("mobilefacenet", {"input_size": [h, w], "feature_dim": feature_dim}, {}, spec,
                     {"imported_from": str(path), "format": "mobilefacenet"})
    return _fill(file, tensors, path)


def detect_format(path: Path) -> str:
    if path.suffix.lower() == ".caffemodel":
        return "caffe"
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path}: ONNX models need no import: pass it as `model` with `input_spec` "
                        "(or a sidecar MODEL.onnx.json)")
    return "torch"


def import_model(source: str | Path, output: str | Path, *, fmt: str | None = None,
                 prototxt: str | Path | None = None, input_spec: str | None = None,
                 overwrite: bool = False) -> dict:
    """Convert a published model into a spherecli model file; returns what was made.
    input_spec (a preset, JSON file or key=value pairs) overrides what the format implies.
    An existing output is replaced only with overwrite, and never when it is an input."""
    source = Path(source)
    if not source.is_file():
        raise UserError(f"{source}: no such file")
    with Outputs([source, prototxt], overwrite) as outputs:
        outputs.file(output, "model")
        return _import(source, output, fmt, prototxt, input_spec)


def _import(source: Path, output, fmt, prototxt, input_spec) -> dict:
    kind = fmt or detect_format(source)
    if kind == "caffe":
        file = from_caffe(source, Path(prototxt) if prototxt else None)
    else:
        tensors = _state_dict(torch_load(source), source)
        if kind == "torch":
            kind = ("mobilefacenet" if "linear7.conv.weight" in tensors
                    else "sphere20a" if "conv1_1.weight" in tensors else None)
            if kind is None:
                raise UserError(f"{source}: tensors of an unknown network ({', '.join(list(tensors)[:4])}, "
                                f"...); known: {', '.join(IMPORT_FORMATS)} (`format`)")
        if kind not in ("sphere20a", "mobilefacenet"):
            raise UserError(f"{source}: `format` {kind} is for .caffemodel files")
        file = (from_sphere20a if kind == "sphere20a" else from_mobilefacenet)(source, tensors)
    if input_spec is not None:
        file.input = parse_input_spec(input_spec)
    net = build_from(file, str(source))
    with torch.no_grad():
        probe = net(torch.zeros(1, 3, *file.input.size))
    if not torch.isfinite(probe).all():
        raise UserError(f"{source}: the imported network gives non-finite features")
    file.save(output)
    return {"output": str(output), "format": kind, "arch": file.arch, "model_args": file.model_args,
            "input": file.input.describe(), "feature_dim": int(probe.shape[1])}

