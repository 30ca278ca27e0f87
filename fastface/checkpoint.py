"""Training checkpoints: encoder, corrective space, optimizer states and settings in one HDF5 file.

Layout (format version 1):
    attrs: kind = "fastface.checkpoint", format_version, step, fastface_version
    settings/            attrs: the training settings (JSON text in attrs["json"])
    encoder/             attrs: architecture settings, seed, fc_init_scale; dataset "flat_params"
    correctives/         written by CorrectiveSpace.save
    optimizers/NAME/     datasets "m", "v", "step" of each Adam

Written atomically (fastface._files.atomic_write): a crash or a `kill -9` mid-write leaves the previous
checkpoint as it was, so training never loses more than the steps since the last save.
"""
import dataclasses
import json

import numpy as np

from fastface._backend import is_cupy_array
from fastface._files import atomic_write

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "FORMAT_VERSION"]

KIND = "fastface.checkpoint"
FORMAT_VERSION = 1
_ENCODER_KEYS = ("n_outputs", "resolution", "widths", "stem_width", "patch")


def _host(a):
    return a.get() if is_cupy_array(a) else np.asarray(a)


@dataclasses.dataclass
class Checkpoint:
    """What `load_checkpoint` read, on the CPU: rebuild with `encoder()` / `correctives()`."""
    path: str
    step: int
    settings: dict
    encoder_settings: dict
    encoder_extra: dict
    encoder_params: np.ndarray
    corrective_space: object   # the CorrectiveSpace, on the CPU
    optimizers: dict           # name -> {"m", "v", "step"}

    def encoder(self):
        from fastface.nn import Encoder  # noqa: PLC0415
        enc = Encoder(seed=self.encoder_extra["seed"], fc_init_scale=self.encoder_extra["fc_init_scale"],
                      **self.encoder_settings)
        if enc.flat_params.shape != self.encoder_params.shape:
            raise ValueError(f"{self.path}: the encoder's parameters have {self.encoder_params.size} values, "
                             f"its settings need {enc.flat_params.size}")
        enc.flat_params[...] = self.encoder_params
        return enc

    def correctives(self):
        return self.corrective_space

    def restore_optimizer(self, name, optimizer):
        """Copies a saved Adam state (m, v, step count) into `optimizer`, checking the shapes."""
        state = self.optimizers.get(name)
        if state is None:
            raise ValueError(f"{self.path} holds no optimizer state {name!r}")
        m, v, step = optimizer.state_arrays()
        if len(m) != 1 or tuple(m[0].shape) != state["m"].shape:
            raise ValueError(f"{self.path}: optimizer {name!r} has state of shape {state['m'].shape}, "
                             f"the model needs {tuple(m[0].shape)}")
        xp = np if not is_cupy_array(m[0]) else __import__("cupy")
        m[0][...] = xp.asarray(state["m"])
        v[0][...] = xp.asarray(state["v"])
        step[...] = xp.asarray(state["step"])
        optimizer._steps_host = int(state["step"][0])


def save_checkpoint(path, step, settings, encoder, correctives, optimizers):
    """Writes a checkpoint atomically.

    Args:
        path: the .h5 file. step: steps done. settings: JSON-serialisable dict (the run's settings).
        encoder: fastface.nn.Encoder. correctives: CorrectiveSpace. optimizers: dict name -> Adam.
    """
    import h5py  # noqa: PLC0415

    import fastface  # noqa: PLC0415
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["kind"] = KIND
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["step"] = int(step)
        f.attrs["fastface_version"] = fastface.__version__
        f.create_group("settings").attrs["json"] = json.dumps(settings, sort_keys=True)
        g = f.create_group("encoder")
        for k in _ENCODER_KEYS:
            g.attrs[k] = np.asarray(encoder.settings[k], dtype=np.int64)
        g.attrs["seed"] = encoder.seed
        g.attrs["fc_init_scale"] = encoder.fc_init_scale
        g.create_dataset("flat_params", data=_host(encoder.flat_params).astype(np.float32))
        correctives.save(f.create_group("correctives"))
        o = f.create_group("optimizers")
        for name, opt in optimizers.items():
            m, v, s = opt.state_arrays()
            og = o.create_group(name)
            og.create_dataset("m", data=_host(m[0]))
            og.create_dataset("v", data=_host(v[0]))
            og.create_dataset("step", data=_host(s))


def load_checkpoint(path):
    """Reads a checkpoint written by `save_checkpoint`; refuses other files and other format versions.

    Raises:
        FileNotFoundError: no such file. ValueError: not a fastface checkpoint, another format version,
        or missing parts; the message names the file.
    """
    import os

    import h5py  # noqa: PLC0415
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 checkpoint: {e}") from None
    with f:
        if f.attrs.get("kind") != KIND:
            raise ValueError(f"{path} is not a fastface training checkpoint (kind={f.attrs.get('kind')!r})")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has checkpoint format version {version}; this fastface reads version "
                             f"{FORMAT_VERSION}")
        for part in ("settings", "encoder", "correctives", "optimizers"):
            if part not in f:
                raise ValueError(f"{path} lacks the part {part!r}; the file is incomplete")
        settings = json.loads(f["settings"].attrs["json"])
        g = f["encoder"]
        enc_settings = {}
        for k in _ENCODER_KEYS:
            v = np.asarray(g.attrs[k])
            enc_settings[k] = tuple(int(a) for a in v) if v.ndim else int(v)
        extra = {"seed": int(g.attrs["seed"]), "fc_init_scale": float(g.attrs["fc_init_scale"])}
        params = np.asarray(g["flat_params"])
        from fastface.model.corrective import CorrectiveSpace  # noqa: PLC0415
        try:
            correctives = CorrectiveSpace.load(f["correctives"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: its corrective space cannot be read: {e}") from None
        optimizers = {name: {k: np.asarray(og[k]) for k in ("m", "v", "step")} for name, og in f["optimizers"].items()}
        return Checkpoint(path=path, step=int(f.attrs["step"]), settings=settings, encoder_settings=enc_settings,
                          encoder_extra=extra, encoder_params=params, corrective_space=correctives,
                          optimizers=optimizers)
