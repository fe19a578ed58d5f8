"""Starting a model from weights: a Keras weights file, or another model's layers.

Keras writes weights in two formats, and users download both:

  * the legacy HDF5 `.h5` (Keras Applications' files, e.g.
    `resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`): one group per layer,
    named after the layer;
  * Keras 3's `.weights.h5`: `layers/<name>/vars/<i>`, where `<name>` is not the
    layer's name but its class in snake case, numbered in model order
    (`batch_normalization`, `batch_normalization_1`, ...).

Both are read here into `{layer key: [arrays]}` and matched against the model's
layers by that key; every layer but `skip` (the classifier head) must be in the
file, with the same shapes, and the file must hold nothing else. A layer's
arrays are in `layer.weights` order in both formats.
"""

import re

import h5py
import keras
import numpy as np

from models.batch_norm import FusedBatchNormalization
from models.layers import all_layers

HEAD = "logits"  # the classifier head every model ends in: never loaded from a file


class WeightsMismatch(ValueError):
    """A weights file or source model that does not fit the model; one line."""


def load_weights_file(model, path, skip=(HEAD,)):
    """Sets every layer of `model` but `skip` from the Keras weights file `path`.

    Raises:
      WeightsMismatch: the file is not a Keras weights file, or does not fit
        (a layer missing or unexpected, or a shape that differs).
    """
    try:
        with h5py.File(path, "r") as f:
            keras3 = "layers" in f and "layer_names" not in f.attrs
            arrays = _read_keras3(f) if keras3 else _read_legacy(f)
    except OSError as e:
        raise WeightsMismatch(f"cannot read {path} as a Keras weights file ({e})") from None
    layers = _keras3_keys(model) if keras3 else {layer.name: layer for layer in all_layers(model)}
    # The head is new whatever the file holds: a file with one fits as well.
    skipped = {key for key, layer in layers.items() if layer.name in skip}
    targets = {k: layer for k, layer in layers.items() if layer.weights and k not in skipped}
    _assign(targets, {k: v for k, v in arrays.items() if k not in skipped}, what=path)


def copy_layer_weights(source, target, skip=(HEAD,)):
    """Copies every weighted layer of `target` but `skip` from `source`'s layer of that name."""
    arrays = {layer.name: layer.get_weights() for layer in all_layers(source) if layer.weights}
    arrays = {name: value for name, value in arrays.items() if name not in skip}
    targets = {
        layer.name: layer
        for layer in all_layers(target)
        if layer.weights and layer.name not in skip
    }
    _assign(targets, arrays, what=f"model {source.name!r}")


def _read_legacy(f):
    """{layer name: [arrays]} of a legacy `.h5` (`save_weights_to_hdf5_group`'s layout)."""
    if "layer_names" not in f.attrs:
        raise OSError("no layer_names: not written by Keras' save_weights")
    result = {}
    for name in _strings(f.attrs["layer_names"]):
        group = f[name]
        names = _strings(group.attrs.get("weight_names", []))
        if names:
            result[name] = [np.asarray(group[n]) for n in names]
    return result


def _read_keras3(f):
    """{layer key: [arrays]} of a Keras 3 `.weights.h5` (`layers/<key>/vars/<i>`)."""
    result = {}
    for key, group in f["layers"].items():
        variables = group.get("vars")
        if variables is not None and len(variables):
            result[key] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
    return result


def _keras3_keys(model):
    """{key: layer}, with the keys Keras 3's `save_weights` gives `model.layers`."""
    used, keys = {}, {}
    for layer in model.layers:
        cls = type(layer)
        if cls is FusedBatchNormalization:  # ours changes only `call`: Keras' name
            cls = keras.layers.BatchNormalization
        name = _snake_case(cls.__name__)
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        keys[name] = layer
    return keys


def _snake_case(name):
    """Keras' `naming.to_snake_case`: "BatchNormalization" -> "batch_normalization"."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _strings(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _assign(targets, arrays, what):
    """Sets each target layer from `arrays[key]` after checking that everything fits."""
    missing = [k for k in targets if k not in arrays]
    unexpected = [k for k in arrays if k not in targets]
    shapes = []
    for key, layer in targets.items():
        if key in arrays:
            have = [tuple(v.shape) for v in layer.weights]
            got = [tuple(a.shape) for a in arrays[key]]
            if have != got:
                shapes.append(f"{key} {got} in the file, {have} in the model")
    problems = [
        f"{label} {', '.join(found[:3])}{' ...' if len(found) > 3 else ''}"
        for label, found in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if found
    ]
    if problems:
        raise WeightsMismatch(f"{what} does not fit the model: {'; '.join(problems)}")
    for key, layer in targets.items():
        layer.set_weights(arrays[key])
